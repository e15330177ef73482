"""``POST /v1/config`` through the admin ASGI app, with a stand-in supervisor: what ``prism apply`` gets back,
and what becomes of the config file."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from prism.admin.app import ASGIApp, make_app
from prism.admin.config_api import MAX_BODY_BYTES, ConfigTarget
from prism.config import load_config
from prism.config.store import file_identity
from prism.router.table import (
    RELOAD_FAILED,
    RELOAD_IN_EFFECT,
    RELOAD_PENDING,
    RELOAD_REJECTED,
    ReloadNote,
    Routes,
)
from tests.unit.test_admin_diff import KEY, running

TOKEN = b"s3cr3t-admin-token"
AUTH = (b"authorization", b"Bearer " + TOKEN)
TOML = (b"content-type", b"application/toml")

OLD = b"""# the running config
[[tenants]]
name = "web"
namespaces = [{ name = "profiles", backend = "sqlite" }]
"""
NEW = b"""# one namespace more, two workers
[[tenants]]
name = "web"
workers = 2
namespaces = [{ name = "profiles", backend = "sqlite" }, { name = "carts", backend = "sqlite" }]
"""


class Supervisor:
    """Stands in for the supervisor: publishes a routing table, and on ``reload`` reads the
    file and notes the outcome (``mode``) as the real one does."""

    def __init__(self, path: Path, mode: str = RELOAD_IN_EFFECT) -> None:
        self.path, self.mode, self.reloads = path, mode, 0
        self.routes = running(load_config(str(path), {}, {}))

    def current(self) -> Routes:
        return self.routes

    def reload(self) -> None:
        self.reloads += 1
        file = file_identity(str(self.path))  # before reading, as the supervisor does
        if self.mode == "silent":
            return
        if self.mode == "superseded":  # an editor saves the file before the reload reads it
            self.path.with_name("edited").write_bytes(OLD + b"# edited\n")
            self.path.with_name("edited").replace(self.path)
            return
        if self.mode == RELOAD_IN_EFFECT:
            self.routes = running(load_config(str(self.path), {}, {}), self.routes.generation + 2)
        reason = {RELOAD_REJECTED: "tenants[0].cpus: CPU 9 is not available here", RELOAD_FAILED: "no boot"}
        note = ReloadNote(self.reloads, file, self.mode, reason.get(self.mode, ""))
        self.routes = msgspec.structs.replace(self.routes, reload=note)


def setup(tmp_path: Path, mode: str = RELOAD_IN_EFFECT, *, token: bytes | None = TOKEN, file: bool = True):  # type: ignore[no-untyped-def]
    path = tmp_path / "conf" / "prism.toml"
    path.parent.mkdir()
    path.write_bytes(OLD)
    path.chmod(0o640)
    supervisor = Supervisor(path, mode)
    target = ConfigTarget(str(path) if file else "", {}, {}, 4 * 1024 * 1024, supervisor.reload, 2, KEY)
    return make_app(supervisor.current, token=token, config_target=target), supervisor, path


async def post(
    app: ASGIApp,
    body: bytes | Sequence[bytes],
    query: str = "",
    headers: tuple[tuple[bytes, bytes], ...] = (AUTH, TOML),
    *,
    method: str = "POST",
    stall: bool = False,
) -> tuple[int, dict[str, Any] | bytes]:
    """One request through the app; the body in one piece, or in chunks (no Content-Length)."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    length = ((b"content-length", str(len(body)).encode()),) if isinstance(body, bytes) else ()
    scope = {
        "type": "http",
        "method": method,
        "path": "/v1/config",
        "query_string": query.encode(),
        "headers": [(b"host", b"admin"), *headers, *length],
    }

    async def receive() -> dict[str, Any]:
        if not chunks:
            if stall:
                await trio.sleep_forever()
            return {"type": "http.disconnect"}
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks) or stall}

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    status, data = sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    try:
        return status, msgspec.json.decode(data)
    except msgspec.DecodeError:
        return status, data


