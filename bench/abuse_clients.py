"""The abusive clients of ``bench/abuse.py``, one per case, run as its child.

    python bench/abuse_clients.py CASE PORT      # prints the case's JSON result

Each writes raw HTTP/2 on plain sockets (frames built with hyperframe, h2
or hpack), in a process of its own so that its work shares no GIL with the
neighbour ``abuse.py`` measures. What each case sends is in ``abuse.py``'s
docstring; the constants here are shared with it.
"""

from __future__ import annotations

import json
import resource
import socket
import sys
import threading
import time
from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
from bench_servers import GET_ITEMS
from grpc_reflection.v1alpha import reflection_pb2
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from prism.proto import common_pb2, kv_pb2

NAMESPACE = "bench"
PUT_ITEMS = "/prism.kv.v1.KeyValue/PutItems"
SCAN_ITEMS = "/prism.kv.v1.KeyValue/ScanItems"
REFLECTION_INFO = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
CASES = (
    "rapid_reset",
    "ping_flood",
    "settings_flood",
    "window_update_flood",
    "empty_data",
    "half_prefaces",
    "slow_bodies",
    "no_read_scans",
    "stream_flood",
)
CASE_TIMEOUT_S = 30.0
HOLD_S = {"half_prefaces": 15.0, "slow_bodies": 5.0, "no_read_scans": 5.0, "stream_flood": 5.0}
SCAN_STREAMS = 100
SCAN_PAGE_BYTES = 4_000_000  # the server caps it at its page limit (~3.9 MB with 4 MiB messages)
STREAM_FLOOD_STREAMS = 100
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def request_headers(path: str = GET_ITEMS) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "bench"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


# ---------------------------------------------------------------- the clients


class Raw:
    """A client connection that writes frames as told and reads in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        self.sock.sendall(conn.data_to_send())
        self.encoder = hpack.Encoder()
        self.encoded = 0
        self.block = b""
        self.goaway: dict[str, Any] | None = None
        self.ended_at: float | None = None

    def start_reading(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = bytearray()
        try:
            while data := self.sock.recv(1 << 20):
                buf += data
                pos = 0
                while len(buf) - pos >= 9:
                    length = int.from_bytes(buf[pos : pos + 3], "big")
                    if len(buf) - pos < 9 + length:
                        break
                    if buf[pos + 3] == 0x7 and self.goaway is None:  # GOAWAY
                        body = bytes(buf[pos + 9 : pos + 9 + length])
                        self.goaway = {
                            "error_code": int.from_bytes(body[4:8], "big"),
                            "debug": body[8:].decode("latin-1"),
                            "last_stream_id": int.from_bytes(body[:4], "big") & 0x7FFFFFFF,
                        }
                        self.ended_at = time.monotonic()
                    pos += 9 + length
                del buf[:pos]
        except OSError:
            pass
        if self.ended_at is None:
            self.ended_at = time.monotonic()

    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            if self.ended_at is None:
                self.ended_at = time.monotonic()
            return False

    def headers(self, sid: int, *, end: bool) -> bytes:
        """A GetItems request's HEADERS (the block is the same bytes from the second on)."""
        if self.encoded < 2:
            self.block = self.encoder.encode(request_headers())
            self.encoded += 1
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return HeadersFrame(sid, data=self.block, flags=flags).serialize()


def flood(port: int, case: str) -> dict[str, Any]:
    raw = Raw(port)
    if case != "ping_flood":  # the PING flooder never reads
        raw.start_reading()
    start = time.monotonic()
    if case == "rapid_reset":
        chunk = bytearray()
        sending = True
        for sid in range(1, 400_000, 2):
            chunk += raw.headers(sid, end=True) + RstStreamFrame(sid, error_code=8).serialize()
            if len(chunk) > 1 << 16:
                sending = raw.send(bytes(chunk))
                chunk.clear()
                if not sending:
                    break
        if sending and chunk:
            raw.send(bytes(chunk))
    elif case == "ping_flood":
        raw.send(raw.headers(1, end=False))
        pings = PingFrame(0, opaque_data=b"abusive!").serialize() * 1000
        for _ in range(1000):
            if not raw.send(pings):
                break
    elif case == "settings_flood":
        settings = SettingsFrame(0).serialize() * 1000
        for _ in range(50):
            if not raw.send(settings):
                break
    elif case == "window_update_flood":
        updates = WindowUpdateFrame(0, window_increment=1).serialize() * 1000
        for _ in range(100):
            if not raw.send(updates):
                break
    elif case == "empty_data":
        raw.send(raw.headers(1, end=False))
        empty = DataFrame(1).serialize() * 1000
        for _ in range(100):
            if not raw.send(empty):
                break
    deadline = start + CASE_TIMEOUT_S
    while raw.ended_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.sock.close()
    return {
        "goaway": raw.goaway,
        "seconds_to_end": None if raw.ended_at is None else round(raw.ended_at - start, 3),
    }


