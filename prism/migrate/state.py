"""A live migration's state: its phases, the commands that move it, and its files.

Moving a KeyValue namespace from one backend (the source) to another (the
target) goes through phases; ``command`` (what a user asks) and ``advance``
(what happens by itself) are the only ways from one to the next, so that
the supervisor, the admin process and the tests share one table of what is
allowed:

- DUAL_WRITE: writes go to both (the source answers); reads from the source.
- BACKFILL: the same, while one worker copies the source's records.
- SHADOW_READ: the same, and a share of reads is compared with the target.
- PROMOTED: the target answers; writes still reach the source too, so that
  ``abort`` loses nothing.
- FINISHED / ABORTED: one backend again (the target / the source).

No trio here: the supervisor and the admin process import this module.

The state and the backfill's progress are files under
``DATA_DIR/migrations/`` (directory 0700, files 0600), each replaced whole
(temporary file, fsync, rename, fsync of the directory), so a crash leaves
the old version or the new one, never half of one. A namespace's state is
``<namespace>.json``, its progress ``progress/<namespace>.json`` and, once
it is finished or aborted, its last state ``done/<namespace>.json``
(subdirectories, not suffixes: a namespace may be named ``a.progress``).
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from prism.config.store import write_atomically

__all__ = [
    "COMMANDS",
    "MAX_RATE",
    "MIGRATABLE_BACKENDS",
    "Endpoint",
    "MigrationError",
    "MigrationState",
    "MigrationStore",
    "Phase",
    "Progress",
    "advance",
    "command",
    "merge_progress",
    "revert",
    "set_rate",
    "start",
]

MIN_RATE = 1
MAX_RATE = 1_000_000
MAX_STATE_FILE_BYTES = 1 << 20  # a state names two endpoints: far less; a larger file is not ours
MIGRATABLE_BACKENDS: frozenset[str] = frozenset({"sqlite", "postgres", "redis", "memory"})
_T = TypeVar("_T")
_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")  # as prism.config.namespaces.check_name


class Phase(enum.StrEnum):
    DUAL_WRITE = "dual_write"
    BACKFILL = "backfill"
    SHADOW_READ = "shadow_read"
    PROMOTED = "promoted"
    FINISHED = "finished"
    ABORTED = "aborted"


ENDED: frozenset[Phase] = frozenset({Phase.FINISHED, Phase.ABORTED})


class Endpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A backend as the config names it: the engine and its options table."""

    backend: str
    options: dict[str, Any] = {}


class MigrationState(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What every worker holding the namespace applies; ``serial`` moves on every change."""

    namespace: str
    source: Endpoint
    target: Endpoint
    phase: Phase
    rate: int = 1000  # backfill records/s
    shadow_fraction: float = 0.1  # share of reads shadowed in SHADOW_READ
    serial: int = 1
    started_ms: int = 0
    changed_ms: int = 0
    previous: Phase | None = None  # the phase a user's command left: where a refused switch goes back


class Progress(msgspec.Struct):
    """The backfill's progress (written by the worker that runs it) and a
    worker's counters (``MigratingKeyValue.stats``)."""

    cursor: str | None = None  # id of the last record copied
    copied: int = 0
    done: bool = False
    records_per_s: float = 0.0
    target_failures: int = 0  # dual writes the target (or, promoted, the source) refused, then queued
    queued: int = 0  # writes waiting for retry now
    shadow_reads: int = 0
    mismatches: dict[str, int] = {}  # kind -> keys that differed: missing, extra, value, expiry
    updated_ms: int = 0
    dropped: int = 0  # queued writes let go (queue full): the copy is incomplete, start again
    mismatched_reads: int = 0  # shadow reads that differed (the mismatch rate: this / shadow_reads)
    total: int | None = None  # records in the source as the copy began (an estimate; None: not counted)
    pending: int = 0  # writes acknowledged to clients not yet on the second backend (in flight or queued)
    barrier_serial: int = 0  # a worker's: the serial whose phase it refused to apply (``barrier``)
    barrier: str = ""  # why: writes acknowledged were not on the backend that would answer in time


class MigrationError(Exception):
    """A command or a file that cannot be used; ``str()`` is the one line a user sees."""


def check_rate(rate: object) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise MigrationError(f"rate must be an integer from {MIN_RATE} to {MAX_RATE} records/s, not {rate!r}")
    return rate


def check_shadow_fraction(fraction: object) -> float:
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not math.isfinite(fraction)
        or not 0.0 <= fraction <= 1.0
    ):
        raise MigrationError(f"shadow_fraction must be a number from 0 to 1, not {fraction!r}")
    return float(fraction)


