"""A minimal gRPC client on a real h2 client connection, for in-memory tests.

It lets a test send what grpcio never would (wrong content-type, lying
length prefixes, two messages in a unary call, resets) and see exactly what
the server answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

# A well-formed gRPC request's header list, as bytes (for raw frames).
RAW_REQUEST_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/s/M"),
    (b":authority", b"x"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


GOAWAY = 0x7  # the frame type
PING_FRAME = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"frames.."  # a PING, as raw bytes


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data``, in order (the last may be partial)."""
    types = []
    while len(data) >= 9:
        types.append(data[3])
        data = data[9 + int.from_bytes(data[:3], "big") :]
    return types


def frame(payload: bytes, *, length: int | None = None, flag: int = 0) -> bytes:
    n = len(payload) if length is None else length
    return bytes([flag]) + n.to_bytes(4, "big") + payload


@dataclass
class Response:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset_code: int | None = None

    @property
    def status(self) -> int | None:
        raw = self.trailers.get("grpc-status", self.headers.get("grpc-status"))
        return None if raw is None else int(raw)

    @property
    def message(self) -> str:
        return self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))

    def messages(self) -> list[bytes]:
        out, buf = [], bytes(self.data)
        while buf:
            n = int.from_bytes(buf[1:5], "big")
            out.append(buf[5 : 5 + n])
            buf = buf[5 + n :]
        return out


class H2Client:
    """``lenient``: send any header list as given (names and values as bytes),
    even one that breaks HTTP/2's rules, as only a test would."""

    def __init__(self, stream: trio.abc.Stream, *, lenient: bool = False) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=not lenient,
                normalize_outbound_headers=not lenient,
            )
        )
        self.responses: dict[int, Response] = {}
        self.goaway = False
        self.goaway_code: int | None = None
        self.remote_settings_seen = trio.Event()

    async def start(self) -> None:
        self.conn.initiate_connection()
        await self.flush()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    def headers(
        self, path: str, *, content_type: str = "application/grpc", extra: list[tuple[str, str]] | None = None
    ) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "test"),
            ("content-type", content_type),
            ("te", "trailers"),
            *(extra or []),
        ]

    async def start_call(
        self, path: str, body: bytes | None = None, *, end: bool = True, **kw: object
    ) -> int:
        sid = self.queue_call(path, body, end=end, **kw)
        await self.flush()
        return sid

    def queue_call(self, path: str, body: bytes | None = None, *, end: bool = True, **kw: object) -> int:
        """``start_call`` without sending: several calls then go in one write."""
        sid = self.conn.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.conn.send_headers(sid, self.headers(path, **kw), end_stream=body is None and end)  # type: ignore[arg-type]
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        return sid

    async def pump(self) -> bool:
        """Read once from the server; False at EOF."""
        data = await self.stream.receive_some(65536)
        if not data:
            return False
        for ev in self.conn.receive_data(data):
            sid = getattr(ev, "stream_id", None)
            r = self.responses.get(sid) if sid else None
            if isinstance(ev, h2.events.ResponseReceived) and r is not None:
                r.headers = dict(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.TrailersReceived) and r is not None:
                r.trailers = dict(ev.headers)  # type: ignore[arg-type]
            elif isinstance(ev, h2.events.DataReceived) and r is not None:
                r.data += ev.data or b""
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded) and r is not None:
                r.ended = True
            elif isinstance(ev, h2.events.StreamReset) and r is not None:
                r.reset_code = ev.error_code
                r.ended = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.goaway = True
                self.goaway_code = ev.error_code
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                self.remote_settings_seen.set()
        await self.flush()
        return True

    async def wait(self, sid: int) -> Response:
        r = self.responses[sid]
        while not r.ended:
            if not await self.pump():
                raise EOFError("server closed the connection")
        return r

    async def call(self, path: str, body: bytes | None, **kw: object) -> Response:
        return await self.wait(await self.start_call(path, body, **kw))

    async def send_raw_headers(self, headers: list[tuple[bytes, bytes]], body: bytes | None) -> int:
        """Open a stream with exactly this header list (a lenient client sends
        it unchecked), then the body if any; return the stream id."""
        sid = self.conn.get_next_available_stream_id()
        self.responses[sid] = Response()
        self.conn.send_headers(sid, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        await self.flush()
        return sid

    async def read_to_eof(self) -> None:
        """Read until the server closes the connection."""
        while await self.pump():
            pass
