"""A worker the template forked is waited for, signalled and reaped as
``subprocess.Popen`` does for an exec'd one (``prism.workers.forked``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from prism.workers.forked import ForkedChild


def child(code: str) -> int:
    """A child running ``code`` in a fresh interpreter (not a fork of pytest's
    state, nor a Popen, which would reap it itself), reaped by the test."""
    return os.posix_spawn(sys.executable, [sys.executable, "-c", code], dict(os.environ))


def test_a_running_child_is_none_then_its_signal_then_stays_reaped() -> None:
    proc = ForkedChild(child("import time; time.sleep(30)"))
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.05)

    proc.send_signal(signal.SIGTERM)

    assert proc.wait(10) == -signal.SIGTERM
    assert proc.poll() == -signal.SIGTERM  # reaped once, remembered
    proc.send_signal(signal.SIGKILL)  # no error, and no signal to a pid that may be reused


def test_an_exit_code_is_the_childs() -> None:
    proc = ForkedChild(child("raise SystemExit(3)"))
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.returncode == 3


def test_a_pid_that_is_not_our_child_counts_as_gone() -> None:
    assert ForkedChild(os.getppid()).poll() == -1
