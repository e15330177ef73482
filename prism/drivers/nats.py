"""NATS from trio: the core client protocol over ``trio.open_tcp_stream`` (TLS when asked).

Decision (the same as ``pg``'s and ``resp``'s): no threads and no asyncio.
nats-py is asyncio-only, and its sync use would need a thread hop per call.
The core protocol is a few text lines (INFO, CONNECT, PING/PONG, PUB/HPUB,
SUB/UNSUB, MSG/HMSG, +OK/-ERR), so it is written here; JetStream is JSON
request/reply on top of it (``prism.backends.nats``).

One connection is shared by all the tasks of a backend and carries no
background task: whichever task waits for something (a reply, a message of
a subscription, a PONG) reads the socket while no other task does, hands
what it reads to the waiting tasks, and passes the reading on to another
waiter when its own wait is over ("the waiter reads"). So the connection
needs no nursery and fits a backend's separate ``open()``/``aclose()``
calls. A task that wants the socket read all the time (answering server
PINGs at once) simply keeps waiting on a subscription: the NATS backend does
that in each subscription's own nursery. A connection used only now and then
is checked with a PING round trip before use after ``IDLE_CHECK_S`` (see
``idle_s``), since the server's PINGs to it go unanswered meanwhile.

Replies come to one wildcard subscription, ``_INBOX.<random>.*``; the last
token names the waiting box (one box per request; a box may get several
replies). A JetStream pull needs a subscription of its own (``new_inbox``):
its deliveries carry their stream subject, not the inbox. Messages for a box that is gone are
handed to ``Connection.orphan`` (the NATS backend NAKs late JetStream
deliveries there).

TLS. NATS sends INFO in plaintext; for a ``tls://`` URL, or an INFO saying
``tls_required``, the stream is upgraded (``prism.drivers.tls``) before
CONNECT, so credentials never go out in plaintext. A ``tls://`` URL to a
server offering no TLS fails: falling back would hand them to anyone.

Cancellation. A waiting task cancelled in ``receive_some`` loses no data
(trio's guarantee, over TLS too once the handshake is done) and passes the
reading on. Writes are shielded and
bounded by ``SEND_TIMEOUT_S``: a write cut in the middle would corrupt the
stream for every task, so a write that cannot finish closes the connection.
Connection lost: every waiting and later call raises ``ConnectionLost``.

Errors. This module knows nothing of gRPC: it raises ``NatsError``
subclasses whose text is fit to show a client, and the NATS backend maps
them to the gateway's errors (``prism.backends.nats.errors``).

Cost. A round trip to NATS costs more client CPU than one to Redis even on
a bare trio socket (the reply comes after trio has gone to epoll), and this
module adds cancel scopes, the waiter hand-off and parsing on top; a
JetStream publish (a request with an ack) is dearer still. The figures, and
how they were taken, are in ``bench/results/nats_driver_cpu.md``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import trio

from prism.drivers import tls
from prism.drivers.addresses import NatsAddress

SEND_TIMEOUT_S = 5.0
IDLE_CHECK_S = 30.0
_CRLF = b"\r\n"


class NatsError(Exception):
    """Base of this driver's errors; ``str(exc)`` is fit to show a client."""


class ConnectionLost(NatsError):
    """The connection broke or was closed; every later call on it fails too."""


class CannotConnect(NatsError):
    """No connection: refused, unreachable, too slow, TLS refused, or no header support."""


class NoReply(NatsError):
    """A request got no reply within its timeout."""


class NoResponders(NatsError):
    """Nobody subscribes to the subject of a request (status 503)."""


class PayloadTooLarge(NatsError):
    """A message over the server's ``max_payload``: not sent (the server
    would close the connection), and the connection stays usable."""


class Msg:
    __slots__ = ("data", "description", "headers", "reply", "status", "subject")

    def __init__(
        self, subject: str, reply: str, data: bytes, headers: dict[str, str], status: int, description: str
    ) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers
        self.status = status  # 0 unless the header block has a status line ("NATS/1.0 408 ...")
        self.description = description


