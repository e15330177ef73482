"""The shared-memory GetItems cache: a hit is always exactly what was put, anything doubtful is a miss."""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import random
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from prism.cache import shared as cache_mod
from prism.cache.shared import CacheLayoutError, SharedCache

FAR = 10**13  # an expiry no test reaches
NOW = 1_000


def table_bytes(slots: int, slot_bytes: int, words: int) -> int:
    """The buffer size that holds exactly ``slots`` slots after the header and the version words."""
    return (64 + 8 * words + 63) // 64 * 64 + slots * slot_bytes


def small_cache(slots: int = 4, ways: int = 4, slot_bytes: int = 256, words: int = 16) -> SharedCache:
    buf = bytearray(table_bytes(slots, slot_bytes, words))
    return SharedCache.format(buf, slot_bytes, ways=ways, version_words=words)


def slot_offset(cache: SharedCache, index: int) -> int:
    return len(cache._view) - (cache.slot_count - index) * cache.slot_bytes


def slot_of(cache: SharedCache, key: bytes) -> int:
    """The index of the slot that holds ``key`` (the test put it there)."""
    for i in range(cache.slot_count):
        at = slot_offset(cache, i)
        klen = struct.unpack_from("<I", cache._view, at + 12)[0]
        if klen == len(key) and bytes(cache._view[at + 48 : at + 48 + klen]) == key:
            return i
    raise AssertionError(f"{key!r} is in no slot")


# -- basic behaviour ---------------------------------------------------------------------------


def test_round_trip_in_anonymous_shared_memory() -> None:
    cache = SharedCache.create(1 << 20, slot_bytes=1024, version_words=1024)
    assert cache.slot_bytes == 1024
    for i, size in enumerate([0, 1, 100, cache.max_item_bytes - 9]):
        key = f"ns\0id{i}\0q".encode()  # 9 bytes
        value = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert cache.put(key, 7, value, FAR)
        assert cache.get(key, 7, NOW) == value
    assert cache.stats().hits == 4
    cache.close()


def test_put_replaces_the_entry_of_the_same_key() -> None:
    cache = small_cache(slots=4, ways=4)
    cache.put(b"k", 1, b"old", FAR)
    cache.put(b"k", 2, b"new", FAR)
    assert cache.get(b"k", 2, NOW) == b"new"
    assert cache.get(b"k", 1, NOW) is None
    assert cache.stats().evictions == 0


def test_other_key_in_the_same_bucket_misses() -> None:
    cache = small_cache(slots=1, ways=1)  # every key maps to the one slot
    cache.put(b"alpha", 1, b"A", FAR)
    assert cache.get(b"beta", 1, NOW) is None
    cache.put(b"beta", 1, b"B", FAR)
    assert cache.get(b"alpha", 1, NOW) is None
    assert cache.get(b"beta", 1, NOW) == b"B"


def test_equal_key_hash_is_not_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "_key_hash", lambda key: 0xDEAD_BEEF_0000_0001)
    cache = small_cache(slots=1, ways=1)
    cache.put(b"key-1", 1, b"one", FAR)
    assert cache.get(b"key-2", 1, NOW) is None  # same hash, same length, other bytes
    assert cache.get(b"key-1", 1, NOW) == b"one"


def test_version_mismatch_misses() -> None:
    cache = small_cache()
    cache.put(b"k", 5, b"v", FAR)
    assert cache.get(b"k", 6, NOW) is None
    assert cache.get(b"k", 4, NOW) is None
    assert cache.get(b"k", 5, NOW) == b"v"


def test_invalidate_retires_entries_cached_under_the_old_version() -> None:
    cache = SharedCache.create(1 << 20, slot_bytes=512, version_words=4096)
    before = cache.record_version("ns", "user:1")
    assert cache.record_version("ns", "user:1") == before
    other = cache.record_version("ns", "user:2")
    cache.put(b"ns/user:1/items", before, b"answer", FAR)
    assert cache.get(b"ns/user:1/items", cache.record_version("ns", "user:1"), NOW) == b"answer"

    cache.invalidate("ns", "user:1")

    after = cache.record_version("ns", "user:1")
    assert after != before
    assert cache.get(b"ns/user:1/items", after, NOW) is None
    assert cache.record_version("ns", "user:2") == other
    # The namespace and the id are separate parts of the record's identity.
    assert cache_mod._record_hash("ab", "c") != cache_mod._record_hash("a", "bc")


