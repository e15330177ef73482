"""``prism serve``: the supervisor process.

It binds the gRPC and admin sockets, creates the shared-memory routing and
cache tables (memfds), starts the admin process and every tenant's workers
(pinned to CPUs), and then only watches: heartbeats over nng, dead children,
signals. It runs no event loop on the hot path and handles no call, and it
imports neither trio nor the worker's App: it builds what a child needs from
``prism.workers.spec`` and execs ``python -m prism.workers.worker``.

Signals only enqueue (gunicorn's arbiter pattern); the main loop dispatches:
SIGTERM drains, SIGINT/SIGQUIT stop fast, SIGHUP reloads the config, SIGUSR1
takes migration requests (``prism.workers.migrations``), SIGCHLD reaps. Each
worker slot's lifecycle is the table in ``prism.workers.slot``: a dead worker
is restarted after an exponential backoff with jitter; a worker that cannot
boot at all (it reports so, or exits with code 3 before its first heartbeat)
halts the whole server with its reason instead of a crash loop, unless a
reload started it, in which case the reload is rejected and the tenant's
previous workers keep serving.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from prism import metrics
from prism.config import ServerConfig, TenantConfig
from prism.nng import pynng
from prism.router.messages import BootFailed, Heartbeat, State, control_encoder, event_decoder
from prism.router.readiness import not_ready_reason
from prism.router.table import RELOAD_FAILED, RELOAD_IN_EFFECT, RELOAD_PENDING, RELOAD_REJECTED, ReloadNote
from prism.workers.migrations import Migrations
from prism.workers.plan import Handover, plan_cpus, reload_done
from prism.workers.preflight import open_to_network
from prism.workers.reloading import Reloading
from prism.workers.resources import Resources, mark_dead, signal_child, start_failure_code, wait_or_kill
from prism.workers.sdnotify import SystemdNotifier
from prism.workers.slot import ACTIVE, Action, Slot, SlotEvent, SlotState, exit_event, restart_delay
from prism.workers.spec import EXIT_HALTED
from prism.workers.wakeup import queue_signals

log = logging.getLogger("prism.supervisor")

TICK_S = 0.1
STATE_INTERVAL_S = 0.5
BOOT_TIMEOUT_S = 60.0
FAST_STOP_S = 3.0
ADMIN_RESTART_S = 0.5


class Supervisor(Reloading):
    """The main loop of ``prism serve``; ``run()`` returns the process exit code."""

    def __init__(
        self,
        config: ServerConfig,
        reload_config: Callable[[], ServerConfig],
        runtime_dir: Path,
        config_file: str = "",
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_file, self.overrides = config_file, overrides  # the admin's POST /v1/config loads so
        self.runtime_dir = runtime_dir
        self._reload_config = reload_config
        self.allowed_cpus = sorted(os.sched_getaffinity(0))
        self.slots: dict[int, Slot] = {}
        self._next_slot = 0
        self.generation = 0
        self.security_serial = 1  # moves on every accepted reload: see SecuritySection
        self._routes_changed = False
        self.draining = False
        self.drain_deadline = 0.0
        self._signals: list[int] = []
        self.notifier = SystemdNotifier.from_env(unset_environment=True)
        self.exit_code = 0
        self._halted = False
        self.admin: subprocess.Popen[bytes] | None = None
        self._admin_restart_at = 0.0
        self._handovers: list[Handover] = []
        self._reloaded: tuple[str, int] | None = None  # READY=1's status and generation, once in effect
        self.reload_note = ReloadNote()  # published for POST /v1/config
        # Why the last published table is not ready (prism.router.readiness), or None.
        self._not_ready: str | None = "nothing published yet"
        self._ready_once = False  # and the tables after the first ready one say so
        self.migrations = Migrations(config.data_dir, config_file)  # live migrations: SIGUSR1

    # -- the routing table and the slots -------------------------------------

    def _publish(self) -> None:
        self.generation += 1
        self._routes_changed = False
        cpus = len(self.allowed_cpus)
        routes = self.resources.routes_for(
            self.generation,
            self.config,
            cpus,
            self.slots.values(),
            self.security_serial,
            self._ready_once,
            self.reload_note,
            self.migrations,
        )
        # Each tenant's own table first: a worker seeing this generation finds its namespaces as new.
        migrating = self.migrations.by_tenant(self.config, cpus)
        self.resources.tenants.publish(self.generation, self.config, cpus, migrating)
        self.resources.routes.publish(routes)
        self._not_ready = not_ready_reason(routes)
        self._ready_once |= self._not_ready is None
        self._broadcast()

    def _broadcast(self) -> None:
        state = State(self.generation, self.draining, self.config.log_level)
        try:
            self.control.send(control_encoder.encode(state), block=False)
        except pynng.TryAgain:
            pass

    def _add_slots(self, tenants: tuple[TenantConfig, ...]) -> list[Slot]:
        added = []
        for tenant, cpu in plan_cpus(tenants, self.allowed_cpus):
            slot = Slot(self._next_slot, tenant, cpu)
            self._next_slot += 1
            self.slots[slot.id] = slot
            added.append(slot)
        return added

    def _spawn(self, slot: Slot) -> None:
        slot.proc = self.resources.start_worker(slot, self.config)
        slot.started = slot.last_beat = time.monotonic()
        log.info(
            "worker %d (tenant %s, cpu %s) started: pid %d", slot.id, slot.tenant, slot.cpu, slot.proc.pid
        )

    # -- the slot table ------------------------------------------------------

    def _handle(self, slot: Slot, event: SlotEvent, detail: str = "") -> None:
        """Feed ``event`` to ``slot``'s table and carry out the action it names."""
        was_serving = slot.state is SlotState.SERVING
        action = slot.handle(event)
        if was_serving != (slot.state is SlotState.SERVING) or slot.state is SlotState.GONE:
            self._routes_changed = True  # published once per turn of the loop
        if action is Action.SPAWN:
            self._spawn(slot)
        elif action is Action.TERM or action is Action.KILL:
            assert slot.proc is not None  # TERM and KILL apply to running states only
            signal_child(slot.proc, signal.SIGTERM if action is Action.TERM else signal.SIGKILL)
        elif action is Action.RESTART:
            self._schedule_restart(slot, detail)
        elif action is Action.BOOT_FAILED:
            self._boot_failed(slot, detail)

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            self.resources = Resources.create(self.config, self.runtime_dir, len(self.allowed_cpus))
        except OSError as exc:
            print(f"prism: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return start_failure_code(exc)
        wake = queue_signals(self._signals)
        pid_path = self.runtime_dir / "prism.pid"
        pid_path.write_text(f"{os.getpid()}\n")
        with (
            pynng.Pub0(listen=self.resources.control_address) as control,
            pynng.Pull0(listen=self.resources.events_address) as events,
        ):
            self.control, self.events = control, events
            slots = self._add_slots(self.config.effective_tenants(len(self.allowed_cpus)))
            self.migrations.boot(self.config)
            self._publish()  # before any worker starts: each reads the table at boot
            self.admin = self.resources.start_admin(self.config, self.config_file, self.overrides)
            for slot in slots:
                self._handle(slot, SlotEvent.START)
            selector = selectors.DefaultSelector()
            selector.register(wake, selectors.EVENT_READ)
            selector.register(events.recv_fd, selectors.EVENT_READ)
            log.info("serving gRPC on %s, admin on %s", self.config.listen, self.config.admin_listen)
            if (warning := open_to_network(self.config)) is not None:
                log.warning("%s", warning)
            try:
                self._loop(selector, wake)
            finally:
                self._stop_everything()
                pid_path.unlink(missing_ok=True)
        return self.exit_code

    def _loop(self, selector: selectors.BaseSelector, wake: int) -> None:
        next_state = next_watchdog = time.monotonic()
        watchdog_s = self.notifier.watchdog_interval_s()
        ready_sent = False
        while not self._halted:
            selector.select(TICK_S)
            try:
                os.read(wake, 4096)
            except BlockingIOError:
                pass
            self._drain_events()
            while self._signals and not self._halted:
                self._on_signal(self._signals.pop(0))
            if not self._halted:
                self._reap()
            if self._halted:
                return
            now = time.monotonic()
            if self.draining:
                if not any(s.proc for s in self.slots.values()):
                    return
                self._escalate_drain(now)
                continue
            self._check_heartbeats(now)
            self._restart_due(now)
            self._reap_admin(now)
            self._finish_handovers()
            self._forget_gone()
            self._migrate()
            if self._routes_changed:
                self._publish()
            if self._reloaded and reload_done(self.slots.values(), self._handovers, self._reloaded[1]):
                self.notifier.ready(self._reloaded[0])
                self._reloaded = None
                if self.reload_note.state == RELOAD_PENDING:
                    self._note(self.reload_note.file, RELOAD_IN_EFFECT)
            # READY=1 on the turn that published the first ready table: the
            # moment the workers' Check("") and the admin's /readyz flip too.
            if not ready_sent and self._not_ready is None:
                ready_sent = True
                up, total = sum(s.state is SlotState.SERVING for s in self.slots.values()), len(self.slots)
                self.notifier.ready(f"serving: {up} of {total} workers")
                log.info("ready: every namespace has a serving worker (%d of %d serving)", up, total)
            if now >= next_state:
                next_state = now + STATE_INTERVAL_S
                self._broadcast()
            if watchdog_s and now >= next_watchdog:
                next_watchdog = now + watchdog_s
                self.notifier.watchdog()

    def _drain_events(self) -> None:
        while not self._halted:
            try:
                raw = self.events.recv(block=False)
            except pynng.TryAgain:
                return
            try:
                event = event_decoder.decode(raw)
            except msgspec.DecodeError:
                log.warning("undecodable worker event ignored")
                continue
            slot = self.slots.get(event.worker_id)
            if slot is None or slot.proc is None or slot.proc.pid != event.pid:
                continue  # from a process we no longer track
            if isinstance(event, Heartbeat):
                slot.last_beat, slot.generation = time.monotonic(), event.generation
                beat = SlotEvent.BEAT_SERVING if event.generation >= 1 else SlotEvent.BEAT
                self._handle(slot, beat)
            elif isinstance(event, BootFailed):
                self._handle(slot, SlotEvent.BOOT_FAILED, event.reason)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap runs every turn
        if signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGUSR1:
            self.migrations.requested = True
        elif signum == signal.SIGTERM:
            self._start_drain()
        else:  # SIGINT, SIGQUIT: stop now
            log.info("stopping fast (%s)", signal.Signals(signum).name)
            self._halted = True

    # -- dead workers: reaping, restarts, boot failures ------------------------

    def _reap(self) -> None:
        """Collect every worker that has exited and feed its exit to its slot."""
        for slot in list(self.slots.values()):
            proc = slot.proc
            if proc is None or (code := proc.poll()) is None:
                continue
            slot.proc = None
            mark_dead(proc.pid)
            self.resources.worker_gone(slot.id)
            event = exit_event(slot.state, code)
            if event is SlotEvent.EXITED_AT_BOOT:
                detail = "see its message above"  # the worker printed why before it exited
            else:
                detail = f"(pid {proc.pid}) exited with {code}"
            self._handle(slot, event, detail)
            if self._halted:
                return

    def _schedule_restart(self, slot: Slot, why: str) -> None:
        now = time.monotonic()
        delay, slot.failures = restart_delay(slot.failures, now - slot.started, random.random)
        slot.restart_at = now + delay
        log.warning("worker %d %s; restarting in %.2fs", slot.id, why, delay)
        metrics.WORKER_RESTARTS.labels(slot.tenant).inc()

    def _restart_due(self, now: float) -> None:
        for slot in list(self.slots.values()):
            if slot.state is SlotState.WAITING and now >= slot.restart_at:
                self._handle(slot, SlotEvent.START)

    def _boot_failed(self, slot: Slot, reason: str) -> None:
        message = f"worker {slot.id} of tenant {slot.tenant!r} cannot boot: {reason}"
        handover = next((h for h in self._handovers if slot.id in h.new), None)
        if handover is None:
            self._halt(message, printed=True)  # the worker printed its line: one is enough
            return
        # A reload's new worker: reject the tenant's replacement, keep the
        # workers it was to replace (they still serve: they retire only once
        # every new worker serves).
        log.error("reload: %s; keeping the previous workers of tenant %r", message, slot.tenant)
        self._handovers.remove(handover)
        self._reloaded = (f"reload rejected for tenant {slot.tenant!r}", self.generation)
        self._note(self.reload_note.file, RELOAD_FAILED, message)
        for other in handover.new - {slot.id}:
            if other in self.slots and self.slots[other].state in ACTIVE:
                self._handle(self.slots[other], SlotEvent.RETIRE)

    def _halt(self, reason: str, *, printed: bool = False) -> None:
        if not self._halted:
            if not printed:
                print(f"prism: halting: {reason}", file=sys.stderr, flush=True)
            log.error("halting: %s", reason)
            self._halted = True
            self.exit_code = EXIT_HALTED

    def _check_heartbeats(self, now: float) -> None:
        for slot in list(self.slots.values()):
            timeout = slot.silent_past(now, BOOT_TIMEOUT_S, self.config.heartbeat_timeout_s)
            if timeout is not None:
                pid = slot.proc.pid if slot.proc else 0
                log.error("worker %d (pid %d) missed heartbeats for %.1fs: SIGKILL", slot.id, pid, timeout)
                self._handle(slot, SlotEvent.SILENT)

    def _reap_admin(self, now: float) -> None:
        admin = self.admin
        if admin is not None and admin.poll() is not None:
            log.error("admin process (pid %d) exited with %s; restarting", admin.pid, admin.returncode)
            self.admin = None
            self._admin_restart_at = now + ADMIN_RESTART_S
        elif admin is None and now >= self._admin_restart_at:
            self.admin = self.resources.start_admin(self.config, self.config_file, self.overrides)

    def _migrate(self) -> None:
        """Migration requests and automatic moves (``prism.workers.migrations``); a finished
        migration's rewritten config is reloaded here, as a SIGHUP's."""

        def reload() -> bool:
            self._reload()
            return self.reload_note.state != RELOAD_REJECTED

        if self.migrations.turn(self.config, len(self.allowed_cpus), self.slots.values(), reload):
            self._routes_changed = True

    # -- drain -----------------------------------------------------------------

    def _start_drain(self) -> None:
        if self.draining:
            return
        log.info("draining: SIGTERM to every worker")
        self.notifier.stopping()
        self.draining = True
        self._broadcast()
        self.drain_deadline = time.monotonic() + self.config.graceful_timeout_s
        self._handovers.clear()
        for slot in list(self.slots.values()):
            if slot.state is SlotState.GONE:
                del self.slots[slot.id]
            else:
                self._handle(slot, SlotEvent.DRAIN)

    def _escalate_drain(self, now: float) -> None:
        """SIGKILL the workers still running ``graceful_timeout_s`` after the drain began."""
        if now <= self.drain_deadline:
            return
        for slot in self.slots.values():
            if slot.state is SlotState.DRAINING:
                log.warning("worker %d did not drain in time: SIGKILL", slot.id)
                self._handle(slot, SlotEvent.DRAIN_OVERDUE)

    # -- stop ------------------------------------------------------------------

    def _stop_everything(self) -> None:
        procs = [s.proc for s in self.slots.values() if s.proc is not None]
        for proc in procs:
            signal_child(proc, signal.SIGINT if self._halted else signal.SIGTERM)
        procs.extend(p for p in [self.resources.stop_zygote()] if p is not None)  # SIGTERM'd
        if self.admin is not None:
            # SIGTERM either way: the admin process stops the same on both, and
            # one still starting (no handler yet) then ends without a traceback.
            signal_child(self.admin, signal.SIGTERM)
            procs.append(self.admin)
        wait_or_kill(procs, FAST_STOP_S)
        signal.set_wakeup_fd(-1)