def check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_NAME.fullmatch(namespace):
        raise MigrationError(f"namespace {namespace!r} must be 1-128 characters of A-Z a-z 0-9 _ . -")
    return namespace


def start(
    namespace: str,
    source: Endpoint,
    target: Endpoint,
    *,
    rate: int,
    shadow_fraction: float,
    now_ms: int,
) -> MigrationState:
    """A new migration in DUAL_WRITE. Whether ``namespace`` exists and is a KeyValue one
    is the caller's to check (it holds the config)."""
    check_namespace(namespace)
    for role, end in (("source", source), ("target", target)):
        if end.backend not in MIGRATABLE_BACKENDS:
            allowed = ", ".join(sorted(MIGRATABLE_BACKENDS))
            raise MigrationError(
                f"cannot migrate {namespace!r}: {role} backend {end.backend!r} is not one of {allowed}"
            )
    if source == target:
        raise MigrationError(
            f"cannot migrate {namespace!r} to {target.backend} with the same options: it is already there"
        )
    return MigrationState(
        namespace=namespace,
        source=source,
        target=target,
        phase=Phase.DUAL_WRITE,
        rate=check_rate(rate),
        shadow_fraction=check_shadow_fraction(shadow_fraction),
        serial=1,
        started_ms=now_ms,
        changed_ms=now_ms,
    )


# (command) -> (phases it is allowed in, phase it leads to)
COMMANDS: dict[str, tuple[frozenset[Phase], Phase]] = {
    "promote": (frozenset({Phase.SHADOW_READ}), Phase.PROMOTED),
    "finish": (frozenset({Phase.PROMOTED}), Phase.FINISHED),
    "abort": (
        frozenset({Phase.DUAL_WRITE, Phase.BACKFILL, Phase.SHADOW_READ, Phase.PROMOTED}),
        Phase.ABORTED,
    ),
}


def _moved(state: MigrationState, now_ms: int, **changes: Any) -> MigrationState:
    changes.setdefault("previous", None)
    return msgspec.structs.replace(state, serial=state.serial + 1, changed_ms=now_ms, **changes)


def command(state: MigrationState, progress: Progress | None, name: str, now_ms: int) -> MigrationState:
    """The state after the user's command ``name`` (promote, finish, abort), or
    MigrationError naming the phase and what it allows; ``state`` is not changed."""
    if name not in COMMANDS:
        raise MigrationError(f"unknown migration command {name!r}: use one of {', '.join(COMMANDS)}")
    allowed, to = COMMANDS[name]
    if state.phase not in allowed:
        here = [c for c, (phases, _) in COMMANDS.items() if state.phase in phases]
        why = ""
        if name == "promote" and state.phase in (Phase.DUAL_WRITE, Phase.BACKFILL):
            copied = progress.copied if progress is not None else 0
            why = f"; the backfill is not done ({copied} records copied)"
        return_hint = f"allowed now: {', '.join(here)}" if here else "the migration is over"
        raise MigrationError(
            f"cannot {name} the migration of {state.namespace!r} in phase {state.phase}{why} ({return_hint})"
        )
    if name == "promote" and progress is not None and progress.dropped:
        raise MigrationError(
            f"cannot promote {state.namespace!r}: {progress.dropped} writes to the target were dropped "
            "(retry queue full), so the target misses them: abort and start the migration again"
        )
    if name == "promote" and progress is not None and progress.queued:
        raise MigrationError(
            f"cannot promote {state.namespace!r} yet: {progress.queued} writes wait for the target "
            "(it did not take them); promote once they are delivered"
        )
    return _moved(state, now_ms, phase=to, previous=state.phase)


def revert(state: MigrationState, now_ms: int) -> MigrationState | None:
    """The state back in the phase the last command left (a worker could not apply
    it: ``prism.migrate.dual``'s barrier), or None if there is none to go back to."""
    if state.previous is None or state.previous is state.phase:
        return None
    return _moved(state, now_ms, phase=state.previous, previous=None)


def advance(state: MigrationState, progress: Progress | None, now_ms: int) -> MigrationState | None:
    """The automatic move from ``state``, or None: DUAL_WRITE -> BACKFILL (call it once
    every worker applied DUAL_WRITE), BACKFILL -> SHADOW_READ once ``progress.done``."""
    if state.phase is Phase.DUAL_WRITE:
        return _moved(state, now_ms, phase=Phase.BACKFILL)
    if state.phase is Phase.BACKFILL and progress is not None and progress.done:
        return _moved(state, now_ms, phase=Phase.SHADOW_READ)
    return None