def test_invalidate_never_writes_back_the_current_value(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = small_cache()
    draws: Iterator[bytes] = iter([bytes(8), bytes(8), (42).to_bytes(8, "little")])
    monkeypatch.setattr("prism.cache.shared.os.urandom", lambda n: next(draws))
    assert cache.record_version("ns", "x") == 0
    cache.invalidate("ns", "x")
    assert cache.record_version("ns", "x") == 42


def test_expiry() -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"v", 2_000)
    assert cache.get(b"k", 1, 1_999) == b"v"
    assert cache.get(b"k", 1, 2_000) is None
    assert cache.get(b"k", 1, 5_000) is None


def test_value_too_large_is_refused() -> None:
    cache = small_cache(slot_bytes=256)
    key = b"key"
    assert cache.max_item_bytes == 256 - 48
    assert cache.put(key, 1, bytes(cache.max_item_bytes - len(key)), FAR)
    assert not cache.put(key, 2, bytes(cache.max_item_bytes - len(key) + 1), FAR)
    assert cache.get(key, 1, NOW) == bytes(cache.max_item_bytes - len(key))


def test_full_bucket_evicts_the_earliest_expiry() -> None:
    cache = small_cache(slots=4, ways=4)  # one bucket
    for i, expires in enumerate([400, 100, 300, 200]):
        assert cache.put(b"k%d" % i, 1, b"v%d" % i, expires, now_ms=50)
    assert cache.stats().evictions == 0  # empty slots were used first

    assert cache.put(b"k4", 1, b"v4", 500, now_ms=50)

    assert cache.get(b"k1", 1, 50) is None  # expiry 100 went first
    assert [cache.get(b"k%d" % i, 1, 50) for i in (0, 2, 3, 4)] == [b"v0", b"v2", b"v3", b"v4"]
    assert cache.stats().evictions == 1
    # Replacing an entry that had already expired is not an eviction.
    assert cache.put(b"k5", 1, b"v5", 600, now_ms=250)  # takes k3 (expiry 200)
    assert cache.get(b"k3", 1, 50) is None
    assert cache.stats().evictions == 1


def test_stats_count_hits_and_misses() -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"v", FAR)
    cache.get(b"k", 1, NOW)
    cache.get(b"k", 2, NOW)
    cache.get(b"nope", 1, NOW)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.corrupt) == (1, 2, 0, 0)


# -- attaching -----------------------------------------------------------------------------------


def test_attach_to_an_existing_table() -> None:
    cache = small_cache(slots=8, ways=2)
    cache.put(b"k", 1, b"v", FAR)
    twin = SharedCache(cache._buffer, 256)  # e.g. a second handle on the inherited mapping
    assert twin.slot_count == 8
    assert twin.get(b"k", 1, NOW) == b"v"
    twin.put(b"k2", 1, b"v2", FAR)
    assert cache.get(b"k2", 1, NOW) == b"v2"


def test_attach_rejects_what_is_not_a_sound_table() -> None:
    cache = small_cache()
    with pytest.raises(CacheLayoutError, match="not a Prism cache"):
        SharedCache(bytearray(4096))
    with pytest.raises(CacheLayoutError, match="256-byte slots, not 512"):
        SharedCache(cache._buffer, 512)
    damaged = bytearray(cache._buffer)
    damaged[20] ^= 0x01  # slot count
    with pytest.raises(CacheLayoutError, match="checksum"):
        SharedCache(damaged)
    with pytest.raises(CacheLayoutError, match="geometry"):
        SharedCache(bytearray(cache._buffer)[:-1])
    with pytest.raises(ValueError, match="writable"):
        SharedCache(bytes(cache._buffer))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot hold"):
        SharedCache.format(bytearray(1000), 256, version_words=16)


# -- torn and corrupt slots ----------------------------------------------------------------------


def test_slot_with_odd_sequence_is_a_miss() -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"value", FAR)
    at = slot_offset(cache, slot_of(cache, b"k"))
    seq = struct.unpack_from("<Q", cache._view, at)[0]
    assert seq % 2 == 0
    struct.pack_into("<Q", cache._view, at, seq + 1)  # a writer is inside (or died there)
    assert cache.get(b"k", 1, NOW) is None
    assert cache.put(b"k", 1, b"again", FAR)  # the next writer recovers the slot
    assert cache.get(b"k", 1, NOW) == b"again"


def test_sequence_changed_during_the_copy_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"value", FAR)
    # The re-read after the copy sees a writer's newer sequence.
    monkeypatch.setattr(cache_mod, "_unpack_seq", lambda view, at: (1 << 20,))
    assert cache.get(b"k", 1, NOW) is None
    assert cache.stats().corrupt == 1


