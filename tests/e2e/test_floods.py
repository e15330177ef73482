"""HTTP/2 floods against a real ``prism serve`` worker, from raw sockets.

While one connection floods, a grpcio client on another connection of the
same (single) worker keeps being answered; the flooder gets
GOAWAY(ENHANCE_YOUR_CALM) if it reads, and is closed either way.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
from hyperframe.frame import HeadersFrame, PingFrame, RstStreamFrame

from prism.rpc import flood

from .conftest import Load, get, put, sqlite_ns, tenant_toml

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM

GET = "/prism.kv.v1.KeyValue/GetItems"
HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", GET),
    (":authority", "default.prism"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
]


class RawClient:
    """An HTTP/2 client on a plain socket that writes whatever it is told."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())

    def open_stream(self) -> None:
        """Start a call and leave it open (no body yet)."""
        self.conn.send_headers(1, HEADERS)
        self.sock.sendall(self.conn.data_to_send())

    @staticmethod
    def rapid_resets(n: int) -> bytes:
        """``n`` requests, each reset at once (on a connection with no stream yet)."""
        encoder = hpack.Encoder()
        out = bytearray()
        for sid in range(1, 2 * n, 2):
            block = encoder.encode(HEADERS)  # the same bytes from the second on
            out += HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            out += RstStreamFrame(sid, error_code=8).serialize()
        return bytes(out)

    def send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass  # closed by the server before all of it was sent

    def goaway(self, timeout_s: float = 10.0) -> h2.events.ConnectionTerminated | None:
        """Read until the server closes; its GOAWAY, if one came."""
        found = None
        self.sock.settimeout(timeout_s)
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            for ev in self.conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    found = ev
        return found

    def close(self) -> None:
        self.sock.close()


def _neighbour(tree) -> Load:
    stub = tree.kv()
    put(stub, "default", "n", b"k", b"v")
    latencies: list[float] = []

    def work(index: int, n: int) -> None:
        t0 = time.perf_counter()
        get(stub, "default", "n", timeout=5)
        latencies.append(time.perf_counter() - t0)

    load = Load(2, work)
    load.latencies = latencies  # type: ignore[attr-defined]
    return load


def test_floods_end_in_goaway_while_a_neighbour_is_served(prism_tree) -> None:
    tree = prism_tree(tenant_toml("default", [sqlite_ns("default")]))
    with _neighbour(tree) as load:
        time.sleep(0.3)
        # Rapid reset, read by the flooder: GOAWAY(ENHANCE_YOUR_CALM) too_many_resets.
        resetter = RawClient(tree.endpoint)
        sender = threading.Thread(target=resetter.send_quietly, args=(RawClient.rapid_resets(200_000),))
        sender.start()
        ev = resetter.goaway()  # read meanwhile, as a client does
        sender.join(10)
        resetter.close()
        assert ev is not None
        assert (ev.error_code, ev.additional_data) == (CALM, flood.RAPID_RESET)
        assert ev.last_stream_id <= 2 * (flood.RAPID_RESET_MIN_STREAMS // 2 + 2) + 1

        # A PING flood from a client that never reads, a call open (so it is
        # the control-frame count that ends it): closed all the same.
        pinger = RawClient(tree.endpoint)
        pinger.open_stream()
        ping = PingFrame(0, opaque_data=b"12345678").serialize() * 1000
        closed = threading.Event()

        def send_pings() -> None:
            try:
                for _ in range(1000):  # 1,000,000 PINGs
                    pinger.sock.sendall(ping)
            except OSError:
                closed.set()

        sender = threading.Thread(target=send_pings, daemon=True)
        sender.start()
        sender.join(20)
        assert closed.is_set(), "the server kept reading a PING flood"
        pinger.close()
        time.sleep(0.3)
    assert load.ok > 0 and not load.errors, load.errors[:5]
    latencies = sorted(load.latencies)  # type: ignore[attr-defined]
    p99 = latencies[int(len(latencies) * 0.99)]
    assert p99 < 1.0, (p99, statistics.median(latencies))
