"""A worker's ``App`` served to an in-process h2 client (tests of what a client sees)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing

from prism.rpc.server import Connection
from prism.workers.app import App

from .h2client import H2Client


@asynccontextmanager
async def serving_app(app: App) -> AsyncIterator[H2Client]:
    """A client on a connection ``app`` serves; the app is closed at the end."""
    try:
        async with connection_to(app) as client:
            yield client
    finally:
        await app.aclose()


@asynccontextmanager
async def connection_to(app: App) -> AsyncIterator[H2Client]:
    """A client on a(nother) connection ``app`` serves."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, app.settings).serve)
        client = H2Client(client_stream)
        await client.start()
        yield client
        nursery.cancel_scope.cancel()
