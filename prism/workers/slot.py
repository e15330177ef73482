"""A worker slot's life, as a table: ``(state, event) -> (action, next state)``.

A slot is one worker position (a tenant, a CPU, its socket addresses); the
process in it comes and goes. The supervisor turns what it observes (a
heartbeat, an exit, a missed deadline) and what it decides (start, retire,
drain) into a ``SlotEvent``, feeds it to ``Slot.handle``, and carries out the
``Action`` the table names. A pair that is not in the table raises
``IllegalTransition``: it is a supervisor bug, never something to guess at.
Everything a worker can send or do (heartbeats, a boot-failure report,
exiting) is in the table for every state in which its process runs, so no
worker, however broken, can make the supervisor raise.

The states, and where a slot's process is::

    NEW       no process yet (just planned)
    BOOTING   started, no heartbeat yet
    BOOTED    heartbeating, but on no routing generation yet
    SERVING   heartbeating on a routing generation: listed as serving
    WAITING   its process died; it is restarted after a backoff
    RETIRING  on its way out, not to be replaced: superseded or removed by a
              reload (sent SIGTERM), or it reported that it cannot boot (it
              exits by itself)
    DRAINING  the server is draining; its process finishes in-flight calls
    STOPPED   its process ended during the drain (final)
    GONE      retired and its process ended: the supervisor drops the slot (final)

A process runs in exactly BOOTING, BOOTED, SERVING, RETIRING and DRAINING
(``RUNNING``); the routing table lists a slot as serving in SERVING only.
"""

from __future__ import annotations

import enum
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from prism.workers.forked import ForkedChild
from prism.workers.spec import EXIT_BOOT_FAILED

__all__ = [
    "ACTIVE",
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "RUNNING",
    "STABLE_AFTER_S",
    "TABLE",
    "Action",
    "IllegalTransition",
    "Slot",
    "SlotEvent",
    "SlotState",
    "exit_event",
    "restart_delay",
]

BACKOFF_BASE_S: Final = 0.05
BACKOFF_MAX_S: Final = 10.0
# A worker that ran this long before it died starts its slot's backoff afresh:
# it was not crash-looping.
STABLE_AFTER_S: Final = 10.0
# 2**8 * BACKOFF_BASE_S is past BACKOFF_MAX_S already; the cap on the exponent
# keeps a long crash loop's count from overflowing the float.
_MAX_DOUBLINGS: Final = 16


class SlotState(enum.Enum):
    NEW = "new"
    BOOTING = "booting"
    BOOTED = "booted"
    SERVING = "serving"
    WAITING = "waiting"
    RETIRING = "retiring"
    DRAINING = "draining"
    STOPPED = "stopped"
    GONE = "gone"


class SlotEvent(enum.Enum):
    START = "start"  # the supervisor starts the slot's process (first start, or restart due)
    BEAT = "beat"  # a heartbeat from a worker on no routing generation yet
    BEAT_SERVING = "beat serving"  # a heartbeat from a worker on a routing generation
    BOOT_FAILED = "boot failed"  # the worker reports that it cannot boot (it exits next)
    EXITED_AT_BOOT = "exited at boot"  # exited with EXIT_BOOT_FAILED before any heartbeat
    EXITED = "exited"  # exited otherwise: a crash, a kill, or the end of a drain
    SILENT = "silent"  # no heartbeat for longer than the timeout
    RETIRE = "retire"  # a reload superseded or removed the slot
    DRAIN = "drain"  # the server drains (SIGTERM)
    DRAIN_OVERDUE = "drain overdue"  # still running after graceful_timeout_s


class Action(enum.Enum):
    NONE = "none"
    SPAWN = "spawn"  # start a process in the slot
    TERM = "term"  # SIGTERM: drain and exit
    KILL = "kill"  # SIGKILL
    RESTART = "restart"  # schedule a restart after the backoff; count it
    BOOT_FAILED = "boot failed"  # halt the server, or reject the reload that started the slot


S, E, A = SlotState, SlotEvent, Action

# Every running state ignores heartbeats and a boot-failure report once the
# slot is on its way out: the process exits anyway.
_ON_THE_WAY_OUT = {
    (state, event): (A.NONE, state)
    for state in (S.RETIRING, S.DRAINING)
    for event in (E.BEAT, E.BEAT_SERVING, E.BOOT_FAILED)
}