@pytest.mark.parametrize("field", ["version", "expires"])
def test_torn_header_read_is_checked_again_on_the_copy(monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"version 1, expired at 500", 500)
    real = cache_mod._unpack_head

    def torn(view: memoryview, at: int) -> tuple[int, ...]:
        # The live read caught a racing writer's header fields next to the old record's checksum.
        seq, crc, klen, khash, version, expires, vlen, pad = real(view, at)
        if field == "version":
            return seq, crc, klen, khash, 2, expires, vlen, pad
        return seq, crc, klen, khash, version, FAR, vlen, pad

    monkeypatch.setattr(cache_mod, "_unpack_head", torn)
    if field == "version":
        assert cache.get(b"k", 2, 100) is None
    else:
        assert cache.get(b"k", 1, 1_000) is None


def test_bytes_landing_while_the_writer_checksums_are_not_blessed(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = small_cache(slots=1, ways=1)
    cache.put(b"key-a", 1, b"A" * 100, FAR)
    at = slot_offset(cache, 0)
    real = cache_mod._crc32
    armed = [True]

    def racing_crc(data: bytes, value: int = 0) -> int:
        if armed[0] and len(data) > 100:  # the record's checksum, not the key hash
            armed[0] = False
            # Another process writing the same slot gets its value bytes in right now.
            cache._view[at + 48 + 5 : at + 48 + 5 + 100] = b"B" * 100
        return real(data, value)

    monkeypatch.setattr(cache_mod, "_crc32", racing_crc)
    cache.put(b"key-a", 2, b"a" * 100, FAR)
    assert cache.get(b"key-a", 2, NOW) in (None, b"a" * 100)


@pytest.mark.parametrize("landed", ["first half", "second half"])
def test_half_written_slot_is_a_miss(landed: str) -> None:
    cache = small_cache(slots=1, ways=1)
    at = slot_offset(cache, 0)
    view = cache._view
    cache.put(b"key-a", 1, b"A" * 150, FAR)
    old = bytes(view[at : at + 256])
    cache.put(b"key-b", 1, b"B" * 150, FAR)
    new = bytes(view[at : at + 256])
    # A writer replacing key-a by key-b got only half of its bytes into the slot.
    torn = new[:128] + old[128:] if landed == "first half" else old[:128] + new[128:]
    view[at : at + 256] = torn

    assert cache.get(b"key-a", 1, NOW) is None
    assert cache.get(b"key-b", 1, NOW) is None
    assert cache.stats().corrupt == 1  # the checksum caught the candidate that claimed the key


def test_record_copied_into_a_foreign_slot_is_still_its_own() -> None:
    cache = small_cache(slots=2, ways=2)
    cache.put(b"key-a", 1, b"A" * 150, FAR)
    cache.put(b"key-b", 1, b"B" * 150, FAR)
    a = slot_offset(cache, slot_of(cache, b"key-a"))
    b = slot_offset(cache, slot_of(cache, b"key-b"))
    view = cache._view
    view[a : a + 128] = view[b : b + 128]  # first half of key-b's slot over key-a's
    assert cache.get(b"key-a", 1, NOW) is None
    assert cache.get(b"key-b", 1, NOW) == b"B" * 150  # from its own, intact slot
    view[b : b + 256] = view[a : a + 256]  # now key-b's slot is torn too
    assert cache.get(b"key-b", 1, NOW) is None


def test_flipped_value_byte_is_a_miss() -> None:
    cache = small_cache()
    cache.put(b"k", 1, b"value", FAR)
    at = slot_offset(cache, slot_of(cache, b"k"))
    cache._view[at + 48 + 1 + 2] ^= 0x20
    assert cache.get(b"k", 1, NOW) is None
    assert cache.stats().corrupt == 1


def expected_value(key: bytes, version: int) -> bytes:
    """The one value the tests ever store for (key, version), so any hit can be checked exactly."""
    digest = hashlib.blake2b(key + version.to_bytes(8, "little"), digest_size=16).digest()
    return key + b"|" + version.to_bytes(8, "little") + digest * (version % 7)


mutation = st.tuples(
    st.sampled_from(["flip", "zero", "random", "copy"]),
    st.integers(0, 1 << 20),
    st.integers(0, 1 << 20),
    st.integers(1, 300),
    st.binary(min_size=1, max_size=300),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    puts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3)), min_size=1, max_size=30),
    mutations=st.lists(mutation, min_size=1, max_size=8),
    spare_header=st.booleans(),
)
def test_corruption_anywhere_never_yields_wrong_data(
    puts: list[tuple[int, int]], mutations: list[tuple[str, int, int, int, bytes]], spare_header: bool
) -> None:
    cache = small_cache(slots=8, ways=2, slot_bytes=128, words=8)
    keys = [b"key-%d" % i for i in range(10)]
    for k, version in puts:
        cache.put(keys[k], version, expected_value(keys[k], version), FAR)
    view = cache._view
    size = len(view)
    low = 64 if spare_header else 0
    for kind, at, src, n, data in mutations:
        start = low + at % (size - low)
        n = min(n, size - start)
        if kind == "flip":
            view[start] ^= n % 255 + 1
        elif kind == "zero":
            view[start : start + n] = bytes(n)
        elif kind == "random":
            view[start : start + min(n, len(data))] = data[:n]
        else:  # a copy of other bytes of the table, e.g. part of another slot
            src = low + src % (size - low)
            n = min(n, size - src)
            view[start : start + n] = bytes(view[src : src + n])

    handles = [cache]
    try:
        handles.append(SharedCache(cache._buffer))
    except CacheLayoutError:
        pass  # a damaged header may be refused at attach time, never half-used
    for handle in handles:
        for key in keys:
            for version in range(5):
                got = handle.get(key, version, NOW)
                assert got is None or got == expected_value(key, version)
        handle.record_version("ns", "id")  # must not crash either


