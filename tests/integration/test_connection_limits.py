"""Connections that never finish their HTTP/2 handshake, against a real
``prism serve``: 2,000 clients that send half the client preface are all
closed at the handshake timeout (shortened to 3 s here), and a grpcio client
on another connection is served meanwhile, quickly."""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import PrismProcess

HANDSHAKE_TIMEOUT_S = 3.0
HALF_PREFACES = 2000
CONFIG = f"""
workers = 1

[http2]
handshake_timeout_s = {HANDSHAKE_TIMEOUT_S}

[[namespaces]]
name = "mem"
backend = "memory"
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrismProcess]:
    prism = PrismProcess(tmp_path / "data", CONFIG)
    prism.start()
    try:
        yield prism
    finally:
        prism.stop()


def test_half_prefaces_are_closed_at_the_handshake_timeout_while_a_client_is_served(
    server: PrismProcess,
) -> None:
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    closed_after: list[float] = []
    latencies: list[float] = []
    try:
        with grpc.insecure_channel(server.endpoint) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def check() -> None:
                start = time.monotonic()
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.monotonic() - start)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING

            check()
            for i in range(HALF_PREFACES):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                sock.sendall(b"PRI * HTTP/2.0\r\n")  # 16 of the preface's 24 bytes, then nothing
                sock.setblocking(False)
                opened[sock] = time.monotonic()
                selector.register(sock, selectors.EVENT_READ)
                if i % 200 == 0:
                    check()
            next_check = time.monotonic()
            give_up = time.monotonic() + HANDSHAKE_TIMEOUT_S + 30
            while opened and time.monotonic() < give_up:
                for key, _ in selector.select(timeout=0.05):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(65536)  # our SETTINGS first, then the end
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        closed_after.append(time.monotonic() - opened.pop(sock))
                        selector.unregister(sock)
                        sock.close()
                if time.monotonic() >= next_check:
                    check()
                    next_check = time.monotonic() + 0.1
            check()
    finally:
        for sock in opened:
            sock.close()
        selector.close()
    assert not opened, f"{len(opened)} half prefaces still open"
    assert len(closed_after) == HALF_PREFACES
    # Never before the timeout; the last of them within a few seconds of it.
    assert min(closed_after) >= HANDSHAKE_TIMEOUT_S - 0.05
    assert max(closed_after) < HANDSHAKE_TIMEOUT_S + 5
    assert len(latencies) > 20
    assert max(latencies) < 0.5, sorted(latencies)[-5:]
