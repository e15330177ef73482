"""SIGHUP reloads the config file live; an invalid file is rejected and the old config keeps serving."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import grpc
import pytest

from .conftest import Load, get, put, sqlite_ns, tenant_toml, wait_until

BEFORE = tenant_toml("t", [sqlite_ns("keep"), sqlite_ns("gone")], workers=2)
AFTER = tenant_toml("t", [sqlite_ns("keep"), sqlite_ns("new")], workers=2)


def _status(call) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code().name
    return "OK"


def _keep_load(tree, threads: int = 4) -> Load:
    stubs = [tree.kv("t.prism") for _ in range(threads)]

    def work(i: int, n: int) -> None:
        if n % 2:
            put(stubs[i], "keep", f"r{i}", b"k", f"v{n}".encode(), timeout=10)
        else:
            get(stubs[i], "keep", f"r{i}", timeout=10)

    return Load(threads, work)


def test_sighup_adds_and_removes_namespaces_without_failing_calls(prism_tree) -> None:
    tree = prism_tree(BEFORE)
    stub = tree.kv("t.prism")
    put(stub, "gone", "r", b"k", b"v")
    assert _status(lambda: get(stub, "new", "r")) == "NOT_FOUND"

    with _keep_load(tree) as load:
        load.wait_for_calls(100)
        tree.write_config(AFTER)
        tree.send_signal(signal.SIGHUP)
        hup = time.monotonic()
        wait_until(
            lambda: _status(lambda: put(stub, "new", "r", b"k", b"v", timeout=2)) == "OK",
            2.0,
            what="namespace 'new' answers",
        )
        wait_until(
            lambda: _status(lambda: get(stub, "gone", "r", timeout=2)) == "NOT_FOUND",
            2.0 - (time.monotonic() - hup),
            what="namespace 'gone' answers NOT_FOUND",
        )
        took = time.monotonic() - hup
        # Every worker of the tenant (not only the one this connection is on) has it.
        for other in [tree.kv("t.prism") for _ in range(4)]:
            assert get(other, "new", "r") == {b"k": b"v"}
            assert _status(lambda o=other: get(o, "gone", "r")) == "NOT_FOUND"
        done = load.ok
        wait_until(lambda: load.ok > done + 100, 5.0, what="load on keep continues")
    print(f"reload visible in {took:.3f}s; keep: {load.statuses}")
    assert not load.errors, f"calls on 'keep' failed during the reload: {load.errors[:5]}"
    assert set(tree.namespaces()) == {"keep", "new"}

    # An invalid file: rejected, logged, the running config keeps serving.
    pids_before = tree.worker_pids()
    tree.write_config(AFTER.replace("workers = 2", "workers = -1"))
    with _keep_load(tree) as load:
        load.wait_for_calls(50)
        tree.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload rejected" in tree.stderr(), 3.0, what="'reload rejected' logged")
        done = load.ok
        wait_until(lambda: load.ok > done + 100, 5.0, what="load on keep continues")
    assert not load.errors, f"calls on 'keep' failed after a rejected reload: {load.errors[:5]}"
    rejected = [line for line in tree.stderr().splitlines() if "reload rejected" in line]
    assert any("workers" in line for line in rejected), rejected
    assert get(stub, "new", "r") == {b"k": b"v"}
    assert _status(lambda: get(stub, "gone", "r")) == "NOT_FOUND"
    assert set(tree.namespaces()) == {"keep", "new"}
    assert tree.worker_pids() == pids_before
    assert tree.proc is not None and tree.proc.poll() is None


def _datagrams(sock: socket.socket, until: float) -> list[str]:
    out = []
    while True:
        remaining = until - time.monotonic()
        if remaining <= 0:
            return out
        sock.settimeout(remaining)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def _expect(sock: socket.socket, key: str, timeout_s: float) -> list[str]:
    """Datagrams up to and including the first with ``key`` (e.g. ``READY=1``)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen.append(message)
        if key in message.splitlines():
            return seen
    pytest.fail(f"no {key} within {timeout_s}s; got {seen}")


