"""``POST /v1/config``: check a new config, show what it changes, write it and reload.

The body is the whole TOML file (``Content-Type: application/toml``, at
most ``MAX_BODY_BYTES``, read within ``BODY_TIMEOUT_S``). It is checked as
``prism serve`` checks its config at start and on a reload: the same layers
(the server's ``PRISM_*`` environment and flags over the file, from the
admin spec), the same validation (``prism.config``) and the same preflight
(CPUs, TLS, JWKS and token files, the routing table's size against the
running server's buffer). Then:

- ``?dry_run=1``: 200 with the changes (``prism.admin.diff``) and ``base``,
  a digest of the running config; nothing is written.
- otherwise, with ``?base=`` when given still the running config's digest
  (else 409: something else changed it since the diff was shown), the file
  the server was started with is replaced atomically
  (``prism.config.store``) and the supervisor is sent SIGHUP: a reload, as
  ``prism reload`` makes one. The answer waits (``?wait=SECONDS``, default
  30, at most 120) for the supervisor's note on that reload in the routing
  table (``Routes.reload``, naming the file version it read): 200 once it
  is in effect (every new worker serves, every worker routes with it), 202
  if it is still under way when the wait ends (``reload``: ``pending``, the
  supervisor accepted it and its new workers are starting, or ``not
  started``), 422 if the supervisor
  rejected it (then the previous file is put back), 500 if a tenant's new
  workers could not boot (that tenant's previous workers serve; the file
  stays, as after a SIGHUP), 409 if another writer replaced the file
  meanwhile.

Refusals, each a JSON object with ``error`` (one line, passwords masked):
400 not UTF-8 or not TOML; 422 a config ``prism serve`` would refuse
(unknown fields included); 413 too large; 415 another content type; 408
body too slow; 403 no ``admin_token_file`` configured: changing the config
over HTTP needs the admin token, even on a loopback port, since any local
user can reach one; 409 no config file, or another apply under way;
503 no routing table yet. A refused config changes nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec
import trio

from prism.admin.diff import config_changes, running_digest, worker_counts
from prism.config import ConfigSyntaxError, ServerConfig, load_config_text
from prism.config.store import file_identity, replace_file
from prism.errors import ConfigError
from prism.redact import redact
from prism.router.table import (
    RELOAD_FAILED,
    RELOAD_IN_EFFECT,
    RELOAD_REJECTED,
    Routes,
    RoutingTableUnavailable,
)
from prism.validation import one_line
from prism.workers.preflight import check_deployable
from prism.workers.routes_size import tenant_entries

__all__ = ["BODY_TIMEOUT_S", "MAX_BODY_BYTES", "ConfigTarget", "config_endpoint"]

MAX_BODY_BYTES: Final = 1024 * 1024
BODY_TIMEOUT_S: Final = 10.0
DEFAULT_WAIT_S: Final = 30.0
MAX_WAIT_S: Final = 120.0
POLL_S: Final = 0.02
CONTENT_TYPE: Final = b"application/toml"

Answer = tuple[int, dict[str, Any]]
Receive = Callable[[], Any]


@dataclass(frozen=True)
class ConfigTarget:
    """How the running server loads its config, and how to make it reload.

    ``file``: the config file (absolute; "" when it was started without one);
    ``env`` and ``overrides``: its environment and flags; ``routes_bytes``:
    its routing table buffer; ``reload``: sends the supervisor SIGHUP;
    ``options_key``: the key of the table's option digests.
    """

    file: str
    env: Mapping[str, str]
    overrides: Mapping[str, Any]
    routes_bytes: int
    reload: Callable[[], None]
    cpus: int
    options_key: bytes = b""

    @classmethod
    def for_supervisor(
        cls, pid: int, file: str, overrides: Mapping[str, Any], routes_bytes: int, options_key: str
    ) -> ConfigTarget:
        return cls(
            file,
            dict(os.environ),
            dict(overrides),
            routes_bytes,
            lambda: os.kill(pid, signal.SIGHUP),
            len(os.sched_getaffinity(0)),
            bytes.fromhex(options_key),
        )


def _error(status: int, text: str, **extra: Any) -> Answer:
    return status, {"error": redact(one_line(text)), **extra}


def config_endpoint(
    target: ConfigTarget | None, current: Callable[[], Routes], *, token_required: bool
) -> Callable[[Mapping[str, Any], Receive], Any]:
    """The ``POST /v1/config`` handler: ``(scope, receive) -> (status, JSON object)``."""
    busy = trio.Lock()

    async def handle(scope: Mapping[str, Any], receive: Receive) -> Answer:
        if not token_required:
            return _error(
                403,
                "changing the config needs an admin token: set admin_token_file "
                "(or edit the file and run prism reload)",
            )
        if target is None or not target.file:
            return _error(409, "the server was started without a config file (--config): nothing to write")
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind != CONTENT_TYPE:
            return _error(415, f"send the config as Content-Type: {CONTENT_TYPE.decode()}")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return _error(400, "Content-Length is not a number")
        if int(length) > MAX_BODY_BYTES:
            return _error(413, f"a config is at most {MAX_BODY_BYTES} bytes")
        body = await _read_body(receive)
        if isinstance(body, tuple):
            return body
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        dry_run = query.get("dry_run", ["0"])[-1].lower() in ("1", "true", "yes")
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(query.get("wait", [DEFAULT_WAIT_S])[-1])))
        except ValueError:
            return _error(400, "wait: expected seconds")
        if busy.locked():
            return _error(409, "another POST /v1/config is under way; try again when it is done")
        async with busy:
            return await _apply(target, current, body, dry_run, query.get("base", [""])[-1], wait_s)

    return handle


async def _read_body(receive: Receive) -> bytes | Answer:
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(BODY_TIMEOUT_S):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _error(400, "the client went away before the end of the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return _error(413, f"a config is at most {MAX_BODY_BYTES} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    return _error(408, f"the body did not arrive within {BODY_TIMEOUT_S:g}s")


async def _check(target: ConfigTarget, body: bytes) -> ServerConfig | Answer:
    try:
        config = load_config_text(body, target.file, target.env, target.overrides)
        # Reads certificate, key, JWKS and token files: off the event loop.
        return await trio.to_thread.run_sync(check_deployable, config, target.routes_bytes)
    except ConfigSyntaxError as exc:
        return _error(400, str(exc))
    except ConfigError as exc:
        return _error(422, str(exc))


async def _apply(
    target: ConfigTarget, current: Callable[[], Routes], body: bytes, dry_run: bool, base: str, wait_s: float
) -> Answer:
    checked = await _check(target, body)
    if isinstance(checked, tuple):
        return checked
    try:
        routes = current()
    except RoutingTableUnavailable as exc:
        return _error(503, str(exc))
    answer: dict[str, Any] = {
        "changes": msgspec.to_builtins(config_changes(routes, checked, target.cpus, target.options_key)),
        "workers": worker_counts(tenant_entries(checked, target.cpus)),
        "running_workers": worker_counts(routes.tenants),
        "base": running_digest(routes),
        "file": target.file,
    }
    try:
        old = await trio.to_thread.run_sync(_read, target.file)
    except OSError as exc:
        return _error(500, f"cannot read {target.file}: {exc.strerror or exc}")
    answer["same_file"] = old == body
    if dry_run:
        return 200, {"dry_run": True, **answer}
    if base and base != answer["base"]:
        return _error(409, "the running config changed since the diff was made: look at the changes again")
    try:
        mine = await trio.to_thread.run_sync(replace_file, target.file, body)
    except OSError as exc:
        return _error(500, f"cannot write {target.file}: {exc.strerror or exc}; nothing changed")
    try:
        target.reload()
    except OSError as exc:
        await _put_back(target.file, mine, old)
        return _error(503, f"cannot signal the supervisor: {exc.strerror or exc}; nothing changed")
    return await _outcome(current, target.file, mine, old, wait_s, answer)


async def _outcome(
    current: Callable[[], Routes], file: str, mine: str, old: bytes, wait_s: float, answer: dict[str, Any]
) -> Answer:
    """Wait for the supervisor's note on the reload that read ``mine``; the answer it makes."""
    answer["reload"] = "not started"  # the supervisor has not read the file yet
    with trio.move_on_after(wait_s):
        while True:
            try:
                routes = current()
            except RoutingTableUnavailable:
                routes = None
            note = routes.reload if routes is not None else None
            if routes is not None and note is not None and note.file == mine:
                answer["generation"], answer["reload"] = routes.generation, note.state
                if note.state == RELOAD_IN_EFFECT:
                    return 200, {"applied": True, "in_effect": True, **answer}
                if note.state == RELOAD_REJECTED:
                    restored = await _put_back(file, mine, old)
                    return _error(422, f"reload rejected: {note.reason}", restored=restored, **answer)
                if note.state == RELOAD_FAILED:
                    return _error(500, note.reason, applied=True, in_effect=False, **answer)
            elif file_identity(file) != mine:
                # Someone else replaced the file since (an editor, another tool): the
                # server now runs, or will, their version; ours is gone.
                return _error(409, f"{file} was replaced by another writer while this config was applied")
            await trio.sleep(POLL_S)
    return 202, {"applied": True, "in_effect": False, **answer}


async def _put_back(file: str, mine: str, old: bytes) -> bool:
    """Write ``old`` back if the file is still the version we wrote."""
    if file_identity(file) != mine:
        return False
    try:
        await trio.to_thread.run_sync(replace_file, file, old)
    except OSError:
        return False
    return True


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