class Box:
    """Messages for one subscription or one inbox token, read by one task at a time."""

    __slots__ = ("count", "msgs", "sid", "subject", "wake")

    def __init__(self, subject: str, sid: int) -> None:
        self.subject = subject
        self.sid = sid  # 0: a token of the shared inbox
        self.count = 0  # messages received so far
        self.msgs: deque[Msg] = deque()
        self.wake = trio.Event()


def _parse_headers(block: bytes | bytearray) -> tuple[dict[str, str], int, str]:
    lines = block.decode("utf-8", "replace").split("\r\n")
    status, description = 0, ""
    first = lines[0].split(" ", 2)  # NATS/1.0[ status[ description]]
    if len(first) > 1 and first[1].isdigit():
        status = int(first[1])
        description = first[2] if len(first) > 2 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return headers, status, description


def encode_headers(headers: Mapping[str, str]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + _CRLF


class Connection:
    def __init__(self, stream: tls.Stream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self._out: list[bytes] = []  # written by the reader after dispatching (PONGs, orphan NAKs)
        self._reading = False
        self._waiting: dict[Box, None] = {}
        self._subs: dict[int, Box] = {}
        self._boxes: dict[str, Box] = {}
        self._pongs: deque[Box] = deque()
        self._tokens = 0
        self._next_sid = 2  # sid 1: the shared inbox, subscribed by connect()
        self._inbox = f"_INBOX.{secrets.token_hex(11)}."
        self._last_read = time.monotonic()
        self.error: str | None = None
        self.info: dict[str, Any] | None = None
        self.max_payload = 1 << 20
        self.orphan: Callable[[Msg], None] | None = None
        self.tls = False  # upgraded to TLS after INFO

    @property
    def closed(self) -> bool:
        return self.error is not None

    def idle_s(self) -> float:
        return time.monotonic() - self._last_read

    def close(self, reason: str = "closed") -> None:
        if self.error is None:
            self.error = reason
            tls.raw_socket(self._stream).close()
        for box in self._waiting:
            box.wake.set()

    def _check(self) -> None:
        if self.error is not None:
            raise ConnectionLost(f"nats: connection lost: {self.error}")

    async def _send(self, data: bytes) -> None:
        self._check()
        # One scope (shielded, with its own deadline) and the lock taken without
        # a checkpoint when free: a second scope or a checkpoint per call
        # showed up in the client CPU of every publish.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT_S) as scope:
            try:
                self._send_lock.acquire_nowait()
            except trio.WouldBlock:
                await self._send_lock.acquire()
            try:
                await self._stream.send_all(data)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.close(str(exc) or type(exc).__name__)
            finally:
                self._send_lock.release()
        if scope.cancelled_caught:
            self.close(f"write blocked for {SEND_TIMEOUT_S:g} s")
        self._check()

    async def _read_some(self) -> None:
        try:
            chunk = await self._stream.receive_some(65536)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close(str(exc) or type(exc).__name__)
            self._check()
        if not chunk:
            self.close("closed by the server")
            self._check()
        self._last_read = time.monotonic()
        self._buf += chunk
        try:
            self._parse()
        except (ValueError, IndexError) as exc:
            self.close(f"protocol error: {exc}")
            self._check()
        await self.send_queued()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        while True:
            end = buf.find(_CRLF, pos)
            if end < 0:
                break
            line = bytes(buf[pos:end])
            op = line[:4].upper()
            if op in (b"MSG ", b"HMSG"):
                args = line.split()
                hmsg = op == b"HMSG"
                total = int(args[-1])
                start = end + 2
                if len(buf) < start + total + 2:
                    break
                hlen = int(args[-2]) if hmsg else 0
                reply = args[3].decode() if len(args) == (6 if hmsg else 5) else ""
                headers, status, description = (
                    _parse_headers(buf[start : start + hlen]) if hlen else ({}, 0, "")
                )
                msg = Msg(
                    args[1].decode(),
                    reply,
                    bytes(buf[start + hlen : start + total]),
                    headers,
                    status,
                    description,
                )
                pos = start + total + 2
                self._dispatch(int(args[2]), msg)
                continue
            pos = end + 2
            if op == b"PING":
                self._out.append(b"PONG\r\n")
            elif op == b"PONG":
                if self._pongs:
                    self._put(self._pongs.popleft(), Msg("", "", b"", {}, 0, ""))
            elif op == b"INFO":
                self.info = json.loads(line[5:])
                self.max_payload = int(self.info.get("max_payload", self.max_payload))
            elif op == b"-ERR":
                error = line[5:].decode("utf-8", "replace").strip(" '")
                if not error.lower().startswith(("permissions violation", "invalid subject")):
                    self.close(error)  # the others end the connection (the server closes it)
        del buf[:pos]

    def _put(self, box: Box, msg: Msg) -> None:
        box.count += 1
        box.msgs.append(msg)
        box.wake.set()

    def _dispatch(self, sid: int, msg: Msg) -> None:
        if sid == 1:
            box = self._boxes.get(msg.subject[len(self._inbox) :])
        else:
            box = self._subs.get(sid)
        if box is not None:
            self._put(box, msg)
        elif self.orphan is not None:
            self.orphan(msg)

    async def _wait(self, box: Box) -> None:
        """Until ``box`` has a message; reads the socket while nobody else does."""
        self._waiting[box] = None
        try:
            while not box.msgs:
                self._check()
                if self._reading:
                    box.wake = trio.Event()
                    await box.wake.wait()
                    continue
                self._reading = True
                try:
                    while not box.msgs:
                        await self._read_some()
                finally:
                    self._reading = False
        finally:
            self._waiting.pop(box, None)
            if not self._reading:
                for other in self._waiting:  # pass the reading on
                    other.wake.set()
                    break

    async def next_msg(self, box: Box) -> Msg:
        await self._wait(box)
        return box.msgs.popleft()

    def send_later(self, data: bytes) -> None:
        """Queue a write: sent by ``send_queued`` or by the reader after dispatching
        (so callbacks that cannot await can write)."""
        self._out.append(data)

    async def send_queued(self) -> None:
        """Send the queued writes in one write."""
        if self._out:
            out, self._out = b"".join(self._out), []
            await self._send(out)

    def pub_bytes(self, subject: str, data: bytes, headers: Mapping[str, str] | None, reply: str) -> bytes:
        hdr = encode_headers(headers) if headers else b""
        size = len(hdr) + len(data)
        if size > self.max_payload:  # the server would close the connection
            raise PayloadTooLarge(f"nats: message of {size} bytes is over the server's {self.max_payload}")
        rep = f" {reply}" if reply else ""
        if hdr:
            return f"HPUB {subject}{rep} {len(hdr)} {size}\r\n".encode() + hdr + data + _CRLF
        return f"PUB {subject}{rep} {size}\r\n".encode() + data + _CRLF

    async def publish(
        self, subject: str, data: bytes = b"", headers: Mapping[str, str] | None = None, reply: str = ""
    ) -> None:
        await self._send(self.pub_bytes(subject, data, headers, reply))

    def new_box(self) -> Box:
        """A box on the shared inbox: publish with ``reply=box.subject``; ``drop_box`` after."""
        self._tokens += 1
        token = str(self._tokens)
        box = Box(self._inbox + token, 0)
        self._boxes[token] = box
        return box

    def drop_box(self, box: Box) -> None:
        self._boxes.pop(box.subject[len(self._inbox) :], None)

    async def request(
        self, subject: str, data: bytes = b"", headers: Mapping[str, str] | None = None, *, timeout_s: float
    ) -> Msg:
        """The first reply; NoResponders for status 503, NoReply on timeout."""
        box = self.new_box()
        try:
            await self.publish(subject, data, headers, reply=box.subject)
            with trio.move_on_after(timeout_s):
                msg = await self.next_msg(box)
                if msg.status == 503:
                    raise NoResponders(f"nats: no responders on {subject}")
                return msg
            raise NoReply(f"nats: no reply on {subject} within {timeout_s:g} s")
        finally:
            self.drop_box(box)

    def new_inbox(self) -> str:
        """A unique subject for a subscription of its own (JetStream deliveries
        keep their stream subject, so they cannot be told apart on the shared inbox)."""
        return f"{self._inbox}s.{secrets.token_hex(8)}"

    async def subscribe(self, subject: str, queue: str = "") -> Box:
        sid = self._next_sid
        self._next_sid += 1
        box = Box(subject, sid)
        self._subs[sid] = box
        await self._send(f"SUB {subject} {queue + ' ' if queue else ''}{sid}\r\n".encode())
        return box

    async def unsubscribe(self, box: Box, *, more: int = 0) -> None:
        """Stop the subscription; with ``more``, the server still sends that many
        messages (an open JetStream pull's last one), which go to ``orphan``."""
        if self._subs.pop(box.sid, None) is not None and not self.closed:
            limit = f" {box.count + more}" if more else ""
            await self._send(f"UNSUB {box.sid}{limit}\r\n".encode())

    async def flush(self, timeout_s: float) -> None:
        """A PING/PONG round trip: everything sent before has reached the server."""
        box = Box("", 0)
        self._pongs.append(box)
        self.send_later(b"PING\r\n")
        await self.send_queued()
        with trio.move_on_after(timeout_s):
            await self._wait(box)
            return
        self.close(f"no PONG within {timeout_s:g} s")
        self._check()


async def connect(
    url: str, *, timeout_s: float, name: str = "prism", contexts: tls.ClientContexts | None = None
) -> Connection:
    """Connect (TLS verified with ``contexts``, default: the system's CAs),
    handshake and subscribe the shared inbox; CannotConnect (or
    ConnectionLost, when the server closes it during the handshake) on
    failure or after ``timeout_s``. ValueError if ``url`` is not a NATS URL."""
    address = NatsAddress(url)
    host, port = address.host, address.port
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise CannotConnect(f"nats: cannot connect to {host}:{port}: {exc}") from exc
        conn = Connection(stream)
        try:
            while conn.info is None:
                await conn._read_some()
            if address.tls or conn.info.get("tls_required"):
                await _upgrade(conn, stream, address, contexts or tls.ClientContexts())
            if not conn.info.get("headers"):
                raise CannotConnect(f"nats: server at {host}:{port} does not support headers")
            opts: dict[str, object] = {
                "verbose": False, "pedantic": False, "headers": True, "no_responders": True,
                "protocol": 1, "lang": "python-trio", "version": "0.1", "name": name,
                "tls_required": conn.tls,
            }  # fmt: skip
            if address.token is not None:
                opts["auth_token"] = address.token
            elif address.user is not None:
                opts["user"], opts["pass"] = address.user, address.password
            await conn._send(
                b"CONNECT " + json.dumps(opts).encode() + b"\r\nSUB " + conn._inbox.encode() + b"* 1\r\n"
            )
            await conn.flush(timeout_s)  # -ERR (authorization) closes the connection: ConnectionLost
        except BaseException:
            conn.close()
            raise
        return conn
    raise CannotConnect(f"nats: cannot connect to {host}:{port} within {timeout_s:g} s")


async def _upgrade(
    conn: Connection, stream: trio.SocketStream, address: NatsAddress, contexts: tls.ClientContexts
) -> None:
    """Switch ``conn`` to TLS after the server's plaintext INFO."""
    where = f"{address.host}:{address.port}"
    assert conn.info is not None
    if not (conn.info.get("tls_required") or conn.info.get("tls_available")):
        raise CannotConnect(f"nats: server at {where} does not offer TLS (the URL asks for tls://)")
    if conn._buf:  # nothing may follow INFO before the handshake
        raise CannotConnect(f"nats: server at {where} sent data before the TLS handshake")
    try:
        conn._stream = await tls.start_tls(stream, contexts.get(), address.host)
    except (OSError, trio.BrokenResourceError) as exc:  # ssl.SSLError is an OSError
        raise CannotConnect(f"nats: cannot connect to {where}: {tls.reason(exc)}") from exc
    conn.tls = True
