"""The control path of live migrations, in one process: the request box, the
supervisor's ``Migrations`` (the one writer of states), the config rewrite
of ``finish``, ``/v1/migrations`` through the ASGI app, and ``prism migrate``'s
argument checks. Real processes: ``tests/e2e/test_migrations.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from prism.admin.app import make_app
from prism.admin.migrations_api import MigrationTarget
from prism.config import load_config
from prism.config.rewrite import RewriteError, retarget
from prism.migrate.requests import (
    MAX_PENDING,
    MigrationRequest,
    RequestBox,
    read_worker_stats,
    write_worker_stats,
)
from prism.migrate.state import MigrationError, MigrationStore, Phase, Progress
from prism.router.table import Routes
from prism.workers.migrations import Migrations
from prism.workers.slot import Slot, SlotState
from tests.unit.test_admin_diff import running

TOKEN = b"s3cr3t-admin-token"
CONFIG = b"""# a comment finish keeps
workers = 2
[[namespaces]]
name = "profiles"
backend = "sqlite"
cache = { enabled = true, ttl_s = 5.0 }

[[tenants]]
name = "pay"
[[tenants.namespaces]]
name = "ledger"
backend = "sqlite"
[[tenants.namespaces]]
name = "ts"
abstraction = "timeseries"
backend = "sqlite"
"""
PG = {"dsn": "postgresql://u:pw@127.0.0.1/app"}


def request(namespace: str, command: str, **fields: Any) -> MigrationRequest:
    request.n += 1  # type: ignore[attr-defined]
    return MigrationRequest(f"req{request.n:04d}", namespace, command, made_ms=request.n, **fields)  # type: ignore[attr-defined]


request.n = 0  # type: ignore[attr-defined]


class World:
    """A config file, a data dir, slots for each tenant's workers, and the supervisor's Migrations."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "prism.toml"
        self.path.write_bytes(CONFIG)
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.config = load_config(str(self.path), {}, {})
        self.migrations = Migrations(self.data, str(self.path))
        self.slots = [Slot(0, "default", 0, SlotState.SERVING), Slot(1, "default", 1, SlotState.SERVING)]
        self.slots.append(Slot(2, "pay", 0, SlotState.SERVING))
        self.generation = 1
        self.reloads = 0
        self.routes = self.publish()

    def publish(self) -> Routes:
        self.generation += 1
        base = running(self.config, self.generation)
        self.routes = msgspec.structs.replace(
            base,
            migrations=self.migrations.entries(self.generation, self.config, 2, self.slots),
            migration_answers=self.migrations.table_answers(),
        )
        return self.routes

    def reload(self) -> bool:
        self.reloads += 1
        self.config = load_config(str(self.path), {}, {})
        return True

    def turn(self) -> None:
        self.migrations.requested = True
        if self.migrations.turn(self.config, 2, self.slots, self.reload) or self.migrations.moved(
            self.slots, self.config, 2
        ):
            self.publish()

    def beat(self) -> None:
        """Every worker reports the newest generation (it applied the table)."""
        for slot in self.slots:
            slot.generation = self.generation
        self.turn()

    def send(self, req: MigrationRequest) -> tuple[int, int, str]:
        self.migrations.box.post(req)
        self.turn()
        return self.routes.migration_answers[req.id]


def test_the_box_hands_requests_over_oldest_first_and_reports_junk_once(tmp_path: Path) -> None:
    box = RequestBox(tmp_path)
    box.post(MigrationRequest("b", "ns", "abort", made_ms=2))
    box.post(MigrationRequest("a", "ns", "promote", made_ms=1))
    (box.dir / "junk.json").write_bytes(b"{not json")
    taken, bad = box.take()
    assert [r.id for r in taken] == ["a", "b"]
    assert len(bad) == 1 and "junk.json" in bad[0]
    assert box.take() == ([], [])
    assert oct(box.dir.stat().st_mode & 0o777) == "0o700"