def unchanged(path: Path, supervisor: Supervisor) -> bool:
    return path.read_bytes() == OLD and supervisor.reloads == 0 and os.listdir(path.parent) == ["prism.toml"]


async def test_a_dry_run_answers_the_changes_and_writes_nothing(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path)
    status, answer = await post(app, NEW, "dry_run=1")
    assert status == 200
    assert isinstance(answer, dict)
    assert [c["text"] for c in answer["changes"]] == [
        "+ namespace carts: keyvalue on sqlite, tenant web",
        "~ tenant web: workers 1 -> 2",
    ]
    assert (answer["workers"], answer["running_workers"], answer["same_file"]) == (
        {"web": 2},
        {"web": 1},
        False,
    )
    assert unchanged(path, supervisor)


async def test_apply_replaces_the_file_keeps_its_mode_and_waits_for_the_reload(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path)
    _, plan = await post(app, NEW, "dry_run=1")
    assert isinstance(plan, dict)
    status, answer = await post(app, NEW, f"base={plan['base']}")
    assert status == 200, answer
    assert isinstance(answer, dict)
    assert (answer["applied"], answer["in_effect"], answer["generation"]) == (True, True, 7)
    assert path.read_bytes() == NEW
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert os.listdir(path.parent) == ["prism.toml"]  # no temporary file left
    assert supervisor.reloads == 1
    # Applied: the same file again changes nothing, and says so.
    status, again = await post(app, NEW, "dry_run=1")
    assert status == 200 and isinstance(again, dict)
    assert (again["changes"], again["same_file"]) == ([], True)


async def test_a_symlinked_config_is_written_where_the_link_points(tmp_path: Path) -> None:
    app, _supervisor, path = setup(tmp_path)
    real = path.parent / "prism-v1.toml"
    path.rename(real)
    path.symlink_to(real.name)
    status, _ = await post(app, NEW)
    assert status == 200
    assert path.is_symlink() and real.read_bytes() == NEW


BAD = [
    ("not TOML", b"workers = = 2\n", TOML, 400, "invalid TOML"),
    ("not UTF-8", b'log_level = "\xff"\n', TOML, 400, "not UTF-8"),
    ("an unknown field", b"wrokers = 2\n", TOML, 422, "wrokers"),
    ("a value refused", b"workers = -1\n", TOML, 422, "workers: -1 must be >= 0"),
    ("a CPU not here", OLD.replace(b'name = "web"', b'name = "web"\ncpus = [999]'), TOML, 422, "CPU 999"),
    ("another content type", NEW, (b"content-type", b"text/plain"), 415, "application/toml"),
    ("no content type", NEW, (b"x-other", b"1"), 415, "application/toml"),
    ("too large", b"#" * (MAX_BODY_BYTES + 1), TOML, 413, "at most 1048576 bytes"),
]


@pytest.mark.parametrize(("what", "body", "kind", "status", "error"), BAD, ids=[b[0] for b in BAD])
async def test_a_bad_config_is_refused_and_changes_nothing(
    tmp_path: Path, what: str, body: bytes, kind: tuple[bytes, bytes], status: int, error: str
) -> None:
    app, supervisor, path = setup(tmp_path)
    got, answer = await post(app, body, headers=(AUTH, kind))
    assert got == status, answer
    assert isinstance(answer, dict) and error in answer["error"]
    assert "\n" not in answer["error"]
    assert unchanged(path, supervisor)


async def test_a_body_too_large_without_a_length_is_cut_off(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path)
    status, _answer = await post(app, [b"#" * 65536] * 17)
    assert status == 413
    assert unchanged(path, supervisor)


