"""The look-aside cache for GetItems answers, one table in shared memory for all workers.

The supervisor lays the table out in a memfd (``SharedCache.format_zeroed``)
before it starts any worker, and passes the descriptor down to each worker it
execs (``cache_fd`` in the worker's spec); every worker maps it ``MAP_SHARED``,
so all of them read and write the same slots with no locks and no messages.
Python gives us no atomic instructions and no memory barriers on shared
memory, so nothing here relies on them: correctness rests on checksums over
private copies (see the end).

Caller protocol (invalidation)
------------------------------
Every cached answer carries the *record version* it was computed under: a
64-bit word, one per record, in a region of the same mapping.

- A reader takes ``v = cache.record_version(ns, id)`` BEFORE it reads the
  backend, then stores the answer with ``cache.put(key, v, answer, expiry)``.
  It looks up with ``cache.get(key, cache.record_version(ns, id), now_ms)``.
- A writer calls ``cache.invalidate(ns, id)`` AFTER its backend write commits
  and BEFORE it acknowledges the client.

An entry is served only while its version tag equals the record's current
word. Any answer read from the backend before a write committed was stored
under a version that the write's ``invalidate`` has since replaced, so once a
write is acknowledged no reader can be served the data from before it. Records
that share a word (hash collisions) only invalidate each other: extra misses.

Why the words get random values and not increments: two writers that
increment concurrently can both read ``v`` and both store ``v + 1``. If a reader
cached fresh data under the first ``v + 1`` (after the first write), the second
write lands without changing the word, and the reader's entry, now older than
the second write, stays valid. ``invalidate`` instead stores 8 bytes from
``os.urandom``: whichever write lands last, the word differs from every value
a reader could have taken before it (but with probability 2**-64), and a
restarted worker cannot replay old values the way a (pid, counter) scheme
could after pid reuse. A torn read of a word being written gives a value that
nobody stores, so its entries only miss.

Table layout (all integers little-endian)
-----------------------------------------
::

    header   64 B   magic "PRISMCSH", layout version, slot bytes, slot count,
                    ways, version words, crc32 of the preceding fields
    words    8 B x version_words   record versions
    slots    slot_bytes x slot_count, starting on a 64-byte boundary

    slot:  0 seq u64       odd while a writer is inside
           8 crc u32       crc32 of bytes 12 .. 48 + klen + vlen
          12 klen u32      key length
          16 khash u64     hash of the key
          24 version u64   record version tag
          32 expires u64   ms since the epoch
          40 vlen u32      value length
          44 reserved u32  zero
          48 key bytes, then value bytes

Slots are grouped into buckets of ``ways`` (default 4) consecutive slots and a
key lives only in bucket ``hash(key) % buckets``: a set-associative table. A
bucket is contiguous, so a miss reads at most ``ways`` slot headers from
neighbouring memory, and no probe sequence can wander when slots are
overwritten by other processes, unlike open addressing with tombstones.

Why a racing write can only cause a miss
----------------------------------------
A writer computes the checksum over its own private copy of the record and
stores it last (between the seqlock's odd and even steps). A reader copies the
record out of the mapping ONCE and checks everything it returns (key bytes,
version, expiry, lengths, checksum) against that private copy. A copy torn by
a concurrent writer, or two writers interleaving on one slot, yields bytes
that no writer checksummed: a miss except with probability 2**-32 per torn
candidate (which must also carry the right key bytes, version and lengths).
The seqlock adds a cheap, checksum-free way to skip a slot that is visibly
being written; it is not what correctness rests on, since several writers can
race on the sequence word itself and a weakly ordered CPU may show the stores
out of order. A writer that dies mid-write leaves the sequence odd: the slot
misses until the next ``put`` to it, which never waits on the sequence.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass

from prism import metrics

__all__ = ["CacheLayoutError", "CacheStats", "SharedCache"]

_MAGIC = b"PRISMCSH"
_LAYOUT_VERSION = 1
_HEADER_BYTES = 64
_SLOT_ALIGN = 64
_U64 = (1 << 64) - 1

# magic, layout version, slot bytes, slot count, ways, version words, crc
_HEADER = struct.Struct("<8sIIIIII")
_HEADER_CRC_SPAN = _HEADER.size - 4

# The slot header as one read: seq, crc, klen, khash, version, expires, vlen, reserved.
_SLOT_HEAD = struct.Struct("<QIIQQQII")
_SLOT_HEAD_BYTES = _SLOT_HEAD.size  # 48
# The checksummed part of the slot header (from offset 12): klen .. reserved.
_BODY = struct.Struct("<IQQQII")
_BODY_OFFSET = 12
_KHASH_OFFSET = 16
_BODY_BYTES = _BODY.size  # 36
_SEQ = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_WORD = struct.Struct("<Q")

_MIN_SLOT_BYTES = 64
_ZERO_CHUNK = 1 << 20

_crc32 = zlib.crc32
_adler32 = zlib.adler32
_unpack_head = _SLOT_HEAD.unpack_from
_unpack_body = _BODY.unpack_from
_unpack_seq = _SEQ.unpack_from


def _key_hash(key: bytes) -> int:
    """A 64-bit hash of ``key`` that is the same in every process and every run.

    crc32 in the low half (it picks the bucket) and adler32 in the high half:
    two different functions, so the halves are not tied to each other the
    way two crc32s with different seeds are (crc32 is affine, so for keys of
    equal length the seeded one adds no bits). Both run in C over the key
    once, several times cheaper than ``blake2b(digest_size=8)`` for short
    keys. The hash only chooses a bucket and
    filters candidates; a hit always compares the full key bytes, so
    collisions cost a miss or an extra check, never a wrong answer.
    """
    return _crc32(key) | (_adler32(key) << 32)


def _record_hash(namespace: str, record_id: str) -> int:
    # NUL separates the parts so ("a", "bc") and ("ab", "c") differ.
    return _crc32(record_id.encode(), _crc32(namespace.encode() + b"\0"))


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _write_header(
    buffer: mmap.mmap | bytearray | memoryview, slot_bytes: int, ways: int, version_words: int
) -> None:
    """Check the geometry and write the header of a table whose words and slots are zero."""
    if slot_bytes < _MIN_SLOT_BYTES or slot_bytes % 8 or slot_bytes >= 1 << 32:
        raise ValueError(f"slot_bytes must be a multiple of 8 in [{_MIN_SLOT_BYTES}, 2**32): {slot_bytes}")
    if not 1 <= ways <= 64:
        raise ValueError(f"ways must be in [1, 64], got {ways}")
    if not 1 <= version_words < 1 << 32:
        raise ValueError(f"version_words must be in [1, 2**32), got {version_words}")
    with memoryview(buffer).cast("B") as view:
        slots_at = _align(_HEADER_BYTES + 8 * version_words, _SLOT_ALIGN)
        slot_count = max(0, len(view) - slots_at) // slot_bytes // ways * ways
        if slot_count == 0:
            raise ValueError(
                f"{len(view)} bytes cannot hold {version_words} version words "
                f"and {ways} slots of {slot_bytes} B"
            )
        if slot_count >= 1 << 32:
            raise ValueError(f"too many slots ({slot_count}); use larger slots")
        fields = (_MAGIC, _LAYOUT_VERSION, slot_bytes, slot_count, ways, version_words)
        head = _HEADER.pack(*fields, 0)
        _HEADER.pack_into(view, 0, *fields, _crc32(head[:_HEADER_CRC_SPAN]))


class CacheLayoutError(ValueError):
    """The buffer does not hold a cache table this code can read (bad magic, geometry or checksum)."""


@dataclass(frozen=True, slots=True)
class CacheStats:
    """This process's counters (each worker exports its own)."""

    hits: int
    misses: int
    evictions: int
    corrupt: int
    """Candidate slots (right key hash and version) rejected as torn or corrupt."""


