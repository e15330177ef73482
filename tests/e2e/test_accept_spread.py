"""Connections opened at once to a tenant of several workers are spread over
them (``prism.rpc.accept_share``); a stalled worker holds none of them back."""

from __future__ import annotations

import math
import os
import select
import socket
import time
from collections import Counter

import h2.config
import h2.connection
import h2.events

from prism.proto import kv_pb2

from .conftest import sqlite_ns, tenant_toml

GET_ITEMS = "/prism.kv.v1.KeyValue/GetItems"


def _open_at_once(port: int, n: int) -> list[socket.socket]:
    """``n`` connections to ``port``, all connects sent before any completes."""
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(sock)
    for sock in socks:
        _, writable, _ = select.select([], [sock], [], 5)
        assert writable, "connect did not complete"
        sock.setblocking(True)
        sock.settimeout(10)
    return socks


def _call_on_each(socks: list[socket.socket], authority: str) -> list[str]:
    """A GetItems on every connection, all sent before any answer is read; each one's grpc-status."""
    body = kv_pb2.GetItemsRequest(namespace="kv", id="r").SerializeToString()
    message = b"\0" + len(body).to_bytes(4, "big") + body
    conns = []
    for sock in socks:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "POST"), (":scheme", "http"), (":path", GET_ITEMS), (":authority", authority),
                ("content-type", "application/grpc"), ("te", "trailers"),
            ],
        )  # fmt: skip
        conn.send_data(1, message, end_stream=True)
        sock.sendall(conn.data_to_send())
        conns.append(conn)
    statuses = []
    for sock, conn in zip(socks, conns, strict=True):
        status = None
        while status is None:
            data = sock.recv(65536)
            assert data, "connection closed before its answer"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.TrailersReceived):
                    status = dict(event.headers).get(b"grpc-status", b"?").decode()
                elif isinstance(event, h2.events.StreamReset):
                    status = f"reset {event.error_code}"
            sock.sendall(conn.data_to_send())
        statuses.append(status)
    return statuses


def _holders(server_port: int, socks: list[socket.socket], pids: set[int]) -> Counter[int | None]:
    """How many of the client sockets ``socks`` each pid holds the server end of (None: none of ``pids``)."""
    client_ports = {s.getsockname()[1] for s in socks}
    inodes: dict[str, int] = {}  # server-end socket inode -> client port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port in client_ports and fields[3] == "01":
                inodes[fields[9]] = remote_port
    held: dict[int, int] = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held[inodes[target[8:-1]]] = pid
    return Counter(held.get(port) for port in client_ports)


def test_connections_opened_at_once_are_spread_over_the_tenants_workers(prism_tree) -> None:
    # As a client pool starting: 8 connections at once, a call on each, closed;
    # three times (each burst meets workers holding none).
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")], workers=2))
    pids = tree.worker_pids()["t"]
    assert len(pids) == 2, pids
    n = 8
    spreads = []
    for _ in range(3):
        socks = _open_at_once(tree.port, n)
        try:
            assert _call_on_each(socks, "t.prism") == ["0"] * n
            spreads.append(_holders(tree.port, socks, pids))
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.2)  # the workers see the closes
    for held in spreads:
        assert None not in held, spreads  # every connection is held by one of the two workers
        assert set(held) == pids, f"one worker took every connection: {spreads}"
        assert max(held.values()) <= math.ceil(n / len(pids)) + 1, spreads


def test_a_stalled_worker_holds_back_no_connection(prism_tree) -> None:
    # Its count says it holds fewer than its sibling, which leaves connections
    # to it only briefly (LEAVE_S each), then takes them.
    tree = prism_tree(tenant_toml("t", [sqlite_ns("kv")], workers=2), heartbeat_timeout_s=30.0)
    pids = tree.worker_pids()["t"]
    stalled, serving = sorted(pids)
    tree.stop_worker(stalled)
    n = 8
    started = time.monotonic()
    socks = _open_at_once(tree.port, n)
    try:
        assert _call_on_each(socks, "t.prism") == ["0"] * n
        elapsed = time.monotonic() - started
        held = _holders(tree.port, socks, pids)
    finally:
        for sock in socks:
            sock.close()
    assert held == {serving: n}, held
    assert elapsed < 2.0, elapsed
