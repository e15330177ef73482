"""The shared-memory routing table: a reader sees a table the supervisor published, or the last good one."""

from __future__ import annotations

import mmap
import multiprocessing
import struct
import time
from multiprocessing.connection import Connection

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism.router.table import (
    NamespaceEntry,
    Routes,
    RoutingTableReader,
    RoutingTableTooLarge,
    RoutingTableUnavailable,
    RoutingTableWriter,
    WorkerEntry,
)

# The documented layout (see prism/router/table.py): tests poke at it on purpose.
SEQ_OFFSET = 8
GENERATION_OFFSET = 16
HEADER_BYTES = 64
SLOT_HEADER_BYTES = 32


def make_routes(generation: int, pad: int = 0) -> Routes:
    """A table whose every part is derived from its generation, so a mixed-up read shows."""
    tenants = [f"t{generation % 3}", "shared"]
    namespaces = {
        f"ns{i}": NamespaceEntry(
            name=f"ns{i}",
            tenant=tenants[i % 2],
            abstraction="keyvalue",
            backend="sqlite" if i % 2 else "redis",
            cache={"enabled": True, "ttl_s": float(generation), "index": i, "pad": "x" * pad},
            limits={"generation": generation},
        )
        for i in range(1 + generation % 5)
    }
    workers = {
        wid: WorkerEntry(
            id=wid,
            tenant=tenants[wid % 2],
            pid=1000 * generation + wid,
            forward_address=f"ipc:///tmp/prism-{generation}-{wid}.fwd",
            handoff_address=f"/tmp/prism-{generation}-{wid}.sock",
            serving=wid != 0,
        )
        for wid in range(3)
    }
    return Routes(generation=generation, namespaces=namespaces, workers=workers)


def inconsistency(routes: Routes) -> str | None:
    """Why ``routes`` is not one ``make_routes`` table (None if it is one)."""
    g = routes.generation
    if len(routes.namespaces) != 1 + g % 5:
        return f"generation {g}: {len(routes.namespaces)} namespaces"
    for name, entry in routes.namespaces.items():
        if entry.name != name or entry.limits["generation"] != g or entry.cache["ttl_s"] != float(g):
            return f"generation {g}: namespace {name} is {entry!r}"
    for wid, worker in routes.workers.items():
        if worker.id != wid or worker.pid != 1000 * g + wid or f"-{g}-" not in worker.forward_address:
            return f"generation {g}: worker {wid} is {worker!r}"
    return None


def put_u64(buffer: bytearray, offset: int, value: int) -> None:
    struct.pack_into("<Q", buffer, offset, value)


def active_payload_offset(buffer: bytearray) -> int:
    active: int = struct.unpack_from("<I", buffer, 4)[0]
    slot_bytes = (len(buffer) - HEADER_BYTES) // 2 // 64 * 64
    return HEADER_BYTES + active * slot_bytes + SLOT_HEADER_BYTES


@pytest.fixture
def pair() -> tuple[RoutingTableWriter, RoutingTableReader, bytearray]:
    buffer = bytearray(64 * 1024)
    return RoutingTableWriter(buffer), RoutingTableReader(buffer), buffer


def test_round_trip(pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray]) -> None:
    writer, reader, _ = pair
    routes = make_routes(1)
    writer.publish(routes)
    assert reader.current() == routes
    assert reader.generation() == 1
    assert reader.failures == 0


def test_round_trip_over_shared_mmap() -> None:
    writer = RoutingTableWriter.create(1024 * 1024)
    reader = RoutingTableReader(writer.buffer)
    try:
        writer.publish(make_routes(7))
        assert reader.current() == make_routes(7)
    finally:
        reader.close()
        writer.close()


def test_no_table_yet_is_unavailable(pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray]) -> None:
    _, reader, _ = pair
    with pytest.raises(RoutingTableUnavailable, match="no valid routing table"):
        reader.current()
    # A reader over a never-initialised (all zero) buffer says the same.
    with pytest.raises(RoutingTableUnavailable):
        RoutingTableReader(bytearray(8192)).current()


def test_new_generation_is_picked_up(pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray]) -> None:
    writer, reader, _ = pair
    for generation in (1, 2, 3, 10):
        writer.publish(make_routes(generation))
        assert reader.current() == make_routes(generation)
    assert reader.failures == 0