def half_prefaces(port: int) -> dict[str, Any]:
    socks = []
    for i in range(4000):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(PREFACE[:12] if i % 2 else PREFACE + SettingsFrame(0).serialize())
        sock.setblocking(False)
        socks.append(sock)
    start = time.monotonic()
    closed_at: dict[int, float] = {}
    while time.monotonic() - start < HOLD_S["half_prefaces"] and len(closed_at) < len(socks):
        for i, sock in enumerate(socks):
            if i in closed_at:
                continue
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        closed_at[i] = time.monotonic()
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic()
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    ends = sorted(t - start for t in closed_at.values())
    return {
        "connections": len(socks),
        "closed_by_server": len(ends),
        "seconds_to_end": round(ends[-1], 3) if len(ends) == len(socks) else None,
    }


def slow_bodies(port: int) -> dict[str, Any]:
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = (4 * 1024 * 1024).to_bytes(5, "big") + bytes(4 * 1024 * 1024 - 1)  # one byte short
    pending: dict[int, memoryview] = {}
    for _ in range(100):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, request_headers(PUT_ITEMS))
        pending[sid] = memoryview(body)
    start = progress = time.monotonic()
    sock.settimeout(0.05)
    # Until every body is sent, or the server has given no window for 2 s
    # (its buffer budget holds the rest back: the client stalls there).
    while pending and time.monotonic() - start < CASE_TIMEOUT_S and time.monotonic() - progress < 2.0:
        for sid, rest in list(pending.items()):
            n = min(len(rest), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n > 0:
                conn.send_data(sid, rest[:n].tobytes())
                pending[sid] = rest[n:]
                progress = time.monotonic()
            if not pending[sid]:
                del pending[sid]
        sock.sendall(conn.data_to_send())
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        conn.receive_data(data)
    sent_s = time.monotonic() - start
    time.sleep(HOLD_S["slow_bodies"])
    sock.close()
    return {
        "streams": 100,
        "bytes_left_unsent": sum(len(v) for v in pending.values()),
        "seconds_to_send": round(sent_s, 3),
    }


def no_read_scans(port: int) -> dict[str, Any]:
    """100 ScanItems at once on one connection, each asking for a page as
    large as the server gives (the measurer seeds ~4 MB), and nothing read
    back: not a byte from the socket, so no WINDOW_UPDATE either (h2's
    default 64 KiB windows). Held ``HOLD_S`` seconds, then closed."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    selection = common_pb2.Selection(limit_bytes=SCAN_PAGE_BYTES)
    message = kv_pb2.ScanItemsRequest(namespace=NAMESPACE, selection=selection).SerializeToString()
    body = len(message).to_bytes(5, "big") + message
    for _ in range(SCAN_STREAMS):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, request_headers(SCAN_ITEMS))
        conn.send_data(sid, body, end_stream=True)
    start = time.monotonic()
    sock.sendall(conn.data_to_send())
    time.sleep(HOLD_S["no_read_scans"])
    sock.close()
    return {"streams": SCAN_STREAMS, "held_s": round(time.monotonic() - start, 3)}


def stream_flood(port: int) -> dict[str, Any]:
    """100 ServerReflectionInfo streams on one connection, each fed small
    requests as fast as the server's flow control lets them through, for
    ``HOLD_S`` seconds. The answers are never consumed: the socket is read
    for the server's WINDOW_UPDATEs, but no DATA it sends is acknowledged,
    so its answers wait in the server once our 64 KiB windows are full."""
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    message = reflection_pb2.ServerReflectionRequest(list_services="*").SerializeToString()
    one = len(message).to_bytes(5, "big") + message
    chunk = one * (16_000 // len(one))  # about a frame of messages
    sids = []
    for _ in range(STREAM_FLOOD_STREAMS):
        sids.append(sid := conn.get_next_available_stream_id())
        conn.send_headers(sid, request_headers(REFLECTION_INFO))
    sock.sendall(conn.data_to_send())
    start = time.monotonic()
    sent = 0
    ended: str | None = None
    while time.monotonic() - start < HOLD_S["stream_flood"] and ended is None:
        before = sent
        for sid in sids:
            stream = conn.streams.get(sid)
            if stream is None or stream.closed:
                continue
            room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            n = room - room % len(one)  # whole messages only
            if n > 0:
                conn.send_data(sid, chunk[:n])
                sent += n
        try:
            sock.settimeout(None)
            sock.sendall(conn.data_to_send())
            # Wait for window only when none was left; else take what came.
            sock.settimeout(0.01 if sent == before else 0.0)
            data = sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            continue
        except OSError as exc:
            ended = type(exc).__name__
            break
        if not data:
            ended = "closed by the server"
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                ended = f"GOAWAY {event.error_code} {event.additional_data!r}"
    sock.close()
    return {
        "streams": STREAM_FLOOD_STREAMS,
        "request_mb_sent": round(sent / 1e6, 1),
        "seconds": round(time.monotonic() - start, 3),
        "ended": ended,
    }


def main(argv: list[str]) -> int:
    case, port = argv[0], int(argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    if case == "half_prefaces":
        result = half_prefaces(port)
    elif case == "slow_bodies":
        result = slow_bodies(port)
    elif case == "no_read_scans":
        result = no_read_scans(port)
    elif case == "stream_flood":
        result = stream_flood(port)
    else:
        result = flood(port, case)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
