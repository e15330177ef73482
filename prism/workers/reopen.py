"""When a namespace whose remote backend could not be opened is tried again.

A remote backend (PostgreSQL, Redis, NATS) that does not answer when its
namespace is opened, at boot or on a reload, is not a reason to stop: the
namespace is NOT_SERVING and its worker tries again, after an exponential
backoff with jitter, until the backend answers; then the namespace serves
without a restart. Everything else the worker holds serves meanwhile.

The delays: ``FIRST_RETRY_S``, doubling with each failure in a row, capped
at ``MAX_RETRY_S``, each times a jitter in [0.5, 1.5) so that many workers
(and many namespaces on one database) do not knock in step. The cap keeps a
backend that returns after a long outage from waiting more than about
``MAX_RETRY_S * 1.5`` for its namespace to come back.

No I/O and no trio here: ``ReopenSchedule`` is fed the time, so its table is
tested with plain numbers, and ``App`` drives it from its loop.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

__all__ = ["FIRST_RETRY_S", "MAX_RETRY_S", "ReopenSchedule", "retry_delay"]

FIRST_RETRY_S: Final = 0.5
MAX_RETRY_S: Final = 30.0
_MAX_DOUBLINGS: Final = 16  # 2**16 * FIRST_RETRY_S is far past the cap: no huge floats


def retry_delay(failures: int, rand: Callable[[], float]) -> float:
    """The delay before the next attempt after ``failures`` (>= 1) failures in
    a row; ``rand()`` in [0, 1) gives the jitter."""
    base = min(FIRST_RETRY_S * float(2 ** min(failures - 1, _MAX_DOUBLINGS)), MAX_RETRY_S)
    return base * (0.5 + rand())


class ReopenSchedule:
    """Per namespace: failures in a row and when to try next."""

    def __init__(self, rand: Callable[[], float] = random.random) -> None:
        self._rand = rand
        self._failures: dict[str, int] = {}
        self._due: dict[str, float] = {}

    def failed(self, name: str, now: float) -> float:
        """Record a failed attempt at ``now``; the delay until the next one."""
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        delay = retry_delay(failures, self._rand)
        self._due[name] = now + delay
        return delay

    def forget(self, name: str) -> None:
        """``name`` opened, or is no longer wanted: start from scratch next time."""
        self._failures.pop(name, None)
        self._due.pop(name, None)

    def due(self, now: float) -> list[str]:
        """The namespaces whose next attempt is due at ``now`` (earliest first)."""
        return sorted((n for n, at in self._due.items() if at <= now), key=self._due.__getitem__)

    def next_due(self) -> float | None:
        """When the earliest attempt is due, or None if nothing waits."""
        return min(self._due.values(), default=None)

    def failures(self, name: str) -> int:
        return self._failures.get(name, 0)
