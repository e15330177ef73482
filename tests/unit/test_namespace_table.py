"""App's one table of namespaces: each name held once, in the view of its
abstraction; replacing a namespace (a reload changed its settings) lets go
of the old one the way removing it does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing

from prism.api.namespaces import Held, NamespaceTable
from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.proto import kv_pb2, pubsub_pb2
from prism.rpc.server import Connection
from prism.workers.app import App

from .h2client import H2Client, frame


def test_each_name_is_held_once_in_the_view_of_its_abstraction() -> None:
    table = NamespaceTable()
    kv = Held(NamespaceConfig(name="n", abstraction="keyvalue"), "a keyvalue backend")
    assert table.hold(kv) is None
    assert table.by_name == {"n": kv} and table.keyvalue == {"n": kv}
    assert not table.timeseries and not table.pubsub

    # A reload turns n into a TimeSeries namespace: one entry still, in the other view.
    ts = Held(NamespaceConfig(name="n", abstraction="timeseries"), "a timeseries backend")
    assert table.hold(ts) is kv  # for the caller to close
    assert table.by_name == {"n": ts} and table.timeseries == {"n": ts}
    assert not table.keyvalue

    other = Held(NamespaceConfig(name="m", abstraction="pubsub"), "a pubsub backend")
    table.hold(other)
    assert table.held() == [ts, other]
    assert table.release("n") is ts
    assert table.release("n") is None
    assert table.by_name == {"m": other} and table.pubsub == {"m": other} and not table.timeseries


@asynccontextmanager
async def client_of(app: App) -> AsyncIterator[H2Client]:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, app.settings).serve)
        client = H2Client(client_stream)
        await client.start()
        yield client
        nursery.cancel_scope.cancel()


async def test_new_settings_replace_a_namespace_without_a_gap(tmp_path: Path) -> None:
    app = App(ServerConfig(data_dir=str(tmp_path)))
    kv = NamespaceConfig(name="kv", abstraction="keyvalue", backend="memory")
    assert await app.apply([kv]) == []
    old = app.namespaces.keyvalue["kv"]
    changed = NamespaceConfig(name="kv", abstraction="keyvalue", backend="sqlite")
    assert await app.apply([changed]) == []
    new = app.namespaces.keyvalue["kv"]
    assert new.config == changed and new.backend is not old.backend
    async with client_of(app) as client:
        request = kv_pb2.PutItemsRequest(namespace="kv", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
        with trio.fail_after(5):
            r = await client.call("/prism.kv.v1.KeyValue/PutItems", frame(request.SerializeToString()))
        assert r.status == 0
    # The same settings again: nothing is reopened.
    assert await app.apply([changed]) == []
    assert app.namespaces.keyvalue["kv"] is new
    await app.aclose()
    assert not app.namespaces.by_name


async def test_new_settings_end_the_subscribe_streams_of_the_old_backend(tmp_path: Path) -> None:
    app = App(ServerConfig(data_dir=str(tmp_path)))
    ps = NamespaceConfig(name="ps", abstraction="pubsub", backend="memory")
    assert await app.apply([ps]) == []
    async with client_of(app) as client:
        request = pubsub_pb2.SubscribeRequest(namespace="ps", topic="t")
        sid = await client.start_call("/prism.pubsub.v1.PubSub/Subscribe", frame(request.SerializeToString()))
        with trio.fail_after(5):
            while not client.responses[sid].headers:  # the subscription is in place
                await client.pump()
        changed = NamespaceConfig(
            name="ps", abstraction="pubsub", backend="memory", options={"ack_wait_ms": 5}
        )
        assert await app.apply([changed]) == []
        with trio.fail_after(5):
            r = await client.wait(sid)
        assert r.status == StatusCode.UNAVAILABLE
        assert r.message.startswith("subscription ended")
    await app.aclose()
