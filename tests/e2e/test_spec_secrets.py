"""Where a worker's spec travels, as an operator can see it: never in a
child's environment or command line (``/proc/PID/environ``, ``cmdline``),
so neither a DSN password nor a large config's size shows up there."""

from __future__ import annotations

import getpass
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.e2e.conftest import PrismTree, children_of, get, put, sqlite_ns, tenant_toml
from tests.pg import DSN

PASSWORD = "s3cret-" + uuid.uuid4().hex  # trust authentication: accepted and unused


def _dsn_with_password() -> str:
    info = psycopg.conninfo.conninfo_to_dict(DSN)
    user = info.get("user") or getpass.getuser()
    return psycopg.conninfo.make_conninfo(DSN, user=str(user), password=PASSWORD)


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
