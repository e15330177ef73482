"""Where a worker's spec travels, as an operator can see it: never in a
child's environment or command line (``/proc/PID/environ``, ``cmdline``),
so neither a DSN password nor a large config's size shows up there; and a
tenant's backend options reach that tenant's workers only: the routing
table every worker maps holds none (``prism.workers.tenant_table``)."""

from __future__ import annotations

import getpass
import os
import signal
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import PrismTree, children_of, get, put, sqlite_ns, tenant_toml, wait_until
from tests.pg import DSN

PASSWORD = "s3cret-" + uuid.uuid4().hex  # trust authentication: accepted and unused


def _dsn_with_password(password: str = PASSWORD, **more: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(DSN)
    user = info.get("user") or getpass.getuser()
    return psycopg.conninfo.make_conninfo(DSN, user=str(user), password=password, **more)


def _pg_ns(name: str, dsn: str) -> str:
    dsn = dsn.replace("\\", "\\\\").replace('"', '\\"')
    return f'{{ name = "{name}", backend = "postgres", options = {{ dsn = "{dsn}" }} }}'


def _memfds(pid: int) -> dict[str, bytes]:
    """The contents of every memfd process ``pid`` holds open, by "fd name"
    (the routing table, its tenant's namespace table, ...)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("/memfd:"):
                out[f"{fd} {target}"] = Path(f"/proc/{pid}/fd/{fd}").read_bytes()
        except OSError:
            continue  # closed meanwhile
    return out


def _worker_of(tree: PrismTree, tenant: str) -> int:
    (pid,) = tree.worker_pids()[tenant]
    return pid


def _proc_text(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


@pytest.mark.services("postgres")
def test_no_dsn_password_in_any_childs_environment_or_command_line(prism_tree) -> None:
    dsn = _dsn_with_password().replace('"', '\\"')
    pg = f'{{ name = "pw_{uuid.uuid4().hex[:8]}", backend = "postgres", options = {{ dsn = "{dsn}" }} }}'
    body = tenant_toml("t", [sqlite_ns("local"), pg]) + tenant_toml("u", [sqlite_ns("other")])
    tree: PrismTree = prism_tree(body)
    assert tree.proc is not None
    stub = tree.kv()
    name = pg.split('"')[1]
    put(stub, name, "r", b"k", b"v")  # the worker did get its spec, password and all
    assert get(stub, name, "r") == {b"k": b"v"}

    pids = [tree.proc.pid, *children_of(tree.proc.pid)]
    assert len(pids) >= 4  # supervisor, admin, a worker per tenant
    for pid in pids:
        assert PASSWORD.encode() not in _proc_text(pid, "environ"), pid
        assert PASSWORD.encode() not in _proc_text(pid, "cmdline"), pid
    children = [_proc_text(pid, "environ") for pid in pids[1:]]
    assert all(env and b"PRISM_SPEC_FD=" in env for env in children)  # read, so the check above saw something


@pytest.mark.services("postgres")
def test_a_tenants_worker_can_read_no_other_tenants_dsn(prism_tree) -> None:
    name = f"pw_{uuid.uuid4().hex[:8]}"
    body = tenant_toml("t", [_pg_ns(name, _dsn_with_password())]) + tenant_toml("u", [sqlite_ns("other")])
    tree: PrismTree = prism_tree(body)
    put(tree.kv(), name, "r", b"k", b"v")  # t's worker opened it with the password

    theirs = _memfds(_worker_of(tree, "u"))
    routes = [data for fd, data in theirs.items() if "prism-routes" in fd]
    # u maps the table that routes to t's namespace (the inherited fd, and mmap's own copy).
    assert routes and all(name.encode() in data for data in routes)
    assert not [fd for fd, data in theirs.items() if PASSWORD.encode() in data]
    # Where the password does travel: t's own namespace table, in t's worker.
    ours = _memfds(_worker_of(tree, "t"))
    assert [fd for fd, data in ours.items() if PASSWORD.encode() in data] == [
        fd for fd in ours if "prism-tenant" in fd
    ]


@pytest.mark.services("postgres")
def test_a_reload_that_changes_a_dsn_reaches_the_owning_worker_only(prism_tree) -> None:
    """The new DSN (another password, another schema) is what t's worker
    connects with after SIGHUP: the namespace now reads the other schema's
    (empty) table; u's worker still sees neither password."""
    name = f"pw_{uuid.uuid4().hex[:8]}"
    schema = f"s_{uuid.uuid4().hex[:8]}"
    new_password = "n3w-" + uuid.uuid4().hex
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"'.encode())
    try:
        other = tenant_toml("u", [sqlite_ns("other")])
        tree: PrismTree = prism_tree(tenant_toml("t", [_pg_ns(name, _dsn_with_password())]) + other)
        stub = tree.kv()
        put(stub, name, "r", b"k", b"before")
        assert get(stub, name, "r") == {b"k": b"before"}

        moved = _dsn_with_password(new_password, options=f"-c search_path={schema}")
        tree.write_config(tenant_toml("t", [_pg_ns(name, moved)]) + other)
        tree.send_signal(signal.SIGHUP)
        wait_until(lambda: get(stub, name, "r") == {}, 10.0, what="the namespace on the new DSN")
        put(stub, name, "r", b"k", b"after")
        assert get(stub, name, "r") == {b"k": b"after"}
        with psycopg.connect(DSN) as conn:
            row = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (schema,)
            ).fetchone()
        assert row is not None and row[0] > 0  # created there by t's worker, on the new DSN

        theirs = _memfds(_worker_of(tree, "u"))
        assert theirs and not [
            fd for fd, data in theirs.items() if PASSWORD.encode() in data or new_password.encode() in data
        ]
    finally:
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())