def test_the_box_refuses_a_pile_of_requests_and_bad_names(tmp_path: Path) -> None:
    box = RequestBox(tmp_path)
    for i in range(MAX_PENDING):
        box.post(MigrationRequest(f"r{i}", "ns", "abort"))
    with pytest.raises(MigrationError, match="wait for the supervisor"):
        box.post(MigrationRequest("one-more", "ns", "abort"))
    with pytest.raises(MigrationError, match="must be 1-128"):
        box.post(MigrationRequest("x", "../evil", "abort"))


def test_worker_counters_are_read_back_per_worker(tmp_path: Path) -> None:
    write_worker_stats(tmp_path, "ns", 0, Progress(shadow_reads=3, mismatches={"value": 1}))
    write_worker_stats(tmp_path, "ns", 1, Progress(shadow_reads=4))
    assert sorted(p.shadow_reads for p in read_worker_stats(tmp_path, "ns")) == [3, 4]
    assert read_worker_stats(tmp_path, "other") == []


def test_retarget_names_the_new_backend_and_keeps_everything_else() -> None:
    out = retarget(CONFIG, "ledger", "postgres", PG)
    doc = tomllib.loads(out.decode())
    assert doc["tenants"][0]["namespaces"][0] == {"name": "ledger", "backend": "postgres", "options": PG}
    before = tomllib.loads(CONFIG.decode())
    before["tenants"][0]["namespaces"][0] = doc["tenants"][0]["namespaces"][0]
    assert doc == before
    top = tomllib.loads(retarget(CONFIG, "profiles", "redis", {"url": "redis://h/0"}).decode())
    assert top["namespaces"][0]["backend"] == "redis" and top["namespaces"][0]["cache"]["ttl_s"] == 5.0
    with pytest.raises(RewriteError, match="no namespace 'nope'"):
        retarget(CONFIG, "nope", "redis", {})
    with pytest.raises(RewriteError, match="does not parse"):
        retarget(b"[[x", "nope", "redis", {})


COMMENTED = b"""# The gateway of the shop (owner: platform team)
workers = 2   # one per core

[[namespaces]]
name = "profiles"      # user profiles
backend = "sqlite"
# nothing else

[[tenants]]
name = "pay"

  # the ledger moves to PostgreSQL
  [[tenants.namespaces]]
  name = "ledger"
  backend = "sqlite"   # was: memory

  [tenants.namespaces.options]
  path = "ledger.db"   # relative to data_dir
  synchronous = "full"

  [[tenants.namespaces]]
  name = "audit"
  backend = "sqlite"
  options = { path = "audit.db" }  # inline
"""


def test_retarget_keeps_comments_layout_and_every_other_line() -> None:
    out = retarget(COMMENTED, "ledger", "postgres", {"dsn": "postgresql://h/app", "pool_size": 4})
    doc = tomllib.loads(out.decode())
    ledger = doc["tenants"][0]["namespaces"][0]
    assert ledger == {
        "name": "ledger",
        "backend": "postgres",
        "options": {"dsn": "postgresql://h/app", "pool_size": 4},
    }
    before, after = COMMENTED.decode().splitlines(), out.decode().splitlines()
    changed = [(a, b) for a, b in zip(before, after, strict=False) if a != b]
    assert changed == [
        ('  backend = "sqlite"   # was: memory', '  backend = "postgres"   # was: memory'),
        ('  path = "ledger.db"   # relative to data_dir', '  dsn = "postgresql://h/app"'),
        ('  synchronous = "full"', "  pool_size = 4"),
    ]
    assert len(after) == len(before)  # every comment and blank line where it was
    inline = retarget(COMMENTED, "audit", "redis", {"url": "redis://h/0", "tls": {"ca": "x"}, "n": [1, 2]})
    assert (
        '  options = {url = "redis://h/0", tls = {ca = "x"}, n = [1, 2]}  # inline'
        in inline.decode().splitlines()
    )
    assert tomllib.loads(inline.decode())["tenants"][0]["namespaces"][1]["options"]["tls"] == {"ca": "x"}
    bare = retarget(COMMENTED, "profiles", "redis", {"url": "redis://h/0", "ratio": float("inf")})
    assert bare.decode().splitlines()[:9] == [
        *COMMENTED.decode().splitlines()[:5],
        'backend = "redis"',
        "# nothing else",
        'options = {url = "redis://h/0", ratio = inf}',
        "",
    ]
    assert tomllib.loads(bare.decode())["namespaces"][0]["options"] == {
        "url": "redis://h/0",
        "ratio": float("inf"),
    }
    with pytest.raises(RewriteError, match="cannot write the options as TOML"):
        retarget(COMMENTED, "audit", "redis", {"bad": object()})


