"""Workers that share the listening socket share a burst of new connections:
each takes a few and lets its siblings take theirs (``prism.rpc.listen``)."""

from __future__ import annotations

import os
import select
import socket
import time

from .conftest import PrismTree, sqlite_ns, tenant_toml

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _sockets(pid: int) -> int:
    fds = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


def test_a_burst_of_connections_is_shared_by_the_workers(prism_tree) -> None:
    # Two workers; 8 clients connect at once. Before, each worker read at boot
    # a table that listed itself alone, took every waiting connection in one
    # pass, and a whole burst went to whichever woke first.
    tree: PrismTree = prism_tree(tenant_toml("t", [sqlite_ns("s")], workers=2))
    (workers,) = tree.worker_pids().values()
    assert len(workers) == 2
    before = {pid: _sockets(pid) for pid in workers}
    host, port = tree.endpoint.rsplit(":", 1)
    # All 8 at once, as a client pool (or h2load) opens them: non-blocking
    # connects, then the prefaces.
    clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(8)]
    try:
        for client in clients:
            client.setblocking(False)
            client.connect_ex((host, int(port)))
        select.select([], clients, [], 5)
        for client in clients:
            client.setblocking(True)
            client.sendall(PREFACE)
        time.sleep(0.5)
        gained = {pid: _sockets(pid) - before[pid] for pid in workers}
    finally:
        for client in clients:
            client.close()
    assert sum(gained.values()) == 8, gained
    assert all(n >= 1 for n in gained.values()), gained