def set_rate(state: MigrationState, rate: int, now_ms: int) -> MigrationState:
    """The state with a new backfill rate (it takes effect at the next page)."""
    check_rate(rate)
    if state.phase in ENDED:
        raise MigrationError(f"the migration of {state.namespace!r} is {state.phase}: no rate to change")
    return _moved(state, now_ms, rate=rate)


def merge_progress(backfill: Progress | None, workers: Iterable[Progress]) -> Progress:
    """One view for ``status``: the backfill's cursor, count and rate, plus every
    worker's counters summed (each worker counts its own writes and reads)."""
    out = msgspec.structs.replace(backfill) if backfill is not None else Progress()
    out.mismatches = dict(out.mismatches)
    for p in workers:
        out.target_failures += p.target_failures
        out.queued += p.queued
        out.pending += p.pending
        out.dropped += p.dropped
        out.shadow_reads += p.shadow_reads
        out.mismatched_reads += p.mismatched_reads
        for kind, n in p.mismatches.items():
            out.mismatches[kind] = out.mismatches.get(kind, 0) + n
        out.updated_ms = max(out.updated_ms, p.updated_ms)
    return out


class MigrationStore:
    """The migrations' files under ``data_dir/migrations``."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "migrations"

    def _path(self, sub: str, namespace: str) -> Path:
        check_namespace(namespace)
        return (self.dir / sub / f"{namespace}.json") if sub else self.dir / f"{namespace}.json"

    def load(self, namespace: str) -> MigrationState | None:
        state = _read(self._path("", namespace), MigrationState)
        if state is not None and state.namespace != namespace:
            raise MigrationError(
                f"migration state {self._path('', namespace)}: names namespace {state.namespace!r}, "
                "not its file's; remove it or fix it"
            )
        return state

    def all(self) -> list[MigrationState]:
        """Every migration under way (finished and aborted ones are removed), by namespace."""
        try:
            names = sorted(p.name[: -len(".json")] for p in self.dir.iterdir() if p.name.endswith(".json"))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise MigrationError(f"migration state {self.dir}: cannot list: {e.strerror or e}") from None
        return [s for s in (self.load(n) for n in names if _NAMESPACE_NAME.fullmatch(n)) if s is not None]

    def save(self, state: MigrationState) -> None:
        _write(self.dir, self._path("", state.namespace), msgspec.json.encode(state))

    def load_progress(self, namespace: str) -> Progress | None:
        return _read(self._path("progress", namespace), Progress)

    def save_progress(self, namespace: str, progress: Progress) -> None:
        _write(self.dir, self._path("progress", namespace), msgspec.json.encode(progress))

    def last(self, namespace: str) -> MigrationState | None:
        """The state a finished or aborted migration of ``namespace`` ended in."""
        return _read(self._path("done", namespace), MigrationState)

    def remove(self, namespace: str) -> None:
        """Let a migration go (after finish or abort): its last state is kept in ``done/``."""
        state = self.load(namespace)
        if state is not None:
            _write(self.dir, self._path("done", namespace), msgspec.json.encode(state))
        for path in (self._path("", namespace), self._path("progress", namespace)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise MigrationError(f"migration state {path}: cannot remove: {e.strerror or e}") from None
        _fsync_dir(self.dir)


def _read(path: Path, kind: type[_T]) -> _T | None:
    """The file decoded as ``kind``; None if there is none; MigrationError (one line) if it
    cannot be read or is not what it should be."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise MigrationError(f"migration state {path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_STATE_FILE_BYTES:
        raise MigrationError(
            f"migration state {path}: larger than {MAX_STATE_FILE_BYTES} bytes: not a state file"
        )
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as e:
        raise MigrationError(f"migration state {path}: corrupt ({e}); remove it or fix it") from None


def _write(root: Path, path: Path, data: bytes) -> None:
    """Replace ``path`` (in ``root`` or a subdirectory of it) with ``data`` atomically
    and durably: 0600, in directories made 0700."""
    try:
        root.mkdir(mode=0o700, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_private(path, data, durable=True)
    except OSError as e:
        raise MigrationError(f"migration state {path}: cannot write: {e.strerror or e}") from None


def write_private(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` (0600), whole or not at all; with
    ``durable``, fsynced, the rename too. Raises OSError, the file unchanged."""
    write_atomically(str(path), data, mode=0o600, durable=durable)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
