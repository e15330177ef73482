"""HTTP/2 floods against a real ``prism serve`` worker, from raw sockets.

While one connection floods, a grpcio client on another connection of the
same (single) worker keeps being answered; the flooder gets
GOAWAY(ENHANCE_YOUR_CALM) if it reads, and is closed either way.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
from hyperframe.frame import HeadersFrame, PingFrame, RstStreamFrame, WindowUpdateFrame

from prism.proto import kv_pb2_grpc
from prism.rpc import flood

from .conftest import get, neighbour, p99, put, sqlite_ns, tenant_toml

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


def test_floods_end_in_goaway_while_a_neighbour_is_served(prism_tree) -> None:
    tree = prism_tree(tenant_toml("default", [sqlite_ns("default")]))
    with neighbour(tree, threads=2) as load:
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

        # A WINDOW_UPDATE flood on a connection with no stream and nothing
        # sent to it (Envoy's allowance: 1).
        updater = RawClient(tree.endpoint)
        updater.send_quietly(WindowUpdateFrame(0, window_increment=1).serialize() * 100_000)
        ev = updater.goaway()
        updater.close()
        assert ev is not None
        assert (ev.error_code, ev.additional_data) == (CALM, flood.WINDOW_UPDATE_FLOOD)

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
    assert p99(load) < 1.0, p99(load)


class FrameCountingProxy:
    """A TCP proxy for one connection that counts the client's frames by type."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.counts: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.upstream)
        back = threading.Thread(target=self._pipe, args=(server, client, False), daemon=True)
        back.start()
        self.threads.append(back)
        self._pipe(client, server, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = bytearray()
        skip = 24  # the client preface
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if not count:
                    continue
                pending += data
                while True:
                    if skip:
                        n = min(skip, len(pending))
                        del pending[:n]
                        skip -= n
                        if skip:
                            break
                    if len(pending) < 9:
                        break
                    length = int.from_bytes(pending[:3], "big")
                    self.counts[pending[3]] = self.counts.get(pending[3], 0) + 1
                    del pending[:9]
                    skip = length
        except OSError:
            pass
        finally:
            dst.close()
            src.close()

    def close(self) -> None:
        self.listener.close()
        for thread in self.threads:
            thread.join(5)


WINDOW_UPDATE = 0x8


def test_a_grpcio_client_reading_large_answers_is_not_cut(prism_tree) -> None:
    """grpcio acknowledges what it reads with WINDOW_UPDATEs, many more than
    two per stream when answers are large: the DATA frames sent allow them."""
    tree = prism_tree(tenant_toml("default", [sqlite_ns("default")]))
    value = bytes(range(256)) * 3 * 4096  # 3 MiB
    put(tree.kv(), "default", "big", b"k", value)
    proxy = FrameCountingProxy(tree.endpoint)
    # Without BDP probing grpc-core keeps its 64 KiB windows and sends a
    # WINDOW_UPDATE every few of our DATA frames: over ten per answer (measured).
    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.http2.bdp_probe", 0)]
    channel = grpc.insecure_channel(proxy.endpoint, options=options)
    try:
        stub = kv_pb2_grpc.KeyValueStub(channel)
        calls = 20
        for _ in range(calls):
            assert get(stub, "default", "big")[b"k"] == value
    finally:
        channel.close()
        proxy.close()
    updates = proxy.counts.get(WINDOW_UPDATE, 0)
    assert updates > 3 * (1 + 2 * calls), proxy.counts  # far beyond what its streams alone allow
