"""Shared tables: one writer (the supervisor), many readers (the workers), shared memory.

The routing table (``prism.router.table``) is the first of them.

Every worker needs, on every call, the answer to "who serves this namespace and
with which backend". Asking the supervisor would put a round trip on the hot
path, and decoding a shared table per call would put a decode there, so the
supervisor publishes the whole table into a shared buffer and each worker keeps
the decoded ``Routes`` and re-decodes only when the generation in the header
moves. The per-call cost is one ``struct.unpack_from`` and a compare.

Layout of the buffer (little-endian)::

    offset 0   header, 64 bytes
               0  magic       4s   b"PRT\\x01" (layout version in the last byte)
               4  active      u32  slot holding the current table (0 or 1)
               8  seq         u64  seqlock counter, odd while the header changes
               16 generation  u64  generation of the table in the active slot
               24 reserved
    offset 64  slot 0, then slot 1, each (size - 64) // 2 bytes rounded down to 64:
               0  length      u32  payload bytes
               4  reserved    u32  zero
               8  generation  u64  generation of the payload
               16 digest      16s  blake2b-16 over bytes 0..16 of this slot header + payload
               32 payload          msgspec msgpack encoding of ``Routes``

The writer encodes into the inactive slot, then flips the header under the
seqlock. A slot is only ever rewritten after the header has moved away from it,
which bumps ``seq``; so a reader that sees the same even ``seq`` before and
after copying a slot copied a slot nobody wrote meanwhile. CPython gives no
memory barriers, so the seqlock alone is not trusted: the digest and the two
generation checks reject anything torn or corrupted, whatever reordering or
stray write caused it. The digest is an integrity check, not authentication:
an anonymous shared mapping is writable only by the supervisor's own children.

The same layout carries each tenant's own namespace table
(``prism.workers.tenant_table``): ``SharedTableWriter`` and
``SharedTableReader`` publish and read any struct with a ``generation``.

The routing table is readable by every worker of every tenant, so it holds
nothing secret: a namespace's entry names its tenant, abstraction and
backend, never its backend options (DSNs with passwords); its owning
workers take those from their own tenant's table.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from typing import Final, Generic, Protocol, TypeVar

import msgspec

from prism.errors import ConfigError, Unavailable

DEFAULT_SIZE_BYTES: Final = 4 * 1024 * 1024

_MAGIC: Final = b"PRT\x01"
_HEADER_BYTES: Final = 64
_SLOT_HEADER_BYTES: Final = 32
_DIGEST_BYTES: Final = 16
_ALIGN: Final = 64

# Header fields. ``seq`` is read on its own, before and after everything else,
# as a seqlock must be; magic/active/generation are read together in between.
_MAGIC_ACTIVE: Final = struct.Struct("<4sI")
_U64: Final = struct.Struct("<Q")
_SEQ_OFFSET: Final = 8
_GENERATION_OFFSET: Final = 16
_HEADER_FIELDS: Final = struct.Struct("<4sIQQ")  # magic, active, seq, generation

_SLOT_META: Final = struct.Struct("<IIQ")  # length, reserved, generation: the digested part
_SLOT_HEADER: Final = struct.Struct("<IIQ16s")

# Enough to ride out a writer caught between its two seq increments (two
# pack_into calls); a corrupt buffer fails every attempt, and is then not
# retried until it changes (see ``RoutingTableReader._rejected``).
_READ_ATTEMPTS: Final = 4


class RoutingTableUnavailable(Unavailable):
    """No valid routing table has been read yet; the worker cannot route any call."""


class RoutingTableTooLarge(ConfigError):
    """The encoded table does not fit in a slot; the supervisor must keep the old one."""


class Generational(Protocol):
    """What a shared table holds: a struct that names its generation."""

    @property
    def generation(self) -> int: ...


T = TypeVar("T", bound=Generational)

_ENCODER: Final = msgspec.msgpack.Encoder()


def _slot_geometry(size: int) -> tuple[int, int]:
    """Return (slot size, payload capacity) for a buffer of ``size`` bytes."""
    slot_bytes = (size - _HEADER_BYTES) // 2 // _ALIGN * _ALIGN
    capacity = slot_bytes - _SLOT_HEADER_BYTES
    if capacity <= 0:
        raise ValueError(f"routing table buffer of {size} bytes is too small for two slots")
    return slot_bytes, capacity


def slot_capacity(size: int) -> int:
    """The largest encoded table a buffer of ``size`` bytes holds."""
    return max(0, (size - _HEADER_BYTES) // 2 // _ALIGN * _ALIGN - _SLOT_HEADER_BYTES)


def _digest(meta: bytes, payload: bytes) -> bytes:
    h = hashlib.blake2b(meta, digest_size=_DIGEST_BYTES)
    h.update(payload)
    return h.digest()


class SharedTableWriter:
    """The supervisor's side: publishes whole tables, never edits one in place.

    Constructing a writer over a buffer resets its header, so readers see "no
    table" until the first ``publish``. There must be exactly one writer.
    ``what`` names the table in errors.
    """

    def __init__(self, buffer: mmap.mmap | bytearray, what: str = "routing table") -> None:
        self.buffer = buffer
        self.what = what
        self._view = memoryview(buffer)
        self._slot_bytes, self.capacity = _slot_geometry(len(self._view))
        self._seq = 0
        self._generation = 0
        self._active = 1  # so the first table goes to slot 0
        self._view[:_HEADER_BYTES] = bytes(_HEADER_BYTES)
        _HEADER_FIELDS.pack_into(self._view, 0, _MAGIC, 0, 0, 0)

    @classmethod
    def create(cls, size_bytes: int = DEFAULT_SIZE_BYTES) -> SharedTableWriter:
        """Map an anonymous shared buffer; workers forked afterwards inherit it."""
        return cls(mmap.mmap(-1, size_bytes, flags=mmap.MAP_SHARED))

    @property
    def generation(self) -> int:
        """The last generation published, 0 before the first."""
        return self._generation

    def publish(self, routes: Generational) -> None:
        """Make ``routes`` the current table for every reader.

        Generations must strictly increase: readers use the generation alone
        to decide whether their cached table is still current.
        """
        if routes.generation <= self._generation:
            raise ValueError(
                f"{self.what} generation {routes.generation} is not above the published "
                f"{self._generation}; readers would keep the old table"
            )
        payload = _ENCODER.encode(routes)
        if len(payload) > self.capacity:
            raise RoutingTableTooLarge(
                f"{self.what} generation {routes.generation} encodes to {len(payload)} bytes; "
                f"a slot holds {self.capacity} (buffer of {len(self._view)} bytes): "
                f"give the {self.what} a larger buffer"
            )
        slot = 1 - self._active
        base = _HEADER_BYTES + slot * self._slot_bytes
        meta = _SLOT_META.pack(len(payload), 0, routes.generation)
        start = base + _SLOT_HEADER_BYTES
        self._view[start : start + len(payload)] = payload
        _SLOT_HEADER.pack_into(self._view, base, len(payload), 0, routes.generation, _digest(meta, payload))
        # Flip the header. The slot above is already complete; only these few
        # bytes are ever written while a reader may be looking at the header.
        _U64.pack_into(self._view, _SEQ_OFFSET, self._seq + 1)
        _MAGIC_ACTIVE.pack_into(self._view, 0, _MAGIC, slot)
        _U64.pack_into(self._view, _GENERATION_OFFSET, routes.generation)
        self._seq += 2
        _U64.pack_into(self._view, _SEQ_OFFSET, self._seq)
        self._active = slot
        self._generation = routes.generation

    def close(self) -> None:
        """Release the buffer (and unmap it if it is an mmap); readers keep their own mapping."""
        self._view.release()
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()


class _ReadFailed(Exception):
    """One attempt to read the table failed; the message says why (for the worker's log)."""


RoutingTableWriter = SharedTableWriter


class SharedTableReader(Generic[T]):
    """A worker's side: the decoded table, refreshed when the header generation moves.

    ``failures`` counts refreshes that failed every attempt (``last_error``
    says why); the reader then keeps serving the last good table, and does
    not try again until the buffer's header or slot header changes, so a
    corrupt buffer costs one failed refresh, not one per call.
    """

    def __init__(self, buffer: mmap.mmap | bytearray, kind: type[T], what: str = "routing table") -> None:
        self._view = memoryview(buffer)
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._what = what
        self._slot_bytes, self._capacity = _slot_geometry(len(self._view))
        self._routes: T | None = None
        self._cached_generation = -1  # no header generation is negative
        self._rejected: tuple[object, ...] | None = None
        self.failures = 0
        self.last_error = ""

    def generation(self) -> int:
        """The header's generation: a cheap hint that may be torn or corrupt; ``current()`` checks it."""
        generation: int = _U64.unpack_from(self._view, _GENERATION_OFFSET)[0]
        return generation

    def current(self) -> T:
        """The current table; decoded again only when the header generation changed.

        Raises ``RoutingTableUnavailable`` until a valid table has been read once.
        """
        routes = self._routes
        if routes is not None and _U64.unpack_from(self._view, _GENERATION_OFFSET)[0] == (
            self._cached_generation
        ):
            return routes
        return self._refresh()

    def _refresh(self) -> T:
        state = self._state()
        if state != self._rejected:
            for _ in range(_READ_ATTEMPTS):
                try:
                    routes = self._read()
                except _ReadFailed as exc:
                    self.last_error = str(exc)
                    continue
                self._routes = routes
                self._cached_generation = routes.generation
                self._rejected = None
                return routes
            self.failures += 1
            # Remember the state as it is now, not as it was when the first
            # attempt began: if the writer moved meanwhile, the next call retries.
            self._rejected = self._state()
        if self._routes is None:
            raise RoutingTableUnavailable(f"no valid {self._what} yet: {self.last_error}")
        return self._routes

    def _state(self) -> tuple[object, ...]:
        """What a successful write must change: the header and the active slot's header."""
        header = _HEADER_FIELDS.unpack_from(self._view, 0)
        active = header[1]
        if active not in (0, 1):
            return header
        return header + _SLOT_HEADER.unpack_from(self._view, _HEADER_BYTES + active * self._slot_bytes)

    def _read(self) -> T:
        view = self._view
        seq = _U64.unpack_from(view, _SEQ_OFFSET)[0]
        if seq & 1:
            raise _ReadFailed("the supervisor was writing the header")
        magic, active = _MAGIC_ACTIVE.unpack_from(view, 0)
        generation = _U64.unpack_from(view, _GENERATION_OFFSET)[0]
        if magic != _MAGIC:
            raise _ReadFailed(f"bad magic {magic!r}")
        if active not in (0, 1):
            raise _ReadFailed(f"bad active slot {active}")
        base = _HEADER_BYTES + active * self._slot_bytes
        length, reserved, slot_generation, digest = _SLOT_HEADER.unpack_from(view, base)
        if length > self._capacity:
            raise _ReadFailed(f"slot {active} length {length} exceeds its capacity {self._capacity}")
        start = base + _SLOT_HEADER_BYTES
        payload = view[start : start + length].tobytes()
        if _U64.unpack_from(view, _SEQ_OFFSET)[0] != seq:
            raise _ReadFailed("the supervisor published again while the table was being read")
        if slot_generation != generation:
            raise _ReadFailed(f"slot {active} holds generation {slot_generation}, header says {generation}")
        if _digest(_SLOT_META.pack(length, reserved, slot_generation), payload) != digest:
            raise _ReadFailed(f"slot {active} checksum mismatch (generation {generation})")
        try:
            routes = self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise _ReadFailed(f"slot {active} does not decode: {exc}") from None
        if routes.generation != generation:
            raise _ReadFailed(f"decoded generation {routes.generation}, header says {generation}")
        return routes

    def close(self) -> None:
        """Release the buffer so its owner can unmap it."""
        self._view.release()