def test_unchanged_generation_returns_the_same_object(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, _ = pair
    writer.publish(make_routes(1))
    first = reader.current()
    assert reader.current() is first
    assert reader.current() is first
    writer.publish(make_routes(2))
    second = reader.current()
    assert second is not first
    assert reader.current() is second


def test_odd_seqlock_keeps_last_good_table(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    assert reader.current() == make_routes(1)
    writer.publish(make_routes(2))
    seq = struct.unpack_from("<Q", buffer, SEQ_OFFSET)[0]
    put_u64(buffer, SEQ_OFFSET, seq + 1)  # as if the supervisor stopped between its two increments
    assert reader.current() == make_routes(1)
    assert reader.failures == 1
    assert "writing" in reader.last_error
    put_u64(buffer, SEQ_OFFSET, seq)  # the supervisor finishes
    assert reader.current() == make_routes(2)


def test_payload_changed_after_checksum_keeps_last_good_table(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    reader.current()
    writer.publish(make_routes(2))
    buffer[active_payload_offset(buffer) + 5] ^= 0x01
    assert reader.current() == make_routes(1)
    assert reader.failures == 1
    assert "checksum" in reader.last_error
    writer.publish(make_routes(3))
    assert reader.current() == make_routes(3)


def test_corrupt_table_is_not_retried_on_every_call(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    reader.current()
    writer.publish(make_routes(2))
    buffer[active_payload_offset(buffer)] ^= 0xFF
    for _ in range(100):
        assert reader.current() == make_routes(1)
    assert reader.failures == 1  # one refresh failed, not one per call


def test_header_generation_mismatch_keeps_last_good_table(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    reader.current()
    put_u64(buffer, GENERATION_OFFSET, 99)
    assert reader.generation() == 99  # the cheap hint is raw...
    assert reader.current() == make_routes(1)  # ...the table is checked
    assert reader.failures == 1


def test_buffer_of_another_layout_is_refused(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    buffer[3] = 0x02  # a future layout version: its slots must not be read as this one's
    with pytest.raises(RoutingTableUnavailable, match="bad magic"):
        reader.current()


def test_first_table_corrupt_is_unavailable(
    pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray],
) -> None:
    writer, reader, buffer = pair
    writer.publish(make_routes(1))
    buffer[active_payload_offset(buffer)] ^= 0x10
    with pytest.raises(RoutingTableUnavailable, match="checksum"):
        reader.current()
    writer.publish(make_routes(2))
    assert reader.current() == make_routes(2)


def test_table_too_large_is_refused_and_old_table_stays() -> None:
    buffer = bytearray(4096)
    writer, reader = RoutingTableWriter(buffer), RoutingTableReader(buffer)
    writer.publish(make_routes(1))
    with pytest.raises(RoutingTableTooLarge, match=r"encodes to \d+ bytes; a slot holds \d+"):
        writer.publish(make_routes(2, pad=4096))
    assert writer.generation == 1
    assert reader.current() == make_routes(1)


def test_generation_must_increase(pair: tuple[RoutingTableWriter, RoutingTableReader, bytearray]) -> None:
    writer, _, _ = pair
    writer.publish(make_routes(5))
    with pytest.raises(ValueError, match="not above the published 5"):
        writer.publish(make_routes(5))
    with pytest.raises(ValueError):
        writer.publish(make_routes(0, pad=1))


def test_owners_are_the_tenants_workers_by_id() -> None:
    routes = make_routes(3)  # ns0 -> tenant t0 (workers 0, 2); ns1 -> "shared" (worker 1)
    assert [w.id for w in routes.owners("ns0")] == [0, 2]
    assert [w.id for w in routes.owners("ns1")] == [1]
    assert routes.owners("missing") == []
    assert [w.id for w in routes.tenant_workers("shared")] == [1]
    assert routes.tenant_workers("nobody") == []


# -- corruption anywhere, between publishes ---------------------------------------------------

FUZZ_SIZE = 4096
FUZZ_SLOT1 = HEADER_BYTES + (FUZZ_SIZE - HEADER_BYTES) // 2 // 64 * 64

publish_op = st.just(("publish", 0, b""))
flip_op = st.tuples(st.just("flip"), st.integers(0, FUZZ_SIZE - 1), st.binary(min_size=1, max_size=1))
write_op = st.tuples(st.just("write"), st.integers(0, FUZZ_SIZE - 1), st.binary(min_size=1, max_size=64))
# Aim some writes at the header and the slot headers, where one byte matters most.
header_op = st.tuples(
    st.just("write"),
    st.sampled_from(
        [0, 4, 8, 16, HEADER_BYTES, HEADER_BYTES + 8, HEADER_BYTES + 16, FUZZ_SLOT1, FUZZ_SLOT1 + 8]
    ),
    st.binary(min_size=1, max_size=8),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(publish_op, flip_op, write_op, header_op), min_size=1, max_size=40))
def test_corruption_never_yields_an_unpublished_table(ops: list[tuple[str, int, bytes]]) -> None:
    buffer = bytearray(FUZZ_SIZE)
    writer, reader = RoutingTableWriter(buffer), RoutingTableReader(buffer)
    published: dict[int, Routes] = {}
    read_once = False
    for kind, offset, data in ops:
        if kind == "publish":
            routes = make_routes(len(published) + 1)
            writer.publish(routes)
            published[routes.generation] = routes
        elif kind == "flip":
            buffer[offset] ^= data[0] or 0x01
        else:
            buffer[offset : offset + len(data)] = data[: FUZZ_SIZE - offset]
        reader.generation()  # a raw read: must not fail whatever the bytes
        try:
            seen = reader.current()
        except RoutingTableUnavailable:
            assert not read_once, "a reader that once had a table must keep one"
            continue
        read_once = True
        assert published.get(seen.generation) == seen
        if kind == "publish":
            # Nothing was corrupted since this publish: the reader must have it.
            assert seen == published[max(published)]


# -- a real reader process while the supervisor publishes ------------------------------------

PUBLISHES = 200


def reader_process(buffer: mmap.mmap, conn: Connection) -> None:
    """Read continuously until the last generation; send (error or None, generations seen, failures)."""
    reader = RoutingTableReader(buffer)
    seen: set[int] = set()
    error: str | None = None
    deadline = time.monotonic() + 15
    last = 0
    try:
        while time.monotonic() < deadline:
            try:
                routes = reader.current()
            except RoutingTableUnavailable:
                continue
            if routes.generation not in seen:
                if not seen:
                    conn.send("ready")
                seen.add(routes.generation)
                error = inconsistency(routes)
                if error is None and routes.generation < last:
                    error = f"generation went back from {last} to {routes.generation}"
                if error is not None:
                    break
                last = routes.generation
            if routes.generation == PUBLISHES:
                break
        else:
            error = f"did not see generation {PUBLISHES} in time (last {last})"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    conn.send((error, len(seen), reader.failures))
    conn.close()


def test_reader_process_sees_only_whole_tables_while_supervisor_publishes() -> None:
    ctx = multiprocessing.get_context("fork")
    writer = RoutingTableWriter.create(1024 * 1024)
    parent_conn, child_conn = ctx.Pipe()
    writer.publish(make_routes(1, pad=3000))
    child = ctx.Process(target=reader_process, args=(writer.buffer, child_conn), daemon=True)
    child.start()
    try:
        child_conn.close()
        assert parent_conn.poll(10), "reader process did not start reading"
        assert parent_conn.recv() == "ready"
        # Large, varying payloads make the reader's copy slow enough for the
        # supervisor to overwrite the slot under it, which it must detect. The
        # short sleep only gives the reader the CPU on a busy machine (without
        # it, one time slice can cover every publish); correctness does not
        # depend on it.
        for generation in range(2, PUBLISHES + 1):
            writer.publish(make_routes(generation, pad=(generation * 7919) % 20000))
            time.sleep(0.0001)
        assert parent_conn.poll(15), "reader process did not report"
        error, seen, failures = parent_conn.recv()
        child.join(5)
        assert error is None, error
        assert child.exitcode == 0
        assert seen >= 2
        print(f"reader saw {seen} of {PUBLISHES} generations; {failures} failed refreshes")
    finally:
        if child.is_alive():
            child.terminate()
        child.join(5)
        parent_conn.close()
        writer.close()
