"""Before the first step: write the records the workload reads, and learn the answers it checks.

Seeding uses the load generator's own connection (``frames``), pipelined
(``WINDOW`` calls in flight), so seeding 100,000 records takes seconds. Then
the answers are checked against what the workload expects: a sample of
``get`` answers must be byte for byte what ``workload`` encodes (else the
check under load would call every right answer wrong); the ``scan`` page and
each ``read_events`` series are fetched once, decoded and checked item by
item, and kept as the bytes later answers are compared with.
"""

from __future__ import annotations

import selectors
import time

import msgspec

from prism.benchmark.frames import Done, Pending, connect
from prism.benchmark.workload import PATHS, Calls, Spec

WINDOW = 64
GET_SAMPLE = 16
TIMEOUT_S = 120.0


class SeedFailed(RuntimeError):
    """The server refused a seed write, or answered a check wrongly."""


def call_all(
    host: str, port: int, calls: list[tuple[str, int, bytes]], authority: str | None = None
) -> list[Done]:
    """Make ``calls`` (op, key, request body), ``WINDOW`` at a time; their endings, in call order."""
    conn = connect(host, port, authority)
    selector = selectors.DefaultSelector()
    selector.register(conn.sock, selectors.EVENT_READ)
    endings: dict[int, Done] = {}
    order: dict[int, int] = {}  # id(Pending) -> index
    deadline = time.monotonic() + TIMEOUT_S
    next_call = 0
    try:
        while len(endings) < len(calls):
            while next_call < len(calls) and conn.in_flight < min(WINDOW, conn.max_streams):
                op, key, body = calls[next_call]
                if not conn.can_send(len(body)):
                    break
                pending = Pending(op, key, time.monotonic())
                order[id(pending)] = next_call
                conn.start(pending, PATHS[op], body)
                next_call += 1
            conn.flush()
            selector.select(0.1)
            for done in conn.receive():
                endings[order.pop(id(done.call))] = done
            if conn.closed is not None and len(endings) < len(calls):
                raise SeedFailed(f"connection to {host}:{port} ended while seeding: {conn.closed}")
            if time.monotonic() > deadline:
                raise SeedFailed(f"seeding took longer than {TIMEOUT_S:g}s")
    finally:
        selector.close()
        conn.close()
    return [endings[i] for i in range(len(calls))]


def seed_and_learn(
    host: str, port: int, spec: Spec, authority: str | None = None, *, write: bool = True
) -> Spec:
    """Write what the workload reads (unless not ``write``: a previous run did), check
    it reads back as expected; the spec with the learned answers."""
    calls = Calls(spec)
    ops = set(spec.weights)
    writes: list[tuple[str, int, bytes]] = []
    if write and ops & {"get", "put", "scan"}:
        writes = [("put", i, calls.build["put"](i)) for i in range(spec.records)]
    elif write and "read_events" in ops:
        writes = [("write_events", i, calls.seed_events(i)) for i in range(spec.records)]
    for done in _batched(host, port, writes, authority):
        if done.status != "OK":
            raise SeedFailed(f"seeding {done.call.op} key {done.call.key} answered {done.status}")
    learned: dict[str, dict[int, bytes]] = {}
    if "get" in ops or "put" in ops:
        sample = [("get", i, calls.build["get"](i)) for i in range(min(GET_SAMPLE, spec.records))]
        for done in call_all(host, port, sample, authority):
            got, wanted = bytes(done.call.data), calls.expected_get(done.call.key)
            if done.status != "OK" or got != wanted:
                raise SeedFailed(
                    f"GetItems of record {done.call.key} answered {done.status} {got[:80]!r}, "
                    f"expected {wanted[:80]!r}"
                )
    if "scan" in ops:
        (done,) = call_all(host, port, [("scan", 0, calls.build["scan"](0))], authority)
        if done.status != "OK" or not calls.scan_ok(bytes(done.call.data)):
            raise SeedFailed(
                f"ScanItems answered {done.status} {bytes(done.call.data[:80])!r}: not the seeded records"
            )
        learned["scan"] = {0: bytes(done.call.data)}
    if "read_events" in ops:
        reads = [("read_events", i, calls.build["read_events"](i)) for i in range(spec.records)]
        answers: dict[int, bytes] = {}
        for done in _batched(host, port, reads, authority):
            answer = bytes(done.call.data)
            if done.status != "OK" or not calls.read_events_ok(done.call.key, answer):
                raise SeedFailed(
                    f"ReadEvents of series s{done.call.key} answered {done.status} {answer[:80]!r}: "
                    "not the seeded events"
                )
            answers[done.call.key] = answer
        learned["read_events"] = answers
    return msgspec.structs.replace(spec, learned=learned)


def _batched(
    host: str, port: int, calls: list[tuple[str, int, bytes]], authority: str | None, size: int = 10_000
) -> list[Done]:
    out: list[Done] = []
    for start in range(0, len(calls), size):
        out += call_all(host, port, calls[start : start + size], authority)
    return out
