"""The supervisor's signals: a handler only queues its signal (gunicorn's arbiter pattern), and a
pipe wakes the supervisor's ``select`` so that its loop handles it at once, outside the handler."""

from __future__ import annotations

import os
import signal
from typing import Final

__all__ = ["SIGNALS", "queue_signals"]

# SIGUSR1: a migration request waits (prism.migrate.requests).
SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGUSR1,
)


def queue_signals(queue: list[int]) -> int:
    """Append each of ``SIGNALS`` to ``queue`` as it arrives; return the pipe's read end to select on
    (readable after any signal; drain it)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    os.set_blocking(r, False)
    signal.set_wakeup_fd(w)

    def enqueue(signum: int, frame: object) -> None:
        queue.append(signum)

    for signum in SIGNALS:
        signal.signal(signum, enqueue)
    return r
