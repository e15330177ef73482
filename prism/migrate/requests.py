"""How a migration command reaches the supervisor, and how workers' counters reach ``status``.

The supervisor is the only writer of a migration's state file
(``prism.migrate.state``): it checks a command against its running config
(the namespace, its tenant, its backend and options) and its own copy of
the state, so two writers can never race on a serial. The admin process
(``POST /v1/migrations/...``) therefore does not change a state: it writes
a *request* under ``DATA_DIR/migrations/requests/`` (one file, replaced
whole), sends the supervisor SIGUSR1, and waits for the supervisor's answer
in the routing table (``Routes.migration_answers``, keyed by the request's
id) and then for every worker of the tenant to report the new serial
(``MigrationEntry.lagging``). A request the supervisor has read is removed;
one left by a crash is read at the next start.

Each worker holding a migrating namespace writes its own counters
(``Progress``: target failures, queued and dropped writes, shadow reads,
mismatches) to ``DATA_DIR/migrations/stats/<namespace>/w<worker id>.json``
every second; the admin process sums them with the backfill's progress
(``state.merge_progress``). Counters of a worker that restarted start from
zero again: they are the state of the queues now, plus what this run saw.

No trio: the supervisor imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Final

import msgspec

from prism.migrate.state import MigrationError, Progress, check_namespace, write_private

__all__ = [
    "COMMAND_NAMES",
    "MAX_PENDING",
    "MigrationRequest",
    "RequestBox",
    "read_worker_stats",
    "write_worker_stats",
]

# What a request may ask: the user's commands, plus a new start and a new rate.
COMMAND_NAMES: Final = ("start", "promote", "finish", "abort", "rate")
MAX_PENDING: Final = 64  # requests waiting for the supervisor; more is someone looping
MAX_REQUEST_BYTES: Final = 64 * 1024
_STATS_BYTES: Final = 64 * 1024


class MigrationRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One command for the supervisor. ``to``/``options``/``shadow_fraction`` for
    ``start``; ``rate`` for ``start`` and ``rate``."""

    id: str
    namespace: str
    command: str
    to: str = ""
    options: dict[str, Any] = {}
    rate: int | None = None
    shadow_fraction: float | None = None
    made_ms: int = 0


def _write_private(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace ``path`` with ``data`` (0600, directories 0700), whole or not at all."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(path, data, durable=durable)


class RequestBox:
    """``DATA_DIR/migrations/requests/``: the admin process posts, the supervisor takes."""

    def __init__(self, data_dir: Path | str) -> None:
        self.dir = Path(data_dir) / "migrations" / "requests"

    def post(self, request: MigrationRequest) -> None:
        """Leave ``request`` for the supervisor; MigrationError (one line) if it cannot be."""
        check_namespace(request.namespace)
        try:
            pending = (
                sum(1 for p in self.dir.iterdir() if p.name.endswith(".json")) if self.dir.is_dir() else 0
            )
            if pending >= MAX_PENDING:
                raise MigrationError(
                    f"{pending} migration requests wait for the supervisor already; is it running?"
                )
            _write_private(self.dir / f"{request.id}.json", msgspec.json.encode(request), durable=True)
        except OSError as exc:
            raise MigrationError(
                f"cannot write a migration request in {self.dir}: {exc.strerror or exc}"
            ) from None

    def take(self) -> tuple[list[MigrationRequest], list[str]]:
        """The requests waiting, oldest first, each removed as it is read; and one line
        for each file that was not a request (removed too, so it is reported once)."""
        try:
            paths = [p for p in self.dir.iterdir() if p.name.endswith(".json")]
        except OSError:
            return [], []
        found: list[tuple[int, str, MigrationRequest]] = []
        bad: list[str] = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read(MAX_REQUEST_BYTES + 1)
                path.unlink()
            except OSError:
                continue  # taken by someone else, or unreadable: nothing to act on
            try:
                request = msgspec.json.decode(data, type=MigrationRequest)
            except msgspec.DecodeError as exc:
                bad.append(f"migration request {path.name} ignored: {exc}")
                continue
            found.append((request.made_ms, request.id, request))
        found.sort(key=lambda t: (t[0], t[1]))
        return [r for _, _, r in found], bad


def _stats_dir(data_dir: Path | str, namespace: str) -> Path:
    return Path(data_dir) / "migrations" / "stats" / check_namespace(namespace)


def write_worker_stats(data_dir: Path | str, namespace: str, worker_id: int, stats: Progress) -> None:
    """Replace this worker's counters for ``namespace`` (not fsynced: they are redone every second)."""
    _write_private(
        _stats_dir(data_dir, namespace) / f"w{worker_id}.json", msgspec.json.encode(stats), durable=False
    )


def read_worker_stats(
    data_dir: Path | str, namespace: str, *, fresh_s: float | None = None
) -> list[Progress]:
    """Every worker's counters for ``namespace`` (files that cannot be read are skipped);
    with ``fresh_s``, only those written in the last ``fresh_s`` seconds (live workers':
    a worker gone since, retired by a reload, leaves its last file behind)."""
    out = []
    oldest = time.time() - fresh_s if fresh_s is not None else 0.0
    try:
        paths = sorted(_stats_dir(data_dir, namespace).glob("w*.json"))
    except (OSError, MigrationError):
        return []
    for path in paths:
        try:
            if fresh_s is not None and path.stat().st_mtime < oldest:
                continue
            with open(path, "rb") as f:
                out.append(msgspec.json.decode(f.read(_STATS_BYTES), type=Progress))
        except (OSError, msgspec.DecodeError):
            continue
    return out


def clear_worker_stats(data_dir: Path | str, namespace: str) -> None:
    """Remove every worker's counters for ``namespace`` (a new migration starts from zero)."""
    directory = _stats_dir(data_dir, namespace)
    for path in directory.glob("w*.json") if directory.is_dir() else ():
        try:
            path.unlink()
        except OSError:
            pass
