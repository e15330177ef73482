"""Redis from trio: RESP over ``trio.open_tcp_stream`` (TLS for ``rediss://``), parsed by hiredis.

Decision (the same as ``pg``'s): no threads and no asyncio. redis-py's
asyncio client needs an asyncio loop and its sync client would need a thread
hop per call (see ``pg``: a hop costs more CPU than the query). Commands are
encoded as RESP arrays here (a few lines); replies are parsed by
``hiredis.Reader``, the sans-I/O C parser, so no RESP parser is hand-written.
Several commands go out in one write and their replies are read back in
order (pipelining).

``bench/redis_driver_cpu.py`` compares the client CPU per GET of redis-py's
sync client, this module, and ``RedisBackend.get_items`` (results in
``bench/results/redis_driver_cpu.json``): driving the socket from trio costs
no more CPU than redis-py's sync client, and pipelining makes each further
command almost free.

TLS. A ``rediss://`` URL's connections are wrapped in ``trio.SSLStream``
from the start (Redis has no STARTTLS), checking the server's certificate
against the pool's ``ca_file`` (``prism.drivers.tls``).

Errors. This module knows nothing of gRPC: it raises ``RedisError``
subclasses whose text is fit to show a client ("redis: connection lost:
..."), and the Redis backends map them to the gateway's errors
(``prism.backends.redis.errors``).

Cancellation. A connection whose task is cancelled (or fails) while a reply
is pending is closed on the spot and never goes back to the pool: an unread
reply would otherwise be handed to the next caller.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import trio

from prism.drivers import tls
from prism.drivers.addresses import RedisAddress
from prism.drivers.pool import BoundedPool
from prism.tracing.context import child

Arg = bytes | str | int
Reply = Any  # bytes | int | None | list[Reply] | ReplyError
Address = RedisAddress  # the name callers know


class RedisError(Exception):
    """Base of this driver's errors; ``str(exc)`` is fit to show a client."""


class ConnectionLost(RedisError):
    """The connection broke (or was closed) with a command in flight or before it."""


class CannotConnect(RedisError):
    """No connection: refused, unreachable, too slow, TLS refused, or AUTH/SELECT failed."""


class PoolTimeout(RedisError):
    """Every connection stayed busy for longer than the pool's acquire timeout."""


class PoolClosed(RedisError):
    """The pool was closed (its backend is shutting down)."""


class ReplyError(RedisError):
    """An error reply from the server (``-ERR ...``)."""


