"""``prism apply`` against a real ``prism serve``: the diff it shows, the config it makes the server adopt
(served through grpcio at once), and what a refused, declined or dry-run apply leaves alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.conftest import REPO_ROOT, PrismTree, free_port, get, put, sqlite_ns, tenant_toml

RUNNING = tenant_toml("a", [sqlite_ns("keep"), sqlite_ns("gone"), sqlite_ns("mover")]) + tenant_toml(
    "b", [sqlite_ns("stay")]
)
ADOPTED = tenant_toml("a", [sqlite_ns("keep"), sqlite_ns("added")], workers=2) + tenant_toml(
    "b", [sqlite_ns("stay"), sqlite_ns("mover")]
)


def token_line(root: Path) -> str:
    token = root / "admin.token"
    token.write_text("e2e-admin-token-1234\n")
    token.chmod(0o600)
    return f'admin_token_file = "{token}"\n'


def start(prism_tree: Any, tmp_path: Path) -> PrismTree:
    """A tree serving ``RUNNING`` whose admin port takes configs (it has an admin token)."""
    tree: PrismTree = prism_tree(RUNNING, start=False)
    tree.body = token_line(tree.root) + RUNNING
    tree.write_config(tree.body)
    return tree.start()


def new_file(tree: PrismTree, body: str, name: str = "new.toml") -> Path:
    path = tree.root / name
    path.write_text(tree.config_text(token_line(tree.root) + body))
    return path


def prism(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_ADMIN")}
    return subprocess.run(
        [sys.executable, "-m", "prism.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listing(tree: PrismTree) -> list[dict[str, Any]]:
    """/v1/namespaces (with the admin token)."""
    request = urllib.request.Request(tree.admin_url + "/v1/namespaces")
    request.add_header("Authorization", "Bearer " + (tree.root / "admin.token").read_text().strip())
    with urllib.request.urlopen(request, timeout=5) as answer:
        return list(json.loads(answer.read())["namespaces"])


def namespaces(tree: PrismTree) -> dict[str, str]:
    """name -> tenant."""
    return {ns["name"]: ns["tenant"] for ns in listing(tree)}


def serving_workers(tree: PrismTree) -> dict[str, int]:
    """tenant -> its serving workers."""
    return {ns["tenant"]: sum(o["serving"] for o in ns["owners"]) for ns in listing(tree)}


DIFF = [
    "  + namespace added: keyvalue on sqlite, tenant a",
    "  - namespace gone: keyvalue on sqlite, tenant a",
    "  ~ namespace mover: moves from tenant a to tenant b",
    "  ~ tenant a: workers 1 -> 2",
    "workers after: a 2, b 1 (3 in all; running now: 2)",
]


def test_apply_shows_the_diff_and_the_new_config_serves_at_once(prism_tree: Any, tmp_path: Path) -> None:
    tree = start(prism_tree, tmp_path)
    stub = tree.kv()
    put(stub, "mover", "r", b"k", b"before the move")
    path = new_file(tree, ADOPTED)

    done = prism("apply", str(path), "--yes", "--admin", tree.admin_url)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (
        f"{path} is valid. Changes to the server at {tree.admin_url} (its file: {tree.config_path}):"
    )
    assert lines[1:-1] == DIFF
    assert lines[-1].startswith("applied: in effect (routing generation ")
    assert done.stderr == ""
    assert tree.config_path.read_bytes() == path.read_bytes()
    assert namespaces(tree) == {"keep": "a", "added": "a", "stay": "b", "mover": "b"}
    # In effect when apply returned: served through grpcio, on a fresh connection, without waiting.
    stub = tree.kv()
    put(stub, "added", "r", b"k", b"new")
    assert get(stub, "added", "r") == {b"k": b"new"}
    assert get(stub, "mover", "r") == {b"k": b"before the move"}  # same SQLite file, now tenant b
    with pytest.raises(grpc.RpcError) as gone:
        get(stub, "gone", "r")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert serving_workers(tree) == {"a": 2, "b": 1}

    again = prism("apply", str(path), "--yes", "--admin", tree.admin_url)
    assert again.returncode == 0
    assert again.stdout.splitlines()[-1] == "nothing to apply: the server runs this config already"


def test_a_dry_run_or_a_no_at_the_prompt_changes_nothing(prism_tree: Any, tmp_path: Path) -> None:
    tree = start(prism_tree, tmp_path)
    before = tree.config_path.read_bytes(), tree.config_path.stat().st_mtime_ns, namespaces(tree)
    path = new_file(tree, ADOPTED)

    dry = prism("apply", str(path), "--dry-run", "--admin", tree.admin_url)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[1:] == DIFF

    declined = prism("apply", str(path), "--admin", tree.admin_url, stdin="n\n")
    assert declined.returncode == 1
    assert declined.stdout.splitlines()[-1] == f"Apply to {tree.admin_url}? [y/N] "
    assert declined.stderr == "prism: not applied\n"

    no_answer = prism("apply", str(path), "--admin", tree.admin_url, stdin="")
    assert no_answer.returncode == 1

    assert (tree.config_path.read_bytes(), tree.config_path.stat().st_mtime_ns, namespaces(tree)) == before


def test_a_refused_config_leaves_the_file_and_the_old_config_serving(prism_tree: Any, tmp_path: Path) -> None:
    tree = start(prism_tree, tmp_path)
    stub = tree.kv()
    put(stub, "gone", "r", b"k", b"v")
    before = tree.config_path.read_bytes(), set(tree.tree_pids())

    # Valid as a file, refused by the server's own checks (its CPUs).
    path = new_file(tree, ADOPTED.replace("workers = 2", "workers = 2\ncpus = [999]"), "cpus.toml")
    refused = prism("apply", str(path), "--yes", "--admin", tree.admin_url)
    assert refused.returncode == 2
    assert refused.stderr.startswith(
        "prism: the server refused the config: tenants[0].cpus: CPU 999 is not available here"
    )
    assert refused.stderr.count("\n") == 1

    # Refused here: nothing is sent.
    path = new_file(tree, "workers = -1\n" + ADOPTED, "bad.toml")
    bad = prism("apply", str(path), "--yes", "--admin", tree.admin_url)
    assert bad.returncode == 2
    assert bad.stderr == f"prism: config error: workers: -1 must be >= 0 (0: one per CPU) (from {path})\n"

    assert (tree.config_path.read_bytes(), set(tree.tree_pids())) == before
    assert get(tree.kv(), "gone", "r") == {b"k": b"v"}
    assert "reload" not in tree.stderr()


def test_a_reload_whose_new_workers_cannot_boot_is_reported(prism_tree: Any, tmp_path: Path) -> None:
    tree = start(prism_tree, tmp_path)
    broken = sqlite_ns("broken", extra=', options = { path = "/proc/nope/x.sqlite3" }')
    path = new_file(
        tree, tenant_toml("a", [sqlite_ns("keep"), broken], workers=2) + tenant_toml("b", [sqlite_ns("stay")])
    )

    done = prism("apply", str(path), "--yes", "--admin", tree.admin_url)

    assert done.returncode == 1
    assert done.stderr.startswith(f"prism: {tree.admin_url} answered 500: worker ")
    assert "of tenant 'a' cannot boot" in done.stderr
    assert get(tree.kv(), "keep", "r") == {}  # the tenant's previous worker serves


def test_apply_without_a_running_server_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "prism.toml"
    path.write_text(f'admin_listen = "127.0.0.1:{port}"\n[[namespaces]]\nname = "a"\n')

    done = prism("apply", str(path), "--yes")

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"prism: cannot reach 127.0.0.1:{port}: Connection refused\n"
