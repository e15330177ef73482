"""``/v1/migrations``: start, watch and steer live backend migrations (``prism migrate``).

- ``GET /v1/migrations``: every migration under way (and the last ended one
  of each namespace since the server started), with its progress.
- ``GET /v1/migrations/<ns>``: one: phase, serial, source and target
  backends (never their options), rate, shadow fraction, the workers that
  have not applied its serial yet, and the progress merged from every
  worker (``state.merge_progress``: copied, records/s, target failures,
  queued, pending and dropped writes, shadow reads, mismatches by kind and their
  rate); 404 if the namespace has none.
- ``POST /v1/migrations/<ns>/start`` (JSON ``{"to": BACKEND, "options":
  {...}, "rate": N, "shadow_fraction": F}``; ``to`` required), ``.../promote``,
  ``.../finish``, ``.../abort``, ``.../rate`` (``{"rate": N}``).

A POST is checked here for its form (JSON object of at most
``MAX_BODY_BYTES``, read within ``BODY_TIMEOUT_S``, known fields of the
right types and ranges, a namespace the routing table knows), then left
for the supervisor (``prism.migrate.requests``), which checks it against
its config and the migration's state and answers in the routing table.
The answer waits (``?wait=SECONDS``, default ``DEFAULT_WAIT_S``, at most
``MAX_WAIT_S``) until every worker of the namespace's tenant has applied
the new state: 200 with the migration; 504 naming the workers that did not
(the command stands: ``status`` shows when they do). Refusals change
nothing and are one line in ``error``: 400 bad JSON or field, 404 unknown
namespace, 409 a command its phase does not allow (promote before the
backfill is done, another migration under way), 422 a target it cannot
use (the same backend and options, an unknown backend, a bad option), 413,
415, 408 as for ``POST /v1/config``, 403 without ``admin_token_file``.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec
import trio

from prism.migrate.requests import MigrationRequest, RequestBox, read_worker_stats
from prism.migrate.state import (
    MigrationError,
    MigrationStore,
    Phase,
    Progress,
    check_rate,
    check_shadow_fraction,
    merge_progress,
)
from prism.redact import redact
from prism.router.table import MigrationEntry, Routes, RoutingTableUnavailable
from prism.validation import one_line

__all__ = ["MigrationTarget", "migration_metrics", "migrations_endpoint"]

MAX_BODY_BYTES: Final = 16 * 1024
BODY_TIMEOUT_S: Final = 10.0
DEFAULT_WAIT_S: Final = 10.0
MAX_WAIT_S: Final = 120.0
ANSWER_WAIT_S: Final = 10.0  # for the supervisor to take the request at all
POLL_S: Final = 0.02
COMMANDS: Final = ("start", "promote", "finish", "abort", "rate")
PREFIX: Final = "/v1/migrations"

Answer = tuple[int, Any]
Receive = Callable[[], Any]


@dataclass(frozen=True)
class MigrationTarget:
    """Where requests go (``data_dir``) and how to wake the supervisor (``signal``)."""

    data_dir: Path
    signal: Callable[[], None]

    @classmethod
    def for_supervisor(cls, pid: int, data_dir: str) -> MigrationTarget:
        return cls(Path(data_dir), lambda: os.kill(pid, signal.SIGUSR1))


class _Body(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    to: str = ""
    options: dict[str, Any] = {}
    rate: int | None = None
    shadow_fraction: float | None = None


def _error(status: int, text: str, **extra: Any) -> Answer:
    return status, {"error": redact(one_line(text)), **extra}


def _status(entry: MigrationEntry, progress: Progress) -> dict[str, Any]:
    shadow = progress.shadow_reads
    mismatched = progress.mismatched_reads  # a read may differ in several ways: counted once here
    total, copied = progress.total, progress.copied
    left = None if total is None else max(0, total - copied)
    return {
        **msgspec.to_builtins(entry),
        "progress": {
            "copied": copied,
            "total": total,  # records in the source as the copy began (an estimate), or None
            "percent": 100.0
            if progress.done
            else (round(100.0 * min(copied, total) / total, 1) if total else None),
            "eta_s": 0.0
            if progress.done
            else (
                round(left / progress.records_per_s, 1)
                if left is not None and progress.records_per_s > 0
                else None
            ),
            "done": progress.done,
            "records_per_s": round(progress.records_per_s, 1),
            "target_failures": progress.target_failures,
            "queued": progress.queued,
            "pending": progress.pending,  # acknowledged, not yet on the second backend (queued or in flight)
            "dropped": progress.dropped,
            "shadow_reads": shadow,
            "mismatches": dict(progress.mismatches),
            "mismatched_reads": mismatched,
            "mismatch_rate": (mismatched / shadow) if shadow else 0.0,
            "updated_ms": progress.updated_ms,
        },
    }


def progress_of(data_dir: Path, namespace: str) -> Progress:
    """The backfill's progress plus every worker's counters (blocking file reads)."""
    try:
        backfill = MigrationStore(data_dir).load_progress(namespace)
    except MigrationError:
        backfill = None
    return merge_progress(backfill, read_worker_stats(data_dir, namespace))


def migration_metrics(routes: Routes, data_dir: Path) -> bytes:
    """Prometheus text for every migration (appended to ``/metrics``; blocking file reads)."""
    lines = [
        "# HELP prism_migration_phase The phase a namespace's migration is in (1).",
        "# TYPE prism_migration_phase gauge",
    ]
    counters: list[tuple[str, str, str, float]] = []
    for name, entry in sorted(routes.migrations.items()):
        for phase in Phase:
            lines.append(
                f'prism_migration_phase{{namespace="{name}",phase="{phase}"}} {int(entry.phase == phase)}'
            )
        p = progress_of(data_dir, name)
        counters += [
            ("copied_records_total", name, "", p.copied),
            ("target_failures_total", name, "", p.target_failures),
            ("dropped_writes_total", name, "", p.dropped),
            ("shadow_reads_total", name, "", p.shadow_reads),
            ("queued_writes", name, "", p.queued),
            ("copy_rate", name, "", p.records_per_s),
        ]
        counters += [("mismatches_total", name, kind, n) for kind, n in sorted(p.mismatches.items())]
    helps = {
        "copied_records_total": ("counter", "Records the backfill copied to the target."),
        "target_failures_total": ("counter", "Dual writes the other backend refused (then queued)."),
        "dropped_writes_total": ("counter", "Queued dual writes let go (queue full)."),
        "shadow_reads_total": ("counter", "Reads compared with the target."),
        "queued_writes": ("gauge", "Dual writes waiting for retry."),
        "copy_rate": ("gauge", "Backfill records per second."),
        "mismatches_total": ("counter", "Shadow reads that differed, by kind."),
    }
    for metric, (kind, text) in helps.items():
        lines += [f"# HELP prism_migration_{metric} {text}", f"# TYPE prism_migration_{metric} {kind}"]
        for m, name, label, value in counters:
            if m == metric:
                extra = f',kind="{label}"' if label else ""
                lines.append(f'prism_migration_{metric}{{namespace="{name}"{extra}}} {value:g}')
    return ("\n".join(lines) + "\n").encode()


def migrations_endpoint(
    target: MigrationTarget | None, current: Callable[[], Routes], *, token_required: bool
) -> Callable[[str, str, Mapping[str, Any], Receive], Any]:
    """The ``/v1/migrations...`` handler: ``(method, path, scope, receive) -> (status, JSON)``."""

    async def handle(method: str, path: str, scope: Mapping[str, Any], receive: Receive) -> Answer:
        parts = path[len(PREFIX) :].strip("/").split("/") if path != PREFIX else []
        if target is None:
            return _error(503, "migrations need the supervisor: this admin process has none")
        try:
            routes = current()
        except RoutingTableUnavailable as exc:
            return _error(503, str(exc))
        if method in ("GET", "HEAD"):
            if len(parts) > 1:
                return _error(404, "not found")
            return await _show(target, routes, parts[0] if parts else None)
        if method != "POST" or len(parts) != 2 or parts[1] not in COMMANDS:
            return _error(
                404 if method == "POST" else 405, f"use POST {PREFIX}/<namespace>/<{'|'.join(COMMANDS)}>"
            )
        if not token_required:
            return _error(403, "changing a migration needs an admin token: set admin_token_file")
        namespace, command = parts
        if namespace not in routes.namespaces:
            return _error(404, f"unknown namespace {namespace!r}")
        body = await _read_body(scope, receive, command)
        if isinstance(body, tuple):
            return body
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(query.get("wait", [DEFAULT_WAIT_S])[-1])))
        except ValueError:
            return _error(400, "wait: expected seconds")
        request = MigrationRequest(
            id=uuid.uuid4().hex,
            namespace=namespace,
            command=command,
            to=body.to,
            options=body.options,
            rate=body.rate,
            shadow_fraction=body.shadow_fraction,
            made_ms=int(time.time() * 1000),
        )
        try:
            await trio.to_thread.run_sync(RequestBox(target.data_dir).post, request)
            target.signal()
        except MigrationError as exc:
            return _error(503, str(exc))
        except OSError as exc:
            return _error(503, f"cannot signal the supervisor: {exc.strerror or exc}")
        return await _outcome(target, current, request, wait_s)

    return handle


async def _read_body(scope: Mapping[str, Any], receive: Receive, command: str) -> _Body | Answer:
    headers = dict(scope["headers"])
    length = headers.get(b"content-length", b"0")
    if not length.isdigit():
        return _error(400, "Content-Length is not a number")
    if int(length) > MAX_BODY_BYTES:
        return _error(413, f"a migration request is at most {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    raw: bytes | None = None
    with trio.move_on_after(BODY_TIMEOUT_S):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _error(400, "the client went away before the end of the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return _error(413, f"a migration request is at most {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                raw = b"".join(chunks)
                break
    if raw is None:
        return _error(408, f"the body did not arrive within {BODY_TIMEOUT_S:g}s")
    if raw.strip():
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            return _error(415, "send the request as Content-Type: application/json")
    try:
        body = msgspec.json.decode(raw or b"{}", type=_Body)
    except msgspec.DecodeError as exc:
        return _error(400, f"bad request body: {exc}")
    try:
        if command == "start":
            if not body.to:
                return _error(400, "start needs 'to': the target backend")
            if body.rate is not None:
                check_rate(body.rate)
            if body.shadow_fraction is not None:
                check_shadow_fraction(body.shadow_fraction)
        elif command == "rate":
            check_rate(body.rate)
        elif body != _Body():
            return _error(400, f"{command} takes no fields")
        if command == "rate" and (body.to or body.options or body.shadow_fraction is not None):
            return _error(400, "rate takes only 'rate'")
    except MigrationError as exc:
        return _error(400, str(exc))
    return body


async def _show(target: MigrationTarget, routes: Routes, namespace: str | None) -> Answer:
    if namespace is not None:
        entry = routes.migrations.get(namespace)
        if entry is None:
            if namespace not in routes.namespaces:
                return _error(404, f"unknown namespace {namespace!r}")
            return _error(404, f"no migration of {namespace!r}")
        progress = await trio.to_thread.run_sync(progress_of, target.data_dir, namespace)
        return 200, _status(entry, progress)
    out = []
    for name, entry in sorted(routes.migrations.items()):
        progress = await trio.to_thread.run_sync(progress_of, target.data_dir, name)
        out.append(_status(entry, progress))
    return 200, {"migrations": out}


async def _outcome(
    target: MigrationTarget, current: Callable[[], Routes], request: MigrationRequest, wait_s: float
) -> Answer:
    """Wait for the supervisor's answer, then for every worker of the tenant to apply it."""
    serial = 0
    entry: MigrationEntry | None = None
    with trio.move_on_after(max(wait_s, ANSWER_WAIT_S)):
        while True:
            routes = current()
            answer = routes.migration_answers.get(request.id)
            if answer is not None:
                serial, code, error = answer
                if error:
                    return _error(code, error)
                break
            await trio.sleep(POLL_S)
    if not serial:
        return _error(503, "the supervisor did not take the request in time; it may still (see status)")
    final = request.command in ("finish", "abort")
    with trio.move_on_after(wait_s):
        while True:
            routes = current()
            answer = routes.migration_answers.get(request.id)
            if answer is not None and answer[2]:  # refused since: a worker could not apply it
                return _error(answer[1], answer[2])
            entry = routes.migrations.get(request.namespace)
            if (
                entry is not None
                and entry.serial >= serial
                and not entry.lagging
                and (entry.final or not final)
            ):
                progress = await trio.to_thread.run_sync(progress_of, target.data_dir, request.namespace)
                return 200, _status(entry, progress)
            await trio.sleep(POLL_S)
    lagging = ", ".join(str(w) for w in entry.lagging) if entry is not None else "?"
    return _error(
        504,
        f"{request.command} recorded, but not every worker applied it within {wait_s:g}s "
        f"(waiting for workers {lagging}); see prism migrate status {request.namespace}",
    )