def test_a_migration_goes_through_every_phase_and_finish_rewrites_the_config(tmp_path: Path) -> None:
    w = World(tmp_path)
    serial, code, error = w.send(request("ledger", "start", to="postgres", options=PG, rate=50))
    assert (serial, code, error) == (1, 200, "")
    entry = w.routes.migrations["ledger"]
    assert entry.phase == "dual_write" and entry.tenant == "pay" and entry.lagging == (2,)
    assert "pw" not in msgspec.json.encode(w.routes).decode()  # no option reaches the shared table
    assert [s.namespace for s in w.migrations.by_tenant(w.config, 2)["pay"]] == ["ledger"]
    assert w.migrations.by_tenant(w.config, 2)["default"] == ()
    w.turn()
    assert w.routes.migrations["ledger"].phase == "dual_write"  # a worker has not applied it yet
    w.beat()
    assert w.routes.migrations["ledger"].phase == "backfill"  # every worker writes to both now
    w.beat()
    assert w.routes.migrations["ledger"].lagging == ()
    early = w.send(request("ledger", "promote"))
    assert early[1] == 409 and "backfill is not done" in early[2]
    assert w.send(request("ledger", "rate", rate=500))[1] == 200
    assert MigrationStore(w.data).load("ledger").rate == 500  # type: ignore[union-attr]
    MigrationStore(w.data).save_progress("ledger", Progress(copied=7, done=True))
    w.beat()
    w.turn()
    assert w.routes.migrations["ledger"].phase == "shadow_read"
    w.beat()
    assert w.send(request("ledger", "promote"))[1] == 200
    w.beat()
    assert w.send(request("ledger", "finish"))[1] == 200
    assert w.reloads == 0  # not before every worker applied FINISHED
    w.beat()
    assert w.reloads == 1
    assert w.routes.migrations["ledger"].final and w.routes.migrations["ledger"].phase == "finished"
    ledger = next(ns for ns in w.config.all_namespaces() if ns.name == "ledger")
    assert (ledger.backend, ledger.options) == ("postgres", PG)
    assert MigrationStore(w.data).load("ledger") is None
    assert MigrationStore(w.data).last("ledger").phase is Phase.FINISHED  # type: ignore[union-attr]
    assert w.routes.migrations["ledger"].lagging == (2,)
    w.beat()
    assert w.routes.migrations["ledger"].lagging == ()


def test_refusals_change_nothing(tmp_path: Path) -> None:
    w = World(tmp_path)
    cases = [
        (request("nope", "start", to="postgres", options=PG), 404, "unknown namespace 'nope'"),
        (request("ts", "start", to="postgres", options=PG), 422, "only KeyValue"),
        (request("ledger", "start", to="sqlite"), 422, "same options"),
        (request("ledger", "start", to="memory"), 422, "target must be one of"),
        (request("ledger", "start", to="postgres", options={"pool_size": 0}), 422, "options.pool_size"),
        (request("ledger", "start", to="postgres", options={"colour": 1}), 422, "colour"),
        (request("ledger", "start", to="postgres", rate=0), 422, "rate must be"),
        (request("ledger", "promote"), 409, "no migration of 'ledger'"),
        (request("ledger", "rate", rate=5), 409, "no migration"),
    ]
    for req, code, text in cases:
        serial, status, error = w.send(req)
        assert (serial, status) == (0, code), (req, error)
        assert text in error
    assert MigrationStore(w.data).all() == [] and w.routes.migrations == {}
    assert w.send(request("ledger", "start", to="postgres", options=PG))[1] == 200
    again = w.send(request("ledger", "start", to="redis"))
    assert again[1] == 409 and "migrating already (phase dual_write)" in again[2]


