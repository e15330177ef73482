"""The writes one backend of a migration has not taken yet, on disk: they survive a restart.

A worker answers a client once the backend that answers (the primary) has
its write; the other backend (the secondary) gets it in the background
(``prism.migrate.retry``). Until then the write exists on one backend only,
and in this worker's memory. So that a process killed meanwhile loses
nothing, each write queued for a backend is first appended here, one
msgpack frame (``QueuedWrite``: the call, its stamp and token) behind a
4-byte length, in ``DATA_DIR/migrations/pending/<namespace>/w<worker>.<role>``
(directory 0700, file 0600). When the backend's queue is empty the file is
truncated; when it has grown past ``COMPACT_BYTES`` and twice what is queued,
it is rewritten with what is still queued (temporary file and rename).

On open, ``load`` returns what the file holds; the migration delivers it
again to that backend. A write delivered twice is harmless: it carries the
stamp and idempotency token of the client's call, and each engine's stamp
rule (tombstones included) decides as it did the first time.

The cost: one ``write(2)`` of the write's bytes per client write while a
migration runs, no fsync. A process killed (kill -9, OOM) loses nothing: the
bytes are in the kernel before the client is answered. A power loss or a
kernel crash can lose the writes of the last seconds the kernel had not
flushed (``vm.dirty_expire_centisecs``, 30 s by default): the target then
misses them, and the shadow reads of an ``abort`` and a new ``start`` find it.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from prism.backends.keyvalue import ItemWrite, MatchKeys, MatchRange, Mutation, Predicate, Put, Stamp

log = logging.getLogger("prism.migrate")

COMPACT_BYTES: Final = 8 << 20  # past this (and twice what is queued), the file is rewritten
MAX_FRAME_BYTES: Final = 64 << 20  # a frame larger than this is not ours: the rest is ignored
_LEN: Final = struct.Struct(">I")


class QueuedWrite(msgspec.Struct, frozen=True, array_like=True):
    """A client's write as it is delivered to a backend again: the call, with its stamp."""

    kind: str  # "put", "delete" or "mutate"
    id: str
    stamp: Stamp
    items: tuple[ItemWrite, ...] = ()
    predicate: Predicate | None = None
    mutations: tuple[Mutation, ...] = ()

    @property
    def nbytes(self) -> int:
        """The keys and values it holds (what a queue's byte budget counts)."""
        if self.kind == "put":
            return sum(len(i.key) + len(i.value) for i in self.items)
        if self.predicate is not None:
            return _predicate_bytes(self.predicate)
        return sum(
            len(m.item.key) + len(m.item.value) if isinstance(m, Put) else _predicate_bytes(m.predicate)
            for m in self.mutations
        )

    async def apply(self, backend: Any, now_ms: int) -> None:
        if self.kind == "put":
            await backend.put_items(self.id, self.items, self.stamp, now_ms)
        elif self.kind == "delete":
            assert self.predicate is not None
            await backend.delete_items(self.id, self.predicate, self.stamp, now_ms)
        else:
            await backend.mutate_items(self.id, self.mutations, self.stamp, now_ms)


def _predicate_bytes(predicate: Predicate) -> int:
    if isinstance(predicate, MatchKeys):
        return sum(len(k) for k in predicate.keys)
    if isinstance(predicate, MatchRange):
        return len(predicate.start) + len(predicate.end)
    return 0


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(QueuedWrite)


def frame(write: QueuedWrite) -> bytes:
    body = _encoder.encode(write)
    return _LEN.pack(len(body)) + body


def journal_path(data_dir: Path, namespace: str, worker_id: int, role: str) -> Path:
    return Path(data_dir) / "migrations" / "pending" / namespace / f"w{worker_id}.{role}"


class Journal:
    """One backend's queued writes of one worker, appended before the client is answered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.size = 0

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self.size = os.fstat(self._fd).st_size
        return self._fd

    def load(self) -> list[QueuedWrite]:
        """The writes the file holds (a torn or foreign tail is ignored, and said)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        self.size = len(data)
        out: list[QueuedWrite] = []
        at = 0
        while at + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, at)
            body = data[at + _LEN.size : at + _LEN.size + n]
            if n > MAX_FRAME_BYTES or len(body) < n:
                break
            try:
                out.append(_decoder.decode(body))
            except msgspec.DecodeError:
                break
            at += _LEN.size + n
        if at != len(data):
            log.warning("%s: %d bytes at the end are not a whole write: ignored", self.path, len(data) - at)
        return out

    def append(self, write: QueuedWrite) -> None:
        data = frame(write)
        _write_all(self._open(), data)
        self.size += len(data)

    def clear(self) -> None:
        """Nothing is queued any more: the file is emptied."""
        if self.size:
            os.ftruncate(self._open(), 0)
            self.size = 0

    def compact(self, queued: Iterable[QueuedWrite], queued_bytes: int) -> None:
        """Rewrite the file with ``queued`` once it has grown well past it."""
        if self.size < COMPACT_BYTES or self.size < 2 * queued_bytes:
            return
        self.replace(list(queued))

    def replace(self, writes: Sequence[QueuedWrite]) -> None:
        data = b"".join(frame(w) for w in writes)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self.close()
        self.size = len(data)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