def test_sd_notify_ready_reloading_stopping(prism_tree, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        tree = prism_tree(BEFORE, start=False, env={"NOTIFY_SOCKET": str(path)})
        tree.start()
        start = _expect(sock, "READY=1", 20.0)
        assert not any("STOPPING=1" in m or "RELOADING=1" in m for m in start), start
        # READY=1 only once every namespace has a serving worker (/readyz says the same).
        assert tree.fetch("/readyz")[0] == 200

        before = {o["pid"] for o in tree.owners("keep")}
        tree.write_config(tenant_toml("t", [sqlite_ns("keep"), sqlite_ns("new")], workers=3))
        tree.send_signal(signal.SIGHUP)
        reload = _expect(sock, "READY=1", 20.0)
        assert [m for m in reload if "RELOADING=1" in m.splitlines()], reload
        first_reloading = next(i for i, m in enumerate(reload) if "RELOADING=1" in m.splitlines())
        assert first_reloading < len(reload) - 1, reload  # RELOADING=1 comes before READY=1
        reloading = reload[first_reloading].splitlines()
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading), reloading
        # READY=1 once the reload is in effect: the tenant's three new workers
        # serve (its two old ones are retired), the new namespace with them.
        assert "STATUS=reloaded" in reload[-1].splitlines(), reload
        owners = tree.owners("new")
        assert len([o for o in owners if o["serving"] and o["pid"] not in before]) == 3, owners
        assert _status(lambda: put(tree.kv("t.prism"), "new", "r", b"k", b"v", timeout=1)) == "OK"

        tree.send_signal(signal.SIGTERM)
        stopping = _expect(sock, "STOPPING=1", 5.0)
        assert tree.proc is not None
        assert tree.proc.wait(10) == 0
        rest = _datagrams(sock, time.monotonic() + 0.2)
        assert not any("READY=1" in m.splitlines() for m in rest), (stopping, rest)
    finally:
        sock.close()


def test_sighup_changing_a_tenants_worker_count_fails_no_call(prism_tree) -> None:
    """Replacing a tenant's workers (another count) on SIGHUP must not fail calls meanwhile.

    Another tenant is configured too: t's clients that reconnect while t's
    workers are replaced may land on its worker.
    """
    other = tenant_toml("o", [sqlite_ns("no")])
    tree = prism_tree(other + tenant_toml("t", [sqlite_ns("keep")], workers=1))
    [old] = tree.owners("keep")
    with _keep_load(tree, threads=8) as load:
        load.wait_for_calls(100)
        tree.write_config(other + tenant_toml("t", [sqlite_ns("keep")], workers=2))
        tree.send_signal(signal.SIGHUP)
        wait_until(
            lambda: (
                (owners := tree.owners("keep"))
                and len(owners) == 2
                and all(o["serving"] and o["pid"] != old["pid"] for o in owners)
            ),
            5.0,
            what="t served by two new workers",
        )
        done = load.ok
        wait_until(lambda: load.ok > done + 100, 5.0, what="load on keep continues")
    tree.worker_pids()
    print(f"keep during the worker change: {load.statuses}")
    assert not load.errors, f"{len(load.errors)} calls failed, first: {load.errors[:3]}"


def test_sighup_changing_a_namespaces_settings_fails_no_call(prism_tree) -> None:
    """A namespace whose settings change (here: its cache) is reopened without failing calls."""
    tree = prism_tree(tenant_toml("t", [sqlite_ns("keep")], workers=2))
    with _keep_load(tree) as load:
        load.wait_for_calls(100)
        for n in range(4):
            tree.write_config(tenant_toml("t", [sqlite_ns("keep", cache=n % 2 == 0)], workers=2))
            tree.send_signal(signal.SIGHUP)
            want = n % 2 == 0
            wait_until(
                lambda w=want: tree.namespaces()["keep"]["cache"]["enabled"] == w, 2.0, what="reload applied"
            )
            done = load.ok
            wait_until(lambda d=done: load.ok > d + 50, 5.0, what="load on keep continues")
    print(f"keep during the settings changes: {load.statuses}")
    assert not load.errors, f"{len(load.errors)} calls failed, first: {load.errors[:3]}"


