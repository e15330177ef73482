"""Live migrations against real ``prism serve`` trees: ``prism migrate`` and ``/v1/migrations``.

A SQLite namespace of a tenant with two workers moves to PostgreSQL or Redis
through every phase while another tenant serves on; a restart of ``prism
serve`` during the backfill resumes it; ``abort`` from each phase puts the
namespace back on its source with nothing lost; bad commands change nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

from tests.e2e.conftest import REPO_ROOT, PrismTree, free_port, get, put, sqlite_ns, tenant_toml
from tests.e2e.test_readiness_and_boot import Relay
from tests.pg import DSN, dsn_via
from tests.rd import RUN_PREFIX, URL

pytestmark = pytest.mark.services("postgres", "redis")

TOKEN = "e2e-migrate-token-1234"


def _tree(prism_tree: Any, name: str, *, workers: int = 2, **fields: Any) -> PrismTree:
    tree: PrismTree = prism_tree("", start=False, **fields)
    token = tree.root / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    tree.body = (
        f'admin_token_file = "{token}"  # kept by finish\n'
        + "# the tenants below: kept by finish too\n"
        + tenant_toml("a", [sqlite_ns(name), sqlite_ns("other_a")], workers=workers)
        + tenant_toml("b", [sqlite_ns("other_b")])
    )
    tree.write_config(tree.body)
    return tree.start()


def _target(kind: str, name: str) -> dict[str, Any]:
    if kind == "postgres":
        return {"dsn": DSN}
    return {"url": URL, "key_prefix": f"{RUN_PREFIX}{uuid.uuid4().hex}:"}


def _drop(name: str) -> None:
    with psycopg.connect(DSN, autocommit=True) as conn:
        for suffix in ("", "_idem", "_tomb"):
            conn.execute(f'DROP TABLE IF EXISTS "prism_kv_{name}{suffix}"'.encode())


def call(
    tree: PrismTree, method: str, path: str, body: Any = None, *, token: str | None = TOKEN
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(tree.admin_url + path, data=data, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, {"raw": raw.decode(errors="replace")}


def cli(tree: PrismTree, *args: str) -> subprocess.CompletedProcess[str]:
    token = tree.root / "admin.token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_ADMIN")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "prism.cli",
            "migrate",
            *args,
            "--endpoint",
            f"127.0.0.1:{tree.admin_port}",
            "--token-file",
            str(token),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def wait_phase(tree: PrismTree, name: str, phase: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, answer = call(tree, "GET", f"/v1/migrations/{name}")
        if status == 200 and answer["phase"] == phase and not answer["lagging"]:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not in {phase} after {timeout_s}s: {status} {answer}\n{tree.stderr()[-3000:]}"
            )
        time.sleep(0.1)


def wait_final(tree: PrismTree, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status, answer = call(tree, "GET", f"/v1/migrations/{name}")
        if status == 200 and answer["final"] and not answer["lagging"]:
            return answer
        assert time.monotonic() < deadline, (status, answer, tree.stderr()[-3000:])
        time.sleep(0.05)


def fill(tree: PrismTree, name: str, n: int, tag: bytes = b"v") -> dict[str, bytes]:
    stub = tree.kv()
    out = {}
    for i in range(n):
        put(stub, name, f"r{i:05d}", b"k", tag + str(i).encode())
        out[f"r{i:05d}"] = tag + str(i).encode()
    return out


def check_all(tree: PrismTree, name: str, expected: dict[str, bytes]) -> None:
    stub = tree.kv()
    for rid, value in expected.items():
        assert get(stub, name, rid) == {b"k": value}, rid


def backend_of(tree: PrismTree, name: str) -> str:
    status, page = call(tree, "GET", "/v1/namespaces")
    assert status == 200, page
    return str(next(ns["backend"] for ns in page["namespaces"] if ns["name"] == name))


def config_namespace(tree: PrismTree, name: str) -> dict[str, Any]:
    doc = tomllib.loads(tree.config_path.read_text())
    return next(ns for t in doc["tenants"] for ns in t["namespaces"] if ns["name"] == name)


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_sqlite_namespace_moves_through_every_phase_to_finished(prism_tree: Any, kind: str) -> None:
    name = f"mv_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name)
    try:
        before = fill(tree, name, 60)
        others = {"other_a": fill(tree, "other_a", 3), "other_b": fill(tree, "other_b", 3)}
        options = _target(kind, name)
        started = cli(tree, "start", name, "--to", kind, "--options", json_to_toml(options), "--rate", "5000")
        assert started.returncode == 0, started.stderr
        assert f"{name}: " in started.stdout
        answer = wait_phase(tree, name, "shadow_read")
        assert answer["progress"]["done"] is True
        assert answer["progress"]["copied"] == 60
        assert (answer["progress"]["total"], answer["progress"]["percent"]) == (60, 100.0)
        assert answer["target_backend"] == kind and answer["source_backend"] == "sqlite"
        during = fill(tree, name, 10, b"dual")  # r00000..r00009 rewritten while both are written
        status = cli(tree, "status", name)
        assert status.returncode == 0 and "shadow_read" in status.stdout, status
        promoted = cli(tree, "promote", name)
        assert promoted.returncode == 0, promoted.stderr
        assert "promoted" in promoted.stdout
        check_all(tree, name, {**before, **during})  # now read from the target
        finished = cli(tree, "finish", name)
        assert finished.returncode == 0, finished.stderr
        assert config_namespace(tree, name)["backend"] == kind
        text = tree.config_path.read_text()  # comments and layout kept: only the namespace changed
        assert "  # kept by finish\n# the tenants below: kept by finish too\n" in text
        assert text.count("\n") == tree.config_text(tree.body).count("\n")
        assert backend_of(tree, name) == kind
        _, final = call(tree, "GET", f"/v1/migrations/{name}")
        assert final["phase"] == "finished" and final["final"] is True
        check_all(tree, name, {**before, **during})
        for other, values in others.items():
            check_all(tree, other, values)
        assert "phase backfill -> shadow_read" in tree.stderr()
        assert not (tree.data_dir / "migrations" / f"{name}.json").exists()
    finally:
        tree.stop()
        if kind == "postgres":
            _drop(name)


def json_to_toml(options: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items()) + "}"


def test_a_restart_during_the_backfill_resumes_it_from_its_cursor(prism_tree: Any) -> None:
    name = f"rs_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name)
    try:
        before = fill(tree, name, 120)
        status, answer = call(
            tree,
            "POST",
            f"/v1/migrations/{name}/start",
            {"to": "postgres", "options": {"dsn": DSN}, "rate": 20},
        )
        assert status == 200, answer
        deadline = time.monotonic() + 30
        while True:
            _, answer = call(tree, "GET", f"/v1/migrations/{name}")
            if answer["progress"]["copied"] >= 20:
                break
            assert time.monotonic() < deadline, answer
            time.sleep(0.1)
        assert tree.stop() == 0
        copied = json.loads((tree.data_dir / "migrations" / "progress" / f"{name}.json").read_bytes())[
            "copied"
        ]
        assert 0 < copied < 120
        tree.start()
        _, answer = call(tree, "GET", f"/v1/migrations/{name}")
        assert answer["phase"] == "backfill"
        assert answer["progress"]["copied"] >= copied  # resumed, not restarted from zero
        assert call(tree, "POST", f"/v1/migrations/{name}/rate", {"rate": 5000})[0] == 200
        answer = wait_phase(tree, name, "shadow_read")
        assert answer["progress"]["copied"] == 120
        assert "resumes in phase backfill" in tree.stderr()
        assert call(tree, "POST", f"/v1/migrations/{name}/promote")[0] == 200
        check_all(tree, name, before)
    finally:
        tree.stop()
        _drop(name)


@pytest.mark.parametrize("phase", ["backfill", "shadow_read", "promoted"])
def test_abort_from_each_phase_puts_the_namespace_back_on_its_source(prism_tree: Any, phase: str) -> None:
    name = f"ab_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name)
    try:
        before = fill(tree, name, 30)
        rate = 1 if phase == "backfill" else 5000
        status, answer = call(
            tree,
            "POST",
            f"/v1/migrations/{name}/start",
            {"to": "postgres", "options": {"dsn": DSN}, "rate": rate},
        )
        assert status == 200, answer
        wait_phase(tree, name, "backfill" if phase == "backfill" else "shadow_read")
        if phase == "promoted":
            assert call(tree, "POST", f"/v1/migrations/{name}/promote")[0] == 200
        written = fill(tree, name, 5, b"late")  # written during the phase: both backends have it
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/abort")
        assert status == 200, answer
        assert answer["phase"] == "aborted" and answer["final"] is True and answer["lagging"] == []
        assert backend_of(tree, name) == "sqlite"
        assert config_namespace(tree, name)["backend"] == "sqlite"
        check_all(tree, name, {**before, **written})
        assert not (tree.data_dir / "migrations" / f"{name}.json").exists()
        # A new migration may start after an abort.
        status, answer = call(
            tree, "POST", f"/v1/migrations/{name}/start", {"to": "postgres", "options": {"dsn": DSN}}
        )
        assert status == 200, answer
    finally:
        tree.stop()
        _drop(name)


def test_bad_commands_get_one_clear_line_and_change_nothing(prism_tree: Any) -> None:
    name = f"bad_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, workers=1)
    try:
        fill(tree, name, 5)
        idle = cli(tree, "status")
        assert (idle.returncode, idle.stdout) == (0, "no migrations under way\n"), idle
        start = f"/v1/migrations/{name}/start"
        cases = [
            ("POST", "/v1/migrations/nope/start", {"to": "postgres"}, TOKEN, 404, "unknown namespace 'nope'"),
            ("POST", start, {"to": "sqlite"}, TOKEN, 422, "same options"),
            ("POST", start, {"to": "nats"}, TOKEN, 422, "the target must be one of"),
            (
                "POST",
                start,
                {"to": "postgres", "options": {"dsn": DSN, "pool_size": -1}},
                TOKEN,
                422,
                "pool_size",
            ),
            ("POST", start, {"to": "postgres", "rate": 0}, TOKEN, 400, "rate must be"),
            ("POST", start, {"to": "postgres", "shadow_fraction": 2}, TOKEN, 400, "shadow_fraction"),
            ("POST", start, {"to": "postgres", "colour": 1}, TOKEN, 400, "colour"),
            ("POST", start, {}, TOKEN, 400, "needs 'to'"),
            ("POST", start, {"to": "postgres"}, None, 401, ""),
            ("POST", start, {"to": "postgres"}, "wrong-token", 401, ""),
            ("POST", f"/v1/migrations/{name}/promote", None, TOKEN, 409, "no migration"),
            ("POST", f"/v1/migrations/{name}/explode", None, TOKEN, 404, "use POST"),
            ("GET", f"/v1/migrations/{name}", None, TOKEN, 404, "no migration"),
        ]
        for method, path, body, token, code, text in cases:
            status, answer = call(tree, method, path, body, token=token)
            assert status == code, (path, body, status, answer)
            if text:
                assert text in answer["error"], answer
                assert "\n" not in answer["error"]
        raw = urllib.request.Request(tree.admin_url + start, data=b"{not json", method="POST")
        raw.add_header("Authorization", "Bearer " + TOKEN)
        raw.add_header("Content-Type", "application/json")
        with pytest.raises(urllib.error.HTTPError) as bad_json:
            urllib.request.urlopen(raw, timeout=10)
        assert bad_json.value.code == 400
        assert not (tree.data_dir / "migrations" / f"{name}.json").exists()
        # Promote before the backfill is done: 409, the phase unchanged.
        status, answer = call(tree, "POST", start, {"to": "postgres", "options": {"dsn": DSN}, "rate": 1})
        assert status == 200, answer
        wait_phase(tree, name, "backfill")
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/promote")
        assert status == 409 and "backfill is not done" in answer["error"], answer
        assert call(tree, "GET", f"/v1/migrations/{name}")[1]["phase"] == "backfill"
        status, answer = call(tree, "POST", start, {"to": "redis", "options": {"url": URL}})
        assert status == 409 and "migrating already" in answer["error"]
        # The CLI: one line, exit 2 for a malformed request, 1 for a refusal of the phase.
        bad = cli(tree, "start", "nope", "--to", "postgres")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown namespace" in bad.stderr
        early = cli(tree, "finish", name)
        assert early.returncode == 1 and "cannot finish" in early.stderr, early
        usage = cli(tree, "start", name, "--to", "postgres", "--rate", "0")
        assert usage.returncode == 2
        assert call(tree, "POST", f"/v1/migrations/{name}/abort")[0] == 200
    finally:
        tree.stop()
        _drop(name)


def test_metrics_show_the_phase_and_the_records_copied(prism_tree: Any) -> None:
    name = f"mt_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, workers=1)
    try:
        fill(tree, name, 10)
        status, _ = call(
            tree,
            "POST",
            f"/v1/migrations/{name}/start",
            {"to": "postgres", "options": {"dsn": DSN}, "rate": 5000},
        )
        assert status == 200
        wait_phase(tree, name, "shadow_read")
        metrics = tree.metrics()
        assert f'prism_migration_phase{{namespace="{name}",phase="shadow_read"}} 1' in metrics
        assert f'prism_migration_copied_records_total{{namespace="{name}"}} 10' in metrics
    finally:
        tree.stop()
        _drop(name)


def test_a_worker_that_has_not_applied_a_command_holds_dual_write_and_is_named(prism_tree: Any) -> None:
    """Abort from dual_write: a stopped worker keeps the migration there (its writes
    could go to the source alone), a command answers 504 naming it, and abort, once
    the worker runs again, puts the namespace back on its source."""
    name = f"dw_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, heartbeat_timeout_s=60.0)  # the stopped worker is not replaced
    try:
        before = fill(tree, name, 10)
        owners = call(tree, "GET", "/v1/namespaces")[1]["namespaces"]
        stopped = max((o for ns in owners if ns["name"] == name for o in ns["owners"]), key=lambda o: o["id"])
        tree.stop_worker(stopped["pid"])
        body = {"to": "postgres", "options": {"dsn": DSN}}
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/start?wait=0.3", body)
        assert status == 504 and "waiting for workers" in answer["error"], answer
        assert str(stopped["id"]) in answer["error"].split("waiting for workers")[1], answer
        deadline = time.monotonic() + 5
        while True:  # the running worker catches up; the stopped one is named until replaced
            _, shown = call(tree, "GET", f"/v1/migrations/{name}")
            assert shown["phase"] == "dual_write", shown
            if shown["lagging"] == [stopped["id"]]:
                break
            assert time.monotonic() < deadline, shown
            time.sleep(0.02)
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/abort?wait=0.5")
        assert status == 504, answer  # recorded; the stopped worker holds it up
        os.kill(stopped["pid"], signal.SIGCONT)
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/abort?wait=30")
        assert status == 409, answer  # aborted already: nothing to abort
        answer = wait_final(tree, name)
        assert answer["phase"] == "aborted", answer
        assert "phase dual_write -> aborted" in tree.stderr()
        assert backend_of(tree, name) == "sqlite"
        check_all(tree, name, before)
    finally:
        tree.stop()
        _drop(name)


class CutRelay(Relay):
    """A relay whose ``stop`` also stops its accept: a listening socket closed while a
    thread blocks in accept() would go on accepting."""

    def stop(self) -> None:
        if self._server is not None:
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().stop()


@pytest.fixture
def pg_relay() -> Iterator[CutRelay]:
    info = psycopg.conninfo.conninfo_to_dict(DSN)
    relay = CutRelay(free_port(), (str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    yield relay
    relay.stop()


def test_a_target_down_during_dual_write_gets_its_queued_writes_once_back(
    prism_tree: Any, pg_relay: Relay
) -> None:
    name = f"dn_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, workers=1)
    pg_relay.start()
    try:
        before = fill(tree, name, 10)
        body = {
            "to": "postgres",
            "options": {"dsn": dsn_via(pg_relay.port), "connect_timeout_s": 1.0},
            "rate": 1,
        }
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/start", body)
        assert status == 200, answer
        wait_phase(tree, name, "backfill")
        pg_relay.stop()  # PostgreSQL unreachable: writes still answer, from the source
        down = fill(tree, name, 10, b"down")
        progress = wait_progress(tree, name, lambda p: p["queued"] > 0 and p["target_failures"] > 0)
        assert progress["dropped"] == 0
        pg_relay.start()
        wait_progress(tree, name, lambda p: p["queued"] == 0)
        assert call(tree, "POST", f"/v1/migrations/{name}/rate", {"rate": 5000})[0] == 200
        wait_phase(tree, name, "shadow_read")
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/promote")
        assert status == 200, answer
        check_all(tree, name, {**before, **down})  # read from the target: the queued writes arrived
    finally:
        tree.stop()
        _drop(name)


def test_writes_queued_for_a_target_down_survive_a_kill_9_of_the_worker(
    prism_tree: Any, pg_relay: Relay
) -> None:
    """The backfill is done, so only the queued copies can bring these writes to the
    target: the worker holding them is killed before it could deliver them."""
    name = f"k9_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, workers=1)
    pg_relay.start()
    try:
        before = fill(tree, name, 10)
        body = {
            "to": "postgres",
            "options": {"dsn": dsn_via(pg_relay.port), "connect_timeout_s": 1.0},
            "rate": 5000,
        }
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/start", body)
        assert status == 200, answer
        wait_phase(tree, name, "shadow_read")
        pg_relay.stop()  # PostgreSQL unreachable: writes still answer, from the source
        down = fill(tree, name, 10, b"down")
        wait_progress(tree, name, lambda p: p["queued"] == 10)
        (worker,) = owner_pids(tree, name)
        os.kill(worker, signal.SIGKILL)
        journal = tree.data_dir / "migrations" / "pending" / name
        assert any(f.stat().st_size > 0 for f in journal.iterdir())
        pg_relay.start()
        deadline = time.monotonic() + 60
        while owner_pids(tree, name) in ({worker}, set()):  # the supervisor starts another
            assert time.monotonic() < deadline, tree.stderr()[-3000:]
            time.sleep(0.2)
        wait_phase(tree, name, "shadow_read")
        wait_progress(tree, name, lambda p: p["pending"] == 0 and p["updated_ms"] > 0)
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/promote")
        assert status == 200, answer
        check_all(tree, name, {**before, **down})  # read from the target: the journal delivered them
        assert "10 writes a previous run queued for the migration target" in tree.stderr()
        assert all(f.stat().st_size == 0 for f in journal.iterdir())
    finally:
        tree.stop()
        _drop(name)


def test_promote_while_the_target_misses_acknowledged_writes_is_refused_and_changes_nothing(
    prism_tree: Any, pg_relay: Relay
) -> None:
    name = f"br_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name, workers=1)
    pg_relay.start()
    try:
        before = fill(tree, name, 5)
        body = {
            "to": "postgres",
            "options": {"dsn": dsn_via(pg_relay.port), "connect_timeout_s": 1.0},
            "rate": 5000,
        }
        assert call(tree, "POST", f"/v1/migrations/{name}/start", body)[0] == 200
        serial = wait_phase(tree, name, "shadow_read")["serial"]
        pg_relay.stop()
        down = fill(tree, name, 3, b"down")
        (worker,) = owner_pids(tree, name)
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/promote")
        assert status == 409, answer
        shown = wait_phase(tree, name, "shadow_read")
        if "writes wait for the target" not in answer["error"]:  # the counters (a second old) missed them
            # the worker's barrier refused: the supervisor went back
            wid = worker_id(tree, name)
            why = f"worker {wid}: 3 writes acknowledged to clients were not on the target (postgres)"
            assert why in answer["error"], answer
            assert "stays in phase shadow_read" in answer["error"]
            assert shown["serial"] == serial + 2  # promoted, then back
        check_all(tree, name, {**before, **down})  # the source answers, every write there
        pg_relay.start()
        wait_progress(tree, name, lambda p: p["pending"] == 0 and p["queued"] == 0)
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/promote")
        assert status == 200, answer
        check_all(tree, name, {**before, **down})  # now from the target
        assert owner_pids(tree, name) == {worker}
    finally:
        tree.stop()
        _drop(name)


def worker_id(tree: PrismTree, name: str) -> int:
    status, page = call(tree, "GET", "/v1/namespaces")
    assert status == 200, page
    (wid,) = {o["id"] for ns in page["namespaces"] if ns["name"] == name for o in ns["owners"]}
    return int(wid)


def owner_pids(tree: PrismTree, name: str) -> set[int]:
    status, page = call(tree, "GET", "/v1/namespaces")
    assert status == 200, page
    pids = {o["pid"] for ns in page["namespaces"] if ns["name"] == name for o in ns["owners"]}
    tree.known_pids.update(pids)
    return pids


def wait_progress(tree: PrismTree, name: str, ok: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        _, answer = call(tree, "GET", f"/v1/migrations/{name}")
        if ok(answer["progress"]):
            return dict(answer["progress"])
        assert time.monotonic() < deadline, f"{answer['progress']}\n{tree.stderr()[-3000:]}"
        time.sleep(0.1)


def test_a_restart_when_promoted_keeps_the_target_primary_and_finish_still_works(prism_tree: Any) -> None:
    name = f"rp_{uuid.uuid4().hex[:8]}"
    tree = _tree(prism_tree, name)
    try:
        before = fill(tree, name, 20)
        body = {"to": "postgres", "options": {"dsn": DSN}, "rate": 5000}
        assert call(tree, "POST", f"/v1/migrations/{name}/start", body)[0] == 200
        wait_phase(tree, name, "shadow_read")
        assert call(tree, "POST", f"/v1/migrations/{name}/promote")[0] == 200
        promoted = fill(tree, name, 5, b"promoted")
        assert tree.stop() == 0
        tree.start()
        answer = wait_phase(tree, name, "promoted")
        assert "resumes in phase promoted" in tree.stderr()
        check_all(tree, name, {**before, **promoted})
        with psycopg.connect(DSN) as conn:  # the target holds what was written while promoted
            rows = conn.execute(f'SELECT count(*) FROM "prism_kv_{name}"'.encode()).fetchone()
        assert rows is not None and rows[0] == 20
        assert answer["serial"] >= 4
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/finish")
        assert status == 200 and answer["final"], answer
        assert backend_of(tree, name) == "postgres"
        check_all(tree, name, {**before, **promoted})
    finally:
        tree.stop()
        _drop(name)


@pytest.mark.parametrize("tier", ["shared", "redis"])
def test_the_cache_stays_correct_through_every_phase(prism_tree: Any, tier: str) -> None:
    """Every write of a migrating namespace invalidates its cached answers, on
    whichever backend answers reads: a read through the cache after each phase
    returns the last value written."""
    name = f"ca_{uuid.uuid4().hex[:8]}"
    if tier == "shared":
        moving = sqlite_ns(name, cache=True)
    else:
        moving = (
            f'{{ name = "{name}", backend = "sqlite", cache = {{ tier = "redis", url = "{URL}", '
            f'ttl_s = 30, key_prefix = "{RUN_PREFIX}{uuid.uuid4().hex}:" }} }}'
        )
    tree: PrismTree = prism_tree("", start=False)
    token = tree.root / "admin.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    tree.body = (
        f'admin_token_file = "{token}"  # kept by finish\n'
        + "# the tenants below: kept by finish too\n"
        + tenant_toml("a", [moving], workers=2)
        + tenant_toml("b", [sqlite_ns("other_b")])
    )
    tree.write_config(tree.body)
    tree.start()
    try:
        expected = fill(tree, name, 20)
        check_all(tree, name, expected)  # cached now
        check_all(tree, name, expected)
        start = {"to": "postgres", "options": {"dsn": DSN}, "rate": 5000}
        status, answer = call(tree, "POST", f"/v1/migrations/{name}/start", start)
        assert status == 200, answer
        wait_phase(tree, name, "shadow_read")
        expected |= fill(tree, name, 5, b"dual")  # both backends written, cached answers dropped
        check_all(tree, name, expected)
        check_all(tree, name, expected)
        assert call(tree, "POST", f"/v1/migrations/{name}/promote")[0] == 200
        check_all(tree, name, expected)  # answered by the target now, cached or not
        expected |= fill(tree, name, 8, b"promoted")
        check_all(tree, name, expected)
        check_all(tree, name, expected)
        assert call(tree, "POST", f"/v1/migrations/{name}/finish")[0] == 200
        wait_final(tree, name)
        expected |= fill(tree, name, 3, b"finished")
        check_all(tree, name, expected)
        check_all(tree, name, expected)
    finally:
        tree.stop()
        _drop(name)