class SharedCache:
    """A fixed-size, lock-free cache table in a shared buffer; see the module docstring."""

    @classmethod
    def create(
        cls, total_bytes: int, slot_bytes: int = 4096, *, ways: int = 4, version_words: int = 65536
    ) -> SharedCache:
        """An empty table in ``total_bytes`` of anonymous memory, for one process
        (tests). The server shares its table between processes through a memfd:
        see ``format_zeroed``."""
        buffer = mmap.mmap(-1, total_bytes)
        # A fresh anonymous mapping reads as zeros; writing them would commit every page now.
        _write_header(buffer, slot_bytes, ways, version_words)
        return cls(buffer, slot_bytes)

    @classmethod
    def format_zeroed(cls, buffer: mmap.mmap, slot_bytes: int = 4096) -> SharedCache:
        """Lay out a table in a buffer known to read as zeros (a new memfd):
        only the header is written, so no page is committed before use."""
        _write_header(buffer, slot_bytes, 4, 65536)
        return cls(buffer, slot_bytes)

    @classmethod
    def format(
        cls,
        buffer: mmap.mmap | bytearray | memoryview,
        slot_bytes: int = 4096,
        *,
        ways: int = 4,
        version_words: int = 65536,
    ) -> SharedCache:
        """Lay out an empty table in ``buffer`` (all of it rewritten) and attach to it."""
        with memoryview(buffer).cast("B") as view:
            for at in range(0, len(view), _ZERO_CHUNK):
                chunk = view[at : at + _ZERO_CHUNK]
                chunk[:] = bytes(len(chunk))
        _write_header(buffer, slot_bytes, ways, version_words)
        return cls(buffer, slot_bytes)

    def __init__(self, buffer: mmap.mmap | bytearray | memoryview, slot_bytes: int | None = None) -> None:
        """Attach to the table already laid out in ``buffer``.

        The geometry is read and checked once, here, and kept in this object:
        later damage to the header cannot steer ``get`` outside the slots.
        """
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise ValueError("the cache buffer must be writable")
        if len(view) < _HEADER_BYTES:
            raise CacheLayoutError(f"buffer of {len(view)} bytes is too small for a cache header")
        magic, layout, s_bytes, s_count, ways, words, crc = _HEADER.unpack_from(view, 0)
        if magic != _MAGIC:
            raise CacheLayoutError(f"not a Prism cache table (magic {magic!r})")
        if _crc32(view[:_HEADER_CRC_SPAN]) != crc:
            raise CacheLayoutError("cache header checksum mismatch: the header is corrupt")
        if layout != _LAYOUT_VERSION:
            raise CacheLayoutError(f"cache layout version {layout}, this code reads {_LAYOUT_VERSION}")
        slots_at = _align(_HEADER_BYTES + 8 * words, _SLOT_ALIGN)
        if (
            s_bytes < _MIN_SLOT_BYTES
            or s_bytes % 8
            or ways == 0
            or words == 0
            or s_count == 0
            or s_count % ways
            or slots_at + s_count * s_bytes > len(view)
        ):
            raise CacheLayoutError(
                f"inconsistent cache geometry: {s_count} slots x {s_bytes} B, {ways} ways, "
                f"{words} version words in {len(view)} bytes"
            )
        if slot_bytes is not None and slot_bytes != s_bytes:
            raise CacheLayoutError(f"the table has {s_bytes}-byte slots, not {slot_bytes}")
        self._buffer = buffer  # keeps the mapping alive as long as we are
        self._view = view
        self._slot_bytes: int = s_bytes
        self._slot_count: int = s_count
        self._ways: int = ways
        self._buckets: int = s_count // ways
        self._bucket_bytes: int = ways * s_bytes
        self._words: int = words
        self._slots_at: int = slots_at
        # One unpack reads the key hash of every slot in a bucket (the 'x's skip the rest).
        self._bucket_hashes = struct.Struct(
            f"<{_KHASH_OFFSET}xQ" + f"{s_bytes - 8}xQ" * (ways - 1)
        ).unpack_from
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def slot_count(self) -> int:
        return self._slot_count

    @property
    def max_item_bytes(self) -> int:
        """The largest ``len(key) + len(value)`` that fits in a slot."""
        return self._slot_bytes - _SLOT_HEAD_BYTES

    def get(self, key: bytes, version: int, now_ms: int) -> bytes | None:
        """The value stored for ``key`` under ``version`` if it has not expired at ``now_ms``, else None.

        A slot counts only if its copy verifies in full: checksum, exact key
        bytes, version, expiry, and an even seqlock sequence unchanged across
        the copy. Anything else is a miss.
        """
        h = _key_hash(key)
        view = self._view
        start = self._slots_at + (h % self._buckets) * self._bucket_bytes
        hashes = self._bucket_hashes(view, start)
        if h in hashes:  # the common miss costs the hash and this one unpack
            klen = len(key)
            step = self._slot_bytes
            off = start - step
            for s_hash in hashes:
                off += step
                if s_hash != h:
                    continue
                seq, crc, s_klen, _, s_version, s_expires, vlen, _ = _unpack_head(view, off)
                # Cheap filters on the live header; nothing is trusted yet.
                if s_klen != klen or s_version != version or seq & 1 or s_expires <= now_ms:
                    continue
                end = off + _SLOT_HEAD_BYTES + klen + vlen
                if end > off + step:
                    self._count_corrupt()
                    continue
                # One private copy; from here on every check is made on it.
                snap = view[off + _BODY_OFFSET : end].tobytes()
                if _crc32(snap) != crc:
                    self._count_corrupt()
                    continue
                c_klen, c_hash, c_version, c_expires, c_vlen, _ = _unpack_body(snap)
                if (
                    c_klen != klen
                    or c_vlen != vlen
                    or c_version != version
                    or c_hash != h
                    or not snap.startswith(key, _BODY_BYTES)
                    or _unpack_seq(view, off)[0] != seq
                ):
                    self._count_corrupt()
                    continue
                if c_expires <= now_ms:
                    continue
                self._hits += 1
                return snap[_BODY_BYTES + klen :]
        self._misses += 1
        return None

    def put(self, key: bytes, version: int, value: bytes, expires_at_ms: int, *, now_ms: int = 0) -> bool:
        """Store ``value`` for ``key`` under ``version`` until ``expires_at_ms``; False if it does not fit.

        The slot is the one already holding ``key`` in its bucket, otherwise
        the one with the earliest expiry: empty slots (expiry 0) and expired
        entries go first, then the live entry closest to expiring, which with
        a uniform TTL is the oldest one. No recency tracking, so ``get`` never
        writes to shared memory. Replacing another key's entry that is still
        live at ``now_ms`` counts as an eviction (with the default 0, every
        replaced entry counts).
        """
        klen = len(key)
        vlen = len(value)
        if _SLOT_HEAD_BYTES + klen + vlen > self._slot_bytes:
            return False
        h = _key_hash(key)
        view = self._view
        start = self._slots_at + (h % self._buckets) * self._bucket_bytes
        target = -1
        target_expires = 0
        for off in range(start, start + self._bucket_bytes, self._slot_bytes):
            _, _, s_klen, s_hash, _, s_expires, _, _ = _unpack_head(view, off)
            key_at = off + _SLOT_HEAD_BYTES
            if s_hash == h and s_klen == klen and view[key_at : key_at + klen] == key:
                target = off
                break
            if target < 0 or s_expires < target_expires:
                target = off
                target_expires = s_expires
        else:
            if target_expires > now_ms:
                self._evictions += 1
                metrics.SHARED_CACHE_EVICTIONS.inc()

        # The checksum covers our private copy, never the shared bytes: a
        # concurrent writer's bytes mixed into the slot then fail it.
        body = _BODY.pack(klen, h, version, expires_at_ms, vlen, 0) + key + value
        crc = _crc32(body)
        seq = _unpack_seq(view, target)[0]
        busy = ((seq + 1) | 1) & _U64  # odd, and differs from what readers saw
        _SEQ.pack_into(view, target, busy)
        view[target + _BODY_OFFSET : target + _BODY_OFFSET + len(body)] = body
        _CRC.pack_into(view, target + 8, crc)
        _SEQ.pack_into(view, target, (busy + 1) & _U64)
        return True

    def record_version(self, namespace: str, id: str) -> int:
        """The current version word of record ``(namespace, id)``: take it BEFORE reading the backend."""
        at = _HEADER_BYTES + 8 * (_record_hash(namespace, id) % self._words)
        return int(_WORD.unpack_from(self._view, at)[0])

    def invalidate(self, namespace: str, id: str) -> None:
        """Give ``(namespace, id)`` a new random version: call AFTER the write commits, BEFORE acking."""
        at = _HEADER_BYTES + 8 * (_record_hash(namespace, id) % self._words)
        old = _WORD.unpack_from(self._view, at)[0]
        new = old
        while new == old:  # a new value, with certainty rather than 1 - 2**-64
            new = int.from_bytes(os.urandom(8), "little")
        _WORD.pack_into(self._view, at, new)

    def _count_corrupt(self) -> None:
        self._corrupt += 1
        metrics.SHARED_CACHE_CORRUPT.inc()

    def stats(self) -> CacheStats:
        """This process's counters since it attached (a forked child starts from its parent's)."""
        return CacheStats(self._hits, self._misses, self._evictions, self._corrupt)

    def close(self) -> None:
        """Release our view of the buffer (and unmap it, if it is an mmap no one else holds)."""
        self._view.release()
        if isinstance(self._buffer, mmap.mmap):
            try:
                self._buffer.close()
            except BufferError:  # another SharedCache still has a view of it
                pass