# -- real processes ------------------------------------------------------------------------------

MP_RECORDS = [f"id{i}" for i in range(12)]
MP_SECONDS = 1.0


def _mp_key(record: str) -> bytes:
    return f"t\0{record}\0items".encode()


def _hammer(cache: SharedCache, seed: int, seconds: float, check_only: bool = False) -> tuple[int, int]:
    """Random gets, puts and invalidations; every hit is checked against the value for its version."""
    rng = random.Random(seed)
    hits = wrong = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        record = rng.choice(MP_RECORDS)
        key = _mp_key(record)
        version = cache.record_version("t", record)
        now_ms = int(time.time() * 1000)
        roll = rng.random()
        if roll < 0.5 or check_only:
            got = cache.get(key, version, now_ms)
            if got is not None:
                hits += 1
                wrong += got != expected_value(key, version)
        elif roll < 0.9:
            cache.put(key, version, expected_value(key, version), now_ms + 10_000, now_ms=now_ms)
        else:
            cache.invalidate("t", record)
    return hits, wrong


def _child(cache: SharedCache, seed: int, results: multiprocessing.Queue[tuple[int, int, int]]) -> None:
    hits, wrong = _hammer(cache, seed, MP_SECONDS)
    results.put((seed, hits, wrong))


def test_processes_racing_on_the_same_slots_never_read_wrong_data() -> None:
    # Few slots, few version words: every process writes the slots the others read.
    size = table_bytes(8, 256, 4)
    cache = SharedCache.format(mmap.mmap(-1, size), 256, ways=2, version_words=4)
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[tuple[int, int, int]] = ctx.Queue()
    children = [ctx.Process(target=_child, args=(cache, seed, results), daemon=True) for seed in (1, 2)]
    try:
        for child in children:
            child.start()
        parent_hits, parent_wrong = _hammer(cache, 3, MP_SECONDS)
        reports = sorted(results.get(timeout=30) for _ in children)
        for child in children:
            child.join(timeout=30)
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join()
        results.close()
    assert [child.exitcode for child in children] == [0, 0]
    assert parent_wrong == 0
    assert [(seed, wrong) for seed, _, wrong in reports] == [(1, 0), (2, 0)]
    assert parent_hits > 0 and all(hits > 0 for _, hits, _ in reports)


# -- what reaches Prometheus --------------------------------------------------------------------


def _exported(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def test_evictions_and_corrupt_slots_reach_prometheus() -> None:
    evictions = _exported("prism_shared_cache_evictions_total")
    corrupt = _exported("prism_shared_cache_corrupt_slots_total")
    cache = small_cache(slots=4, ways=4)  # one bucket
    for i in range(5):  # the fifth put replaces a live entry
        assert cache.put(b"k%d" % i, 1, b"value", FAR, now_ms=NOW)
    kept = next(k for k in (b"k0", b"k1", b"k2", b"k3", b"k4") if cache.get(k, 1, NOW) is not None)
    cache._view[slot_offset(cache, slot_of(cache, kept)) + 48 + 3] ^= 0x20  # flip a value byte
    assert cache.get(kept, 1, NOW) is None

    assert _exported("prism_shared_cache_evictions_total") == evictions + 1
    assert _exported("prism_shared_cache_corrupt_slots_total") == corrupt + 1