TABLE: Final[dict[tuple[SlotState, SlotEvent], tuple[Action, SlotState]]] = {
    (S.NEW, E.START): (A.SPAWN, S.BOOTING),
    (S.NEW, E.RETIRE): (A.NONE, S.GONE),
    (S.NEW, E.DRAIN): (A.NONE, S.STOPPED),
    #
    (S.BOOTING, E.BEAT): (A.NONE, S.BOOTED),
    (S.BOOTING, E.BEAT_SERVING): (A.NONE, S.SERVING),
    (S.BOOTING, E.BOOT_FAILED): (A.BOOT_FAILED, S.RETIRING),
    (S.BOOTING, E.EXITED_AT_BOOT): (A.BOOT_FAILED, S.GONE),
    (S.BOOTING, E.EXITED): (A.RESTART, S.WAITING),
    (S.BOOTING, E.SILENT): (A.KILL, S.BOOTING),
    (S.BOOTING, E.RETIRE): (A.TERM, S.RETIRING),
    (S.BOOTING, E.DRAIN): (A.TERM, S.DRAINING),
    #
    (S.BOOTED, E.BEAT): (A.NONE, S.BOOTED),
    (S.BOOTED, E.BEAT_SERVING): (A.NONE, S.SERVING),
    (S.BOOTED, E.BOOT_FAILED): (A.BOOT_FAILED, S.RETIRING),
    (S.BOOTED, E.EXITED): (A.RESTART, S.WAITING),
    (S.BOOTED, E.SILENT): (A.KILL, S.BOOTED),
    (S.BOOTED, E.RETIRE): (A.TERM, S.RETIRING),
    (S.BOOTED, E.DRAIN): (A.TERM, S.DRAINING),
    #
    (S.SERVING, E.BEAT): (A.NONE, S.SERVING),
    (S.SERVING, E.BEAT_SERVING): (A.NONE, S.SERVING),
    (S.SERVING, E.BOOT_FAILED): (A.BOOT_FAILED, S.RETIRING),
    (S.SERVING, E.EXITED): (A.RESTART, S.WAITING),
    (S.SERVING, E.SILENT): (A.KILL, S.SERVING),
    (S.SERVING, E.RETIRE): (A.TERM, S.RETIRING),
    (S.SERVING, E.DRAIN): (A.TERM, S.DRAINING),
    #
    (S.WAITING, E.START): (A.SPAWN, S.BOOTING),
    (S.WAITING, E.RETIRE): (A.NONE, S.GONE),
    (S.WAITING, E.DRAIN): (A.NONE, S.STOPPED),
    #
    **_ON_THE_WAY_OUT,
    (S.RETIRING, E.EXITED): (A.NONE, S.GONE),
    (S.RETIRING, E.DRAIN): (A.TERM, S.DRAINING),
    #
    (S.DRAINING, E.EXITED): (A.NONE, S.STOPPED),
    (S.DRAINING, E.DRAIN_OVERDUE): (A.KILL, S.DRAINING),
}

del S, E, A

RUNNING: Final = frozenset(
    {SlotState.BOOTING, SlotState.BOOTED, SlotState.SERVING, SlotState.RETIRING, SlotState.DRAINING}
)
# Slots that count as a tenant's workers: not on their way out.
ACTIVE: Final = frozenset(
    {SlotState.NEW, SlotState.BOOTING, SlotState.BOOTED, SlotState.SERVING, SlotState.WAITING}
)


class IllegalTransition(RuntimeError):
    """An event the slot's state does not admit: a bug in the supervisor."""

    def __init__(self, slot_id: int, state: SlotState, event: SlotEvent) -> None:
        super().__init__(f"worker slot {slot_id}: no transition from {state.name} on {event.name}")
        self.state = state
        self.event = event


def exit_event(state: SlotState, code: int) -> SlotEvent:
    """What a process's exit with ``code`` means in ``state``.

    ``EXIT_BOOT_FAILED`` means "cannot boot" only from a worker that never
    sent a heartbeat; later, the same code is a crash like any other.
    """
    if state is SlotState.BOOTING and code == EXIT_BOOT_FAILED:
        return SlotEvent.EXITED_AT_BOOT
    return SlotEvent.EXITED


def restart_delay(failures: int, uptime_s: float, rand: Callable[[], float]) -> tuple[float, int]:
    """The delay before restarting a worker that died after ``uptime_s``, and the slot's new failure count.

    Exponential backoff from ``BACKOFF_BASE_S``, doubling with each failure in
    a row, capped at ``BACKOFF_MAX_S``, times a jitter in [0.5, 1.5) (from
    ``rand()`` in [0, 1)) so that workers that died together do not restart
    in step. A worker that was up longer than ``STABLE_AFTER_S`` was not
    crash-looping: its slot starts again from the base delay.
    """
    if uptime_s > STABLE_AFTER_S:
        failures = 0
    delay = min(BACKOFF_BASE_S * 2 ** min(failures, _MAX_DOUBLINGS), BACKOFF_MAX_S)
    return delay * (0.5 + rand()), failures + 1


@dataclass
class Slot:
    """One worker position: tenant, CPU, addresses; its process comes and goes."""

    id: int
    tenant: str
    cpu: int | None
    state: SlotState = SlotState.NEW
    proc: subprocess.Popen[bytes] | ForkedChild | None = None  # set exactly in the RUNNING states
    started: float = 0.0  # when its current (or last) process started
    last_beat: float = 0.0
    generation: int = 0  # the routing generation of its last heartbeat
    failures: int = 0  # restarts in a row without a stable run
    restart_at: float = 0.0  # in WAITING: when to start it again

    def handle(self, event: SlotEvent) -> Action:
        """Move to the table's next state for ``event``; the action the supervisor must take."""
        try:
            action, self.state = TABLE[self.state, event]
        except KeyError:
            raise IllegalTransition(self.id, self.state, event) from None
        return action

    def silent_past(self, now: float, boot_timeout_s: float, heartbeat_timeout_s: float) -> float | None:
        """The timeout this slot's process has gone past without a heartbeat, or None."""
        if self.state is SlotState.BOOTING:
            timeout = boot_timeout_s
        elif self.state is SlotState.BOOTED or self.state is SlotState.SERVING:
            timeout = heartbeat_timeout_s
        else:
            return None  # not running, or on its way out
        return timeout if now - self.last_beat > timeout else None
