"""One connection cannot make a real ``prism serve`` worker hold more than its buffer budget.

Issue 11's memory cases, from raw sockets, against one worker with the
default ``[http2]`` budgets (16 MiB per connection): 100 streams trickling
4 MB request bodies, and 100 large answers to a client that never reads.
Each asserts the worker's RSS growth, what the client was allowed to send
or was answered, that a grpcio neighbour on another connection is served
meanwhile, and that RSS comes back once the connection closes.
"""

from __future__ import annotations

import socket
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

from prism.proto import kv_pb2

from .conftest import neighbour, p99, put, sqlite_ns, tenant_toml

MB = 1024 * 1024
PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"


def headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "default.prism"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


class Raw:
    def __init__(self, endpoint: str, *, window: int | None = None) -> None:
        host, port = endpoint.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        if window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.sock.sendall(self.conn.data_to_send())
        self.events: list[h2.events.Event] = []

    def read(self, timeout_s: float) -> bool:
        """One read of what the server sent; False when nothing came in ``timeout_s``."""
        self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        if not data:
            return False
        self.events += self.conn.receive_data(data)
        self.sock.sendall(self.conn.data_to_send())
        return True

    def statuses(self) -> list[str]:
        out = []
        for ev in self.events:
            if isinstance(ev, h2.events.TrailersReceived | h2.events.ResponseReceived):
                status = dict(ev.headers).get(b"grpc-status")
                if status is not None:
                    out.append(status.decode())
        return out


def test_trickled_bodies_are_held_to_the_connection_budget(prism_tree) -> None:  # type: ignore[no-untyped-def]
    # (A burst of 3.9 MB answers is CPU-heavy on a shared 2-core machine: a
    # heartbeat window of 5 s, not the tests' usual 1 s.)
    tree = prism_tree(tenant_toml("default", [sqlite_ns("default")]), heartbeat_timeout_s=5.0)
    (pid,) = {p for pids in tree.worker_pids().values() for p in pids}
    with neighbour(tree) as load:
        time.sleep(0.3)
        before = rss_mb(pid)
        raw = Raw(tree.endpoint)
        body = grpc_frame(b"\x0a\x07default" + b"x" * (4_000_000 - 9))  # 4 MB PutItems, never finished
        sids = []
        for _ in range(100):
            sid = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(sid, headers(PUT))
            sids.append(sid)
        sent = {sid: 0 for sid in sids}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for sid in sids:
                n = min(len(body) - 1 - sent[sid], raw.conn.local_flow_control_window(sid), 16384)
                if n > 0:
                    raw.conn.send_data(sid, body[sent[sid] : sent[sid] + n])
                    sent[sid] += n
            raw.sock.sendall(raw.conn.data_to_send())
            raw.read(0.05)
        peak = rss_mb(pid)
        total = sum(sent.values())
        # What the client could send: the budget, and the initial windows it
        # had before the budget filled (HEADERS were all admitted at once).
        assert total <= 16 * MB + 100 * 65_535, total
        assert sum(1 for n in sent.values() if n == len(body) - 1) <= 4  # whole messages that fit
        assert peak - before < 64, (before, peak)
        raw.sock.close()
        time.sleep(2)
        after = rss_mb(pid)
    assert load.ok > 0 and not load.errors, load.errors[:5]
    assert p99(load) < 1.0
    assert after - before < 32, (before, peak, after)


def test_large_answers_to_a_client_that_never_reads_are_held_to_the_budget(prism_tree) -> None:  # type: ignore[no-untyped-def]
    # (A burst of 3.9 MB answers is CPU-heavy on a shared 2-core machine: a
    # heartbeat window of 5 s, not the tests' usual 1 s.)
    tree = prism_tree(tenant_toml("default", [sqlite_ns("default")]), heartbeat_timeout_s=5.0)
    (pid,) = {p for pids in tree.worker_pids().values() for p in pids}
    put(tree.kv(), "default", "big", b"v", b"z" * 3_900_000)
    with neighbour(tree) as load:
        time.sleep(0.3)
        before = rss_mb(pid)
        raw = Raw(tree.endpoint, window=0)  # it reads nothing
        request = grpc_frame(kv_pb2.GetItemsRequest(namespace="default", id="big").SerializeToString())
        for _ in range(100):
            sid = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(sid, headers(GET))
            raw.conn.send_data(sid, request, end_stream=True)
        raw.sock.sendall(raw.conn.data_to_send())
        peak = before
        for _ in range(30):
            time.sleep(0.1)
            try:
                peak = max(peak, rss_mb(pid))
            except FileNotFoundError:
                raise AssertionError(tree.stderr()[-3000:]) from None
        while raw.read(0.5):
            pass
        statuses = raw.statuses()
        raw.sock.close()
        time.sleep(2)
        after = rss_mb(pid)
    # Those that did not fit beside the unread ones were answered at once.
    assert statuses.count("8") >= 90, statuses
    assert peak - before < 64, (before, peak)
    assert load.ok > 0 and not load.errors, load.errors[:5]
    assert p99(load) < 1.0
    assert after - before < 32, (before, peak, after)