async def test_a_body_that_stops_coming_times_out(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    app, supervisor, path = setup(tmp_path)
    start = trio.current_time()
    status, _answer = await post(app, [NEW[:10]], stall=True)
    assert status == 408
    assert 10 <= trio.current_time() - start < 11
    assert unchanged(path, supervisor)


@pytest.mark.parametrize(
    "auth", [(), ((b"authorization", b"Bearer wrong"),)], ids=["no token", "wrong token"]
)
async def test_without_the_admin_token_it_is_401(
    tmp_path: Path, auth: tuple[tuple[bytes, bytes], ...]
) -> None:
    app, supervisor, path = setup(tmp_path)
    status, _answer = await post(app, NEW, headers=(*auth, TOML))
    assert status == 401
    assert unchanged(path, supervisor)


async def test_a_server_without_an_admin_token_does_not_take_configs_over_http(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path, token=None)
    status, answer = await post(app, NEW, headers=(TOML,))
    assert status == 403
    assert isinstance(answer, dict) and "admin_token_file" in answer["error"]
    assert unchanged(path, supervisor)


async def test_a_server_started_without_a_config_file_has_nothing_to_write(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path, file=False)
    status, _answer = await post(app, NEW)
    assert status == 409
    assert unchanged(path, supervisor)


async def test_other_methods_are_405(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path)
    status, _answer = await post(app, b"", method="GET")
    assert status == 405
    assert unchanged(path, supervisor)


async def test_a_stale_base_is_409(tmp_path: Path) -> None:
    app, supervisor, path = setup(tmp_path)
    status, _answer = await post(app, NEW, "base=0123")
    assert status == 409
    assert unchanged(path, supervisor)


async def test_a_reload_the_supervisor_rejects_puts_the_old_file_back(tmp_path: Path) -> None:
    app, _supervisor, path = setup(tmp_path, RELOAD_REJECTED)
    status, answer = await post(app, NEW)
    assert status == 422
    assert isinstance(answer, dict)
    assert answer["error"] == "reload rejected: tenants[0].cpus: CPU 9 is not available here"
    assert answer["restored"] is True
    assert path.read_bytes() == OLD and stat.S_IMODE(path.stat().st_mode) == 0o640


async def test_a_reload_whose_workers_cannot_boot_is_500_and_keeps_the_file(tmp_path: Path) -> None:
    app, _supervisor, path = setup(tmp_path, RELOAD_FAILED)
    status, answer = await post(app, NEW)
    assert status == 500
    assert isinstance(answer, dict) and (answer["error"], answer["in_effect"]) == ("no boot", False)
    assert path.read_bytes() == NEW


@pytest.mark.parametrize(("mode", "reload"), [("silent", "not started"), (RELOAD_PENDING, "pending")])
async def test_a_reload_not_in_effect_within_the_wait_is_202(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, mode: str, reload: str
) -> None:
    app, _supervisor, path = setup(tmp_path, mode)
    start = trio.current_time()
    status, answer = await post(app, NEW, "wait=5")
    assert status == 202
    assert isinstance(answer, dict)
    assert (answer["applied"], answer["in_effect"], answer["reload"]) == (True, False, reload)
    assert 5 <= trio.current_time() - start < 5.1
    assert path.read_bytes() == NEW


async def test_one_apply_at_a_time(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    app, supervisor, _path = setup(tmp_path, "silent")
    first: list[int] = []

    async def slow() -> None:
        first.append((await post(app, NEW, "wait=5"))[0])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow)
        await trio.testing.wait_all_tasks_blocked()
        status, answer = await post(app, NEW)
        assert status == 409
        assert isinstance(answer, dict) and "under way" in answer["error"]
    assert first == [202]
    assert supervisor.reloads == 1


async def test_a_file_replaced_by_another_writer_meanwhile_is_409(tmp_path: Path) -> None:
    app, _supervisor, path = setup(tmp_path, "superseded")
    status, answer = await post(app, NEW)
    assert status == 409
    assert isinstance(answer, dict) and "replaced by another writer" in answer["error"]
    assert path.read_bytes() == OLD + b"# edited\n"  # theirs, not put back over