def test_finish_without_a_config_file_is_refused_before_anything_changes(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.migrations.config_file = ""
    w.send(request("ledger", "start", to="postgres", options=PG))
    store = MigrationStore(w.data)
    store.save(msgspec.structs.replace(store.load("ledger"), phase=Phase.PROMOTED))  # type: ignore[type-var]
    w.migrations.boot(w.config)
    w.migrations.states = {s.namespace: s for s in store.all()}
    _, code, error = w.send(request("ledger", "finish"))
    assert code == 409 and "without a config file" in error
    assert store.load("ledger").phase is Phase.PROMOTED  # type: ignore[union-attr]


def test_abort_lets_the_state_go_once_every_worker_applied_it_and_a_restart_resumes(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.send(request("ledger", "start", to="postgres", options=PG))
    w.beat()
    resumed = Migrations(w.data, str(w.path))
    resumed.boot(w.config)
    assert resumed.states["ledger"].phase is Phase.BACKFILL
    assert w.send(request("ledger", "abort"))[1] == 200
    assert MigrationStore(w.data).load("ledger").phase is Phase.ABORTED  # type: ignore[union-attr]
    w.beat()
    assert MigrationStore(w.data).load("ledger") is None and w.reloads == 0
    assert w.routes.migrations["ledger"].final
    assert w.path.read_bytes() == CONFIG


def admin_app(w: World) -> Any:
    def current() -> Routes:
        w.beat()  # a turn of the supervisor's loop, its workers applying what it published
        return w.routes

    return make_app(current, token=TOKEN, migration_target=MigrationTarget(w.data, w.turn))


async def call(
    app: Any,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    token: bytes | None = TOKEN,
    kind: bytes = b"application/json",
) -> tuple[int, Any]:
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", kind)]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token))
    scope = {
        "type": "http",
        "method": method,
        "path": path.split("?")[0],
        "query_string": path.partition("?")[2].encode(),
        "headers": headers,
    }
    chunks = [body]

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": False}
        await trio.sleep_forever()
        raise AssertionError

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], msgspec.json.decode(raw) if raw.startswith(b"{") else raw


async def test_the_admin_api_starts_shows_and_refuses(tmp_path: Path) -> None:
    w = World(tmp_path)
    app = admin_app(w)
    status, answer = await call(
        app,
        "POST",
        "/v1/migrations/ledger/start?wait=5",
        b'{"to": "postgres", "options": {"dsn": "postgresql://u:pw@h/app"}}',
    )
    assert status == 200, answer
    assert answer["phase"] in ("dual_write", "backfill") and answer["progress"]["copied"] == 0
    status, listing = await call(app, "GET", "/v1/migrations")
    assert status == 200 and [m["namespace"] for m in listing["migrations"]] == ["ledger"]
    assert b"pw" not in msgspec.json.encode(listing)
    refusals = [
        ("POST", "/v1/migrations/ledger/start", b"{bad", TOKEN, 400, "bad request body"),
        ("POST", "/v1/migrations/ledger/start", b'{"to": 5}', TOKEN, 400, "bad request body"),
        ("POST", "/v1/migrations/ledger/rate", b'{"rate": 0}', TOKEN, 400, "rate must be"),
        ("POST", "/v1/migrations/ledger/rate", b'{"rate": 5, "to": "x"}', TOKEN, 400, "only 'rate'"),
        ("POST", "/v1/migrations/ledger/abort", b'{"rate": 5}', TOKEN, 400, "takes no fields"),
        ("POST", "/v1/migrations/ledger/start", b"x" * 20000, TOKEN, 413, "at most"),
        ("POST", "/v1/migrations/nope/abort", b"", TOKEN, 404, "unknown namespace"),
        ("POST", "/v1/migrations/ledger/start?wait=x", b'{"to": "redis"}', TOKEN, 400, "wait"),
        ("DELETE", "/v1/migrations/ledger", b"", TOKEN, 405, "use POST"),
        ("GET", "/v1/migrations/profiles", b"", TOKEN, 404, "no migration of 'profiles'"),
        ("GET", "/v1/migrations/nope", b"", TOKEN, 404, "unknown namespace"),
    ]
    for method, path, body, token, code, text in refusals:
        status, answer = await call(app, method, path, body, token=token)
        assert status == code, (path, body, answer)
        assert text in answer["error"]
    assert (await call(app, "POST", "/v1/migrations/ledger/abort", token=None))[0] == 401
    status, answer = await call(
        app, "POST", "/v1/migrations/ledger/start", b'{"to": "redis"}', kind=b"text/plain"
    )
    assert status == 415
    assert MigrationStore(w.data).load("ledger").rate == 1000  # type: ignore[union-attr]


async def test_without_an_admin_token_nothing_is_changed_over_http(tmp_path: Path) -> None:
    w = World(tmp_path)
    app = make_app(lambda: w.routes, migration_target=MigrationTarget(w.data, w.beat))
    status, answer = await call(app, "POST", "/v1/migrations/ledger/start", b'{"to": "postgres"}', token=None)
    assert status == 403 and "admin_token_file" in answer["error"]
    assert not (w.data / "migrations").exists()


async def test_a_command_not_applied_by_every_worker_in_time_is_504_naming_them(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    w = World(tmp_path)
    app = make_app(lambda: w.routes, token=TOKEN, migration_target=MigrationTarget(w.data, w.turn))
    status, answer = await call(app, "POST", "/v1/migrations/ledger/start?wait=3", b'{"to": "postgres"}')
    assert status == 504 and "waiting for workers 2" in answer["error"], answer


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["start", "x", "--to", "postgres", "--options", "nope"], "not a TOML inline table"),
        (["start", "x", "--to", "postgres", "--rate", "0"], "not from 1 to 1000000"),
        (["start", "x", "--to", "postgres", "--shadow-fraction", "2"], "not from 0 to 1"),
        (["rate", "x", "many"], "not a whole number"),
        (["start", "x"], "--to"),
    ],
)
def test_prism_migrate_refuses_bad_arguments_with_exit_2(args: list[str], text: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_ADMIN")}
    done = subprocess.run(
        [sys.executable, "-m", "prism.cli", "migrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2 and text in done.stderr


def test_status_shows_the_share_copied_and_the_time_left() -> None:
    from prism.cli.migrate import render

    entry = {
        "namespace": "profiles", "phase": "backfill",
        "source_backend": "sqlite", "target_backend": "postgres",
        "serial": 3, "tenant": "default", "rate": 1000, "shadow_fraction": 0.1, "lagging": [],
        "progress": {"copied": 400, "total": 1000, "percent": 40.0, "eta_s": 0.6, "done": False,
                     "records_per_s": 1000.0},
    }  # fmt: skip
    lines = list(render(entry))
    assert lines[1] == (
        "  backfill: 400 of ~1000 records copied (40%, running), 1000 records/s, about 0.6 s left, "
        "rate limit 1000/s"
    )
    entry["progress"] = {"copied": 7, "total": None, "percent": None, "eta_s": None, "done": False}
    assert list(render(entry))[1] == "  backfill: 7 records copied (running), 0 records/s, rate limit 1000/s"
