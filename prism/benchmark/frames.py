"""A bare HTTP/2 client connection for the load generator: frames built once, parsed by header.

grpc.aio's client costs more per call than Prism's server spends answering
it, so it cannot load a worker to saturation. This connection does the
least HTTP/2 asks of a client:

- each distinct request's HEADERS block is HPACK-encoded once, without the
  dynamic table (``prism.rpc.hpack_cache.stateless_block``), so the same
  bytes are right on every stream of every connection; a call is that block
  behind a 9-byte frame header, then its DATA frame(s);
- answers are cut into frames by their 9-byte headers; DATA is kept for the
  answer check; header blocks go through hpack's ``Decoder`` (it must see
  every block, in order, in case the server indexes), except a block seen
  before while the dynamic table was and stayed empty, whose decoding is
  reused (the same bytes then decode the same);
- flow control: the client's receive windows are opened to 2**31-1 at once
  (a WINDOW_UPDATE tops the connection's up as answers arrive); requests
  wait for the server's connection window, and a request larger than the
  server's stream window is refused up front (``scenario`` caps value sizes
  below the default 65,535).

It runs on a non-blocking socket; ``loadgen`` drives many of them with a
selector. PING is answered, SETTINGS acknowledged; GOAWAY and RST_STREAM
end the calls they concern as errors.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from hpack import Decoder

from prism.rpc.hpack_cache import stateless_block

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
STATUS_NAMES = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
    "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
)  # fmt: skip


_HEAD = struct.Struct(">HBBBI")  # length (16 + 8 bits), type, flags, stream id


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, ftype, flags, stream_id) + payload


def status_name(code: bytes | None) -> str:
    """A grpc-status value as its name ("OK", "UNAVAILABLE"...); "NO_STATUS" without one."""
    if code is None:
        return "NO_STATUS"
    try:
        return STATUS_NAMES[int(code)]
    except (ValueError, IndexError):
        return f"STATUS_{code.decode(errors='replace')}"


_CLIENT_SETTINGS = frame(
    SETTINGS, 0, 0, (2).to_bytes(2, "big") + (0).to_bytes(4, "big")  # ENABLE_PUSH = 0
    + (4).to_bytes(2, "big") + MAX_WINDOW.to_bytes(4, "big"),  # INITIAL_WINDOW_SIZE
)  # fmt: skip
_OPEN_WINDOW = frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))


@dataclass
class Pending:
    """A call sent and not yet answered."""

    op: str
    key: int
    started: float  # when it was sent (closed loop) or scheduled (open loop)
    data: bytearray = field(default_factory=bytearray)
    status: bytes | None = None
    http_ok: bool = False


@dataclass
class Done:
    """An answered (or failed) call: ``status`` is a gRPC status name or a client-side error."""

    call: Pending
    status: str


class Connection:
    """One HTTP/2 connection carrying gRPC calls; feed it bytes, it says which calls ended."""

    def __init__(self, sock: socket.socket, authority: str) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.authority = authority.encode()
        self.out = bytearray(PREFACE + _CLIENT_SETTINGS + _OPEN_WINDOW)
        self.inbuf = bytearray()
        self.calls: dict[int, Pending] = {}
        self.next_id = 1
        self.send_window = DEFAULT_WINDOW
        self.stream_window = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME
        self.max_streams = 100
        self.closed: str | None = None  # why, once the connection is unusable
        self._received = 0
        self._decoder = Decoder()
        self._decoder.max_header_list_size = 1 << 20
        self._decoded: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._blocks: dict[tuple[bytes, int], bytes] = {}
        self._block: bytearray | None = None
        self._block_stream = 0
        self._block_end = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def can_send(self, size: int) -> bool:
        """Whether a request body of ``size`` bytes may start now (streams and window)."""
        return self.closed is None and len(self.calls) < self.max_streams and size <= self.send_window

    def start(self, call: Pending, path: bytes, body: bytes, timeout_ms: int = 0) -> None:
        """Queue one call's HEADERS and DATA frames (sent by ``flush``); with
        ``timeout_ms``, the call carries that deadline (``grpc-timeout``): the
        server answers DEADLINE_EXCEEDED once it has passed."""
        if len(body) > self.stream_window:
            raise ValueError(f"a {len(body)}-byte request exceeds the server's stream window")
        block = self._blocks.get((path, timeout_ms))
        if block is None:
            headers = [
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
                (b":authority", self.authority), (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]  # fmt: skip
            if timeout_ms:
                headers.append((b"grpc-timeout", b"%dm" % timeout_ms))
            block = self._blocks[(path, timeout_ms)] = stateless_block(headers)
        sid = self.next_id
        self.next_id += 2
        self.calls[sid] = call
        out = self.out
        out += frame(HEADERS, END_HEADERS, sid, block)
        for offset in range(0, len(body), self.max_frame):
            chunk = body[offset : offset + self.max_frame]
            last = offset + self.max_frame >= len(body)
            out += frame(DATA, END_STREAM if last else 0, sid, chunk)
        self.send_window -= len(body)

    def flush(self) -> None:
        """Send what is queued, as much as the socket takes."""
        if not self.out or self.closed is not None:
            return
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.closed = f"send failed: {exc}"
            return
        del self.out[:sent]

    def receive(self) -> list[Done]:
        """Read what the socket has; the calls that ended."""
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return []
        except OSError as exc:
            data, self.closed = b"", f"receive failed: {exc}"
        if not data:
            self.closed = self.closed or "closed by the server"
            return self.fail_all("CONNECTION_LOST")
        self.inbuf += data
        done = list(self._frames())
        if self._received > MAX_WINDOW // 2:
            self.out += frame(WINDOW_UPDATE, 0, 0, self._received.to_bytes(4, "big"))
            self._received = 0
        return done

    def fail_all(self, status: str) -> list[Done]:
        done = [Done(call, status) for call in self.calls.values()]
        self.calls.clear()
        return done

    def close(self) -> None:
        self.sock.close()
        self.closed = self.closed or "closed"

    def _frames(self) -> Iterator[Done]:
        buf, pos = self.inbuf, 0
        size = len(buf)
        while size - pos >= 9:
            high, low, ftype, flags, sid = _HEAD.unpack_from(buf, pos)
            length = high << 8 | low
            end = pos + 9 + length
            if end > size:
                break
            sid &= MAX_WINDOW
            payload = bytes(buf[pos + 9 : end])
            pos = end
            if ftype == DATA:
                self._received += length
                call = self.calls.get(sid)
                if call is not None:
                    call.data += _unpad(payload, flags)
                    if flags & END_STREAM:  # an answer without trailers
                        yield Done(self.calls.pop(sid), "NO_STATUS")
            elif ftype in (HEADERS, CONTINUATION):
                if ftype == HEADERS:
                    self._block, self._block_stream = bytearray(_header_fragment(payload, flags)), sid
                    self._block_end = bool(flags & END_STREAM)
                elif self._block is not None:
                    self._block += payload
                if flags & END_HEADERS and self._block is not None:
                    finished = self._headers(self._block_stream, bytes(self._block), self._block_end)
                    self._block = None
                    if finished is not None:
                        yield finished
            elif ftype == RST_STREAM:
                call = self.calls.pop(sid, None)
                if call is not None:
                    yield Done(call, "RST_STREAM")
            elif ftype == SETTINGS:
                if not flags & ACK:
                    self._settings(payload)
            elif ftype == PING:
                if not flags & ACK:
                    self.out += frame(PING, ACK, 0, payload)
            elif ftype == GOAWAY:
                last = int.from_bytes(payload[:4], "big") & MAX_WINDOW
                self.closed = "GOAWAY"
                for stream in [s for s in self.calls if s > last]:
                    yield Done(self.calls.pop(stream), "GOAWAY")
            elif ftype == WINDOW_UPDATE and sid == 0:
                self.send_window += int.from_bytes(payload[:4], "big") & MAX_WINDOW
        del buf[:pos]

    def _headers(self, sid: int, block: bytes, end_stream: bool) -> Done | None:
        headers = self._decode(block)
        call = self.calls.get(sid)
        if call is None:
            return None
        for name, value in headers:
            if name == b":status":
                call.http_ok = value == b"200"
            elif name == b"grpc-status":
                call.status = value
        if not end_stream:
            return None
        del self.calls[sid]
        if not call.http_ok:
            return Done(call, "HTTP_ERROR")
        return Done(call, status_name(call.status))

    def _decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        table = self._decoder.header_table
        if not table.dynamic_entries:
            cached = self._decoded.get(block)
            if cached is not None:
                return cached
        headers = [(bytes(n), bytes(v)) for n, v in self._decoder.decode(block, raw=True)]
        if table.dynamic_entries:
            self._decoded.clear()
        elif len(self._decoded) < 256:
            self._decoded[block] = headers
        return headers

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[offset : offset + 2], "big")
            value = int.from_bytes(payload[offset + 2 : offset + 6], "big")
            if ident == 3:
                self.max_streams = value
            elif ident == 4:
                self.stream_window = value
            elif ident == 5:
                self.max_frame = value
        self.out += frame(SETTINGS, ACK, 0, b"")


def connect(host: str, port: int, authority: str | None = None) -> Connection:
    """A connection to ``host:port`` (TCP, no delay), its preface queued."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Connection(sock, authority or f"{host}:{port}")


def _unpad(payload: bytes, flags: int) -> bytes:
    if flags & PADDED and payload:
        return payload[1 : len(payload) - payload[0]]
    return payload


def _header_fragment(payload: bytes, flags: int) -> bytes:
    if flags & PADDED and payload:
        payload = payload[1 : len(payload) - payload[0]]
    if flags & PRIORITY:
        payload = payload[5:]
    return payload