def test_supervisor_pings_the_systemd_watchdog(prism_tree, tmp_path: Path) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 arrives every half interval from the supervisor."""
    path = tmp_path / "watchdog.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        tree = prism_tree(BEFORE, start=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
        tree.start()
        _expect(sock, "READY=1", 20.0)
        pings = [m for m in _datagrams(sock, time.monotonic() + 1.0) if "WATCHDOG=1" in m.splitlines()]
        assert 3 <= len(pings) <= 7, pings  # every 0.2 s over 1 s
    finally:
        sock.close()


def test_sighup_moving_a_namespace_to_another_tenant_fails_no_call(prism_tree) -> None:
    """A namespace moved from tenant a to tenant b: its calls (from a's and b's
    connections alike) keep succeeding while b opens it and a lets it go."""
    before = tenant_toml("a", [sqlite_ns("mv"), sqlite_ns("stay")]) + tenant_toml("b", [sqlite_ns("other")])
    after = tenant_toml("a", [sqlite_ns("stay")]) + tenant_toml("b", [sqlite_ns("other"), sqlite_ns("mv")])
    tree = prism_tree(before)
    stubs = [tree.kv("a.prism") for _ in range(2)] + [tree.kv("b.prism") for _ in range(2)]

    def work(i: int, n: int) -> None:
        if n % 2:
            put(stubs[i], "mv", f"r{i}", b"k", f"v{n}".encode(), timeout=10)
        else:
            get(stubs[i], "mv", f"r{i}", timeout=10)

    with Load(len(stubs), work) as load:
        load.wait_for_calls(100)
        tree.write_config(after)
        tree.send_signal(signal.SIGHUP)
        wait_until(lambda: tree.namespaces()["mv"]["tenant"] == "b", 3.0, what="mv owned by b")
        done = load.ok
        wait_until(lambda: load.ok > done + 100, 5.0, what="load on mv continues")
    assert not load.errors, f"calls on 'mv' failed during the move: {load.errors[:5]}"
    # The data moved with it (the same SQLite file, now opened by b's worker).
    assert get(stubs[0], "mv", "r1", timeout=5)[b"k"].startswith(b"v")


def test_sighup_whose_new_workers_cannot_boot_keeps_the_old_ones(prism_tree) -> None:
    """A reload that replaces a tenant's workers with ones that cannot boot is
    rejected for that tenant: the server keeps running, and the workers it was
    to replace keep serving without a failed call."""
    tree = prism_tree(tenant_toml("t", [sqlite_ns("keep")], workers=1))
    [old] = tree.owners("keep")
    broken = sqlite_ns("broken", extra=', options = { path = "/proc/nope/x.sqlite3" }')
    with _keep_load(tree) as load:
        load.wait_for_calls(100)
        tree.write_config(tenant_toml("t", [sqlite_ns("keep"), broken], workers=2))
        tree.send_signal(signal.SIGHUP)
        wait_until(
            lambda: tree.stderr().count("keeping the previous workers of tenant 't'") >= 1,
            10.0,
            what="the reload's new workers rejected",
        )
        wait_until(lambda: tree.owners("keep") == [old], 5.0, what="only the old worker listed again")
        done = load.ok
        wait_until(lambda: load.ok > done + 100, 5.0, what="load on keep continues")
    print(f"keep while the reload's workers failed: {load.statuses}")
    assert not load.errors, f"{len(load.errors)} calls failed, first: {load.errors[:3]}"
    assert tree.proc is not None and tree.proc.poll() is None, tree.stderr()[-2000:]
    assert "halting" not in tree.stderr()
    assert get(tree.kv("t.prism"), "keep", "r0") != {}


LIMITED = tenant_toml("t", [sqlite_ns("q", extra=", limits = { rps = 1, burst = 1 }"), sqlite_ns("n")])
UNLIMITED = tenant_toml("t", [sqlite_ns("q"), sqlite_ns("n")])


def _refusal(call) -> tuple[str, str, str | None]:
    try:
        call()
    except grpc.RpcError as exc:
        pushback = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        return exc.code().name, exc.details(), pushback
    return "OK", "", None


def test_a_namespace_quota_refuses_with_a_pushback_and_a_reload_lifts_it(prism_tree) -> None:
    tree = prism_tree(LIMITED)
    stub = tree.kv("t.prism")
    put(stub, "q", "r", b"k", b"v")  # the burst's one token
    status, message, pushback = _refusal(lambda: get(stub, "q", "r"))
    assert (status, message) == ("RESOURCE_EXHAUSTED", 'namespace "q": rps limit 1 exceeded')
    assert pushback is not None and 0 < int(pushback) <= 1000
    for _ in range(5):  # the neighbour has no limit
        put(stub, "n", "r", b"k", b"v")
    wait_until(
        lambda: tree.metric("prism_calls_limited_total", namespace="q", reason="rps") >= 1,
        5.0,
        what="the refusal counted in /metrics",
    )

    tree.write_config(UNLIMITED)
    tree.send_signal(signal.SIGHUP)
    wait_until(lambda: _refusal(lambda: get(stub, "q", "r", timeout=2))[0] == "OK", 3.0, what="q unlimited")
    for _ in range(10):
        assert get(stub, "q", "r") == {b"k": b"v"}