def encode(args: Sequence[Arg]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        else:
            b = b"%d" % a
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


class Connection:
    """One TCP (or TLS) connection; one task at a time (the pool hands it out)."""

    def __init__(self, stream: tls.Stream) -> None:
        # Imported at the first connection: a worker with no Redis
        # namespace or cache never loads the parser.
        import hiredis

        self._hiredis = hiredis
        self._stream = stream
        self._reader = hiredis.Reader()
        self.broken = False

    def close(self) -> None:
        self.broken = True
        tls.raw_socket(self._stream).close()

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Send ``commands`` in one write; their replies in order. Error
        replies come back as ``ReplyError`` values, not raised."""
        if self.broken:
            raise ConnectionLost("redis: connection is closed")
        data = b"".join(encode(c) for c in commands)
        reader = self._reader
        hiredis = self._hiredis
        replies: list[Reply] = []
        try:
            await self._stream.send_all(data)
            while len(replies) < len(commands):
                reply = reader.gets()
                if reply is False:
                    chunk = await self._stream.receive_some(65536)
                    if not chunk:
                        raise ConnectionLost("redis: connection closed by the server")
                    reader.feed(chunk)  # type: ignore[arg-type]  # any buffer; the stub says bytes
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    reply = ReplyError(str(reply))
                replies.append(reply)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.ProtocolError) as exc:
            self.close()
            raise ConnectionLost(f"redis: connection lost: {tls.reason(exc)}") from exc
        except BaseException:
            # Cancelled (or anything else) with replies unread: never reuse.
            self.close()
            raise
        return replies

    async def pipeline_scripts(self, commands: Sequence[Sequence[Arg]], script: Script) -> list[Reply]:
        """``pipeline``, where some commands are ``script``'s EVALSHA: those the
        server answered NOSCRIPT did not run, so the script is loaded and they
        run again (in the same order), and their new replies take their places."""
        replies = await self.pipeline(commands)
        redo = [
            i for i, r in enumerate(replies) if isinstance(r, ReplyError) and str(r).startswith("NOSCRIPT")
        ]
        if redo:
            again = await self.pipeline([["SCRIPT", "LOAD", script.source], *(commands[i] for i in redo)])
            for i, r in zip(redo, again[1:], strict=True):
                replies[i] = r
        return replies

    async def call(self, *args: Arg) -> Reply:
        """One command; its reply, ReplyError raised."""
        (reply,) = await self.pipeline([args])
        if isinstance(reply, ReplyError):
            raise reply
        return reply


async def connect(
    address: Address, *, timeout_s: float, contexts: tls.ClientContexts | None = None
) -> Connection:
    """Open (and AUTH/SELECT) a connection, over TLS for a ``rediss://`` address
    (verified with ``contexts``, by default the system's CAs); CannotConnect
    if it fails or takes over ``timeout_s``."""
    where = f"{address.host}:{address.port}"
    with trio.move_on_after(timeout_s) as scope:
        try:
            tcp = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            raise CannotConnect(f"redis: cannot connect to {where}: {exc}") from exc
        stream: tls.Stream = tcp
        if address.tls:
            try:
                context = (contexts or tls.ClientContexts()).get()
                stream = await tls.start_tls(tcp, context, address.host)
            except (OSError, trio.BrokenResourceError) as exc:  # ssl.SSLError is an OSError
                tcp.socket.close()
                raise CannotConnect(f"redis: cannot connect to {where}: {tls.reason(exc)}") from exc
            except BaseException:
                tcp.socket.close()
                raise
        conn = Connection(stream)
        try:
            if address.password is not None:
                auth: list[Arg] = ["AUTH", address.password]
                if address.username:
                    auth.insert(1, address.username)
                await conn.call(*auth)
            if address.db:
                await conn.call("SELECT", address.db)
        except ReplyError as exc:
            conn.close()
            raise CannotConnect(f"redis: cannot set up the connection: {exc}") from exc
        return conn
    assert scope.cancelled_caught
    raise CannotConnect(f"redis: cannot connect to {where} within {timeout_s:g} s")


class Script:
    """A Lua script run by EVALSHA, loaded on NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def command(self, keys: Sequence[Arg], args: Sequence[Arg]) -> list[Arg]:
        return ["EVALSHA", self.sha, len(keys), *keys, *args]


class Pool(BoundedPool[Connection]):
    """At most ``size`` connections (``prism.drivers.pool``); PoolTimeout when
    all stay busy past ``acquire_timeout_s``. ``ca_file``: the CAs a
    ``rediss://`` server's certificate must chain to (default: the system's)."""

    def __init__(
        self,
        address: Address,
        *,
        size: int,
        connect_timeout_s: float,
        acquire_timeout_s: float,
        ca_file: str = "",
    ):
        super().__init__(size=size, connect_timeout_s=connect_timeout_s, acquire_timeout_s=acquire_timeout_s)
        self.address = address
        self._contexts = tls.ClientContexts(ca_file)

    async def _open(self) -> Connection:
        return await connect(self.address, timeout_s=self.connect_timeout_s, contexts=self._contexts)

    def _busy_error(self) -> Exception:
        return PoolTimeout(f"redis: all {self.size} connections busy for {self.acquire_timeout_s:g} s")

    def _closed_error(self) -> Exception:
        return PoolClosed("redis: connection pool is closed")

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        conn = await self.acquire()
        try:
            with child("prism.backend.redis", **{"db.system": "redis", "prism.commands": len(commands)}):
                return await conn.pipeline(commands)
        finally:
            self.put_back(conn)

    async def call(self, *args: Arg) -> Reply:
        (reply,) = await self.pipeline([args])
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def eval_many(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[Arg], Sequence[Arg]]],
        *,
        raise_errors: bool = True,
    ) -> list[Reply]:
        """Run ``script`` once per (keys, args), pipelined; a ReplyError is
        raised (or, without ``raise_errors``, left in its call's place).
        On NOSCRIPT the script is loaded and the calls run again."""
        commands = [script.command(k, a) for k, a in calls]
        conn = await self.acquire()
        try:
            with child("prism.backend.redis", **{"db.system": "redis", "prism.commands": len(commands)}):
                replies = await conn.pipeline_scripts(commands, script)
        finally:
            self.put_back(conn)
        if raise_errors:
            for r in replies:
                if isinstance(r, ReplyError):
                    raise r
        return replies

    async def eval(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        return (await self.eval_many(script, [(keys, args)]))[0]
