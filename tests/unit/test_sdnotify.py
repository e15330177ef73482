"""The sd_notify client: the exact datagrams systemd would receive."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prism.workers.sdnotify import SystemdNotifier, unset_environment


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's notify socket, and its path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


@pytest.fixture
def warnings_seen() -> Iterator[list[logging.LogRecord]]:
    # A handler on the logger itself: prism.log.setup_logging() (run by other
    # tests) turns off propagation to the root logger that caplog listens on.
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("prism.systemd")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def assert_nothing_sent(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


def test_each_method_sends_one_exact_datagram(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    assert notifier.enabled

    notifier.ready()
    assert received(sock) == "READY=1"
    notifier.ready(status="serving 4 workers")
    assert received(sock) == "READY=1\nSTATUS=serving 4 workers"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    notifier.status("draining: 3 calls in flight")
    assert received(sock) == "STATUS=draining: 3 calls in flight"
    notifier.close()


def test_reloading_carries_the_monotonic_clock(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = received(sock).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.close()


def test_status_cannot_inject_keys(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    notifier.status("bad\nREADY=1")
    assert received(sock) == "STATUS=bad READY=1"
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"prism-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "@" + name})
        notifier.ready()
        assert received(sock) == "READY=1"
        notifier.close()
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_no_op(warnings_seen: list[logging.LogRecord]) -> None:
    notifier = SystemdNotifier.from_env({"WATCHDOG_USEC": "10000000"})
    assert not notifier.enabled
    notifier.ready("up")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    notifier.status("x")
    assert notifier.watchdog_interval_s() is None
    assert warnings_seen == []


def test_missing_socket_warns_once_and_never_raises(
    tmp_path: Path, warnings_seen: list[logging.LogRecord]
) -> None:
    notifier = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": str(tmp_path / "gone.sock"), "WATCHDOG_USEC": "10000000"}
    )
    notifier.ready()
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()
    assert len(warnings_seen) == 1
    assert warnings_seen[0].levelno == logging.WARNING
    assert "ENOENT" in warnings_seen[0].getMessage()
    notifier.close()


def test_refused_socket_warns_once(tmp_path: Path, warnings_seen: list[logging.LogRecord]) -> None:
    # The socket file outlives the listener, as when systemd died uncleanly.
    path = str(tmp_path / "stale.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.close()
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    notifier.ready()
    notifier.status("still up")
    assert len(warnings_seen) == 1
    assert "ECONNREFUSED" in warnings_seen[0].getMessage()
    notifier.close()


def test_unusable_address_is_ignored_with_a_warning(warnings_seen: list[logging.LogRecord]) -> None:
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready()
    assert len(warnings_seen) == 1


def test_watchdog_interval_is_half_the_timeout(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    assert notifier.watchdog_interval_s() == 5.0
    ours = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}
    )
    assert ours.watchdog_interval_s() == 5.0
    notifier.close()
    ours.close()


def test_watchdog_of_another_pid_is_disabled(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    )
    assert notifier.watchdog_interval_s() is None
    notifier.watchdog()
    assert_nothing_sent(sock)
    notifier.ready()  # the rest of the protocol still works
    sock.setblocking(True)
    assert received(sock) == "READY=1"
    notifier.close()


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_or_bad_watchdog_usec_means_no_watchdog(listener: tuple[socket.socket, str], usec: str) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path}
    if usec:
        env["WATCHDOG_USEC"] = usec
    notifier = SystemdNotifier.from_env(env)
    assert notifier.watchdog_interval_s() is None
    notifier.watchdog()
    assert_nothing_sent(sock)
    notifier.close()


def test_unset_environment_hides_systemd_from_children(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1", "HOME": "/x"}
    notifier = SystemdNotifier.from_env(env, unset_environment=True)
    assert env == {"HOME": "/x"}
    notifier.ready()  # the notifier itself still knows where systemd is
    assert received(sock) == "READY=1"
    notifier.close()

    env2 = {"NOTIFY_SOCKET": path, "PATH": "/bin"}
    unset_environment(env2)
    assert env2 == {"PATH": "/bin"}


def test_a_forked_child_stays_silent(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            notifier.ready("from the child")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert_nothing_sent(sock)
    notifier.close()


def test_closed_notifier_is_a_no_op(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"})
    notifier.close()
    notifier.ready()
    notifier.watchdog()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s() is None
    assert_nothing_sent(sock)


def test_warns_again_after_systemd_came_back_and_went_away(
    tmp_path: Path, warnings_seen: list[logging.LogRecord]
) -> None:
    path = str(tmp_path / "flaky.sock")
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path})
    notifier.status("a")
    notifier.status("b")
    assert len(warnings_seen) == 1

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    notifier.status("c")
    assert sock.recv(4096) == b"STATUS=c"
    sock.close()

    notifier.status("d")
    assert len(warnings_seen) == 2
    notifier.close()


def _fill(path: str) -> int:
    """Fill the listener's queue from another socket (as unread watchdog pings do); how many it took."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    sent = 0
    try:
        while sent < 100_000:
            filler.sendto(b"WATCHDOG=1", path)
            sent += 1
    except BlockingIOError:
        return sent
    finally:
        filler.close()
    raise AssertionError("the queue never filled")


def test_a_state_message_a_full_queue_refused_is_sent_again_first(
    listener: tuple[socket.socket, str], warnings_seen: list[logging.LogRecord]
) -> None:
    # The reader had not read its queue of pings yet: READY=1 was lost for good.
    sock, path = listener
    notifier = SystemdNotifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
    queued = _fill(path)
    notifier.ready(status="serving")
    notifier.watchdog()  # still full: the ping is dropped, READY=1 kept
    for _ in range(queued):
        assert received(sock) == "WATCHDOG=1"
    assert_nothing_sent(sock)
    sock.setblocking(True)
    notifier.watchdog()  # room again: READY=1 first, then the ping
    assert received(sock) == "READY=1\nSTATUS=serving"
    assert received(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert received(sock) == "STOPPING=1"
    assert len(warnings_seen) == 1  # one warning for the outage
    notifier.close()
