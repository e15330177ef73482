"""``prism serve``: the supervisor process.

It binds the gRPC and admin sockets, creates the shared-memory routing and
cache tables (memfds), starts the admin process and every tenant's workers
(pinned to CPUs), and then only watches: heartbeats over nng, dead children,
signals. It runs no event loop on the hot path and handles no call.

Signals only enqueue (gunicorn's arbiter pattern); the main loop dispatches:
SIGTERM drains, SIGINT/SIGQUIT stop fast, SIGHUP reloads the config, SIGCHLD
reaps. A dead worker is replaced after an exponential backoff with jitter; a
worker that cannot boot at all (exit code 3 before its first heartbeat)
halts the whole server with its reason, instead of a crash loop.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pynng

from prism.cache.shared import SharedCache
from prism.config import ServerConfig, TenantConfig
from prism.errors import ConfigError
from prism.router.messages import BootFailed, Heartbeat, State, control_encoder, event_decoder
from prism.router.table import NamespaceEntry, Routes, RoutingTableWriter, WorkerEntry
from prism.workers.preflight import check_deployable
from prism.workers.sdnotify import SystemdNotifier
from prism.workers.spec import EXIT_BOOT_FAILED, EXIT_HALTED, SPEC_ENV, WorkerSpec

log = logging.getLogger("prism.supervisor")

ROUTES_BYTES = 4 * 1024 * 1024
TICK_S = 0.1
STATE_INTERVAL_S = 0.5
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 10.0  # a worker up this long resets its slot's failure count
BOOT_TIMEOUT_S = 60.0
FAST_STOP_S = 3.0
ADMIN_RESTART_S = 0.5


@dataclass
class Slot:
    """One worker position: tenant, CPU, addresses; its process comes and goes."""

    id: int
    tenant: str
    cpu: int | None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    last_beat: float = 0.0
    serving: bool = False
    booted: bool = False
    failures: int = 0
    restart_at: float | None = None
    retiring: bool = False  # removed by a reload: drain, do not replace
    from_reload: bool = False  # started by a reload: failing to boot rejects it, not the server


@dataclass
class Shared:
    """What the supervisor creates once and every child inherits."""

    grpc_sock: socket.socket
    admin_sock: socket.socket
    routes_fd: int
    routes: RoutingTableWriter
    cache_fd: int
    cache_bytes: int
    runtime_dir: Path
    fds: list[int] = field(default_factory=list)


def bind(address: tuple[str, int]) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, 0)  # inheritable is set below, for the children
    os.ftruncate(fd, size)
    os.set_inheritable(fd, True)
    return fd, mmap.mmap(fd, size)


def plan_cpus(tenants: tuple[TenantConfig, ...], allowed: list[int]) -> list[tuple[str, int | None]]:
    """(tenant, cpu) for every worker: the tenant's CPUs, else round robin over ``allowed``."""
    out: list[tuple[str, int | None]] = []
    next_cpu = 0
    for tenant in tenants:
        for n in range(tenant.workers):
            if tenant.cpus:
                out.append((tenant.name, tenant.cpus[n % len(tenant.cpus)]))
            else:
                out.append((tenant.name, allowed[next_cpu % len(allowed)] if allowed else None))
                next_cpu += 1
    return out


class Supervisor:
    def __init__(
        self, config: ServerConfig, reload_config: Callable[[], ServerConfig], runtime_dir: Path
    ) -> None:
        self.config = config
        self.runtime_dir = runtime_dir
        self._reload_config = reload_config
        self.allowed_cpus = sorted(os.sched_getaffinity(0))
        self.slots: dict[int, Slot] = {}
        self._next_slot = 0
        self.generation = 0
        self.draining = False
        self._signals: list[int] = []
        self.notifier = SystemdNotifier.from_env(unset_environment=True)
        self.exit_code = 0
        self._halted = False
        self.admin: subprocess.Popen[bytes] | None = None
        self._admin_restart_at = 0.0
        self._handovers: list[tuple[set[int], set[int]]] = []

    # -- signals ---------------------------------------------------------------

    def _install_signals(self) -> int:
        r, w = os.pipe()
        os.set_blocking(w, False)
        os.set_blocking(r, False)
        signal.set_wakeup_fd(w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, self._enqueue)
        return r

    def _enqueue(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    # -- start-up ------------------------------------------------------------

    def _create_shared(self) -> Shared:
        cfg = self.config
        runtime = self.runtime_dir
        grpc_sock = bind(cfg.listen_host_port())
        admin_sock = bind(cfg.admin_host_port())
        routes_fd, routes_map = _memfd("prism-routes", ROUTES_BYTES)
        cache_fd, cache_bytes = -1, 0
        if cfg.cache.total_bytes:
            # Always made (pages are committed only when used), so that a
            # reload can turn a namespace's cache on.
            cache_bytes = cfg.cache.total_bytes
            cache_fd, cache_map = _memfd("prism-cache", cache_bytes)
            SharedCache.format_zeroed(cache_map, cfg.cache.slot_bytes).close()
        shared = Shared(
            grpc_sock, admin_sock, routes_fd, RoutingTableWriter(routes_map), cache_fd, cache_bytes, runtime
        )
        shared.fds = [grpc_sock.fileno(), admin_sock.fileno(), routes_fd] + (
            [cache_fd] if cache_fd >= 0 else []
        )
        return shared

    def _address(self, kind: str, slot_id: int) -> str:
        return f"ipc://{self.shared.runtime_dir / f'{kind}-{slot_id}.ipc'}"

    def _routes(self) -> Routes:
        namespaces: dict[str, NamespaceEntry] = {}
        for tenant in self.config.effective_tenants(len(self.allowed_cpus)):
            for ns in tenant.namespaces:
                namespaces[ns.name] = NamespaceEntry(
                    ns.name,
                    tenant.name,
                    ns.abstraction,
                    ns.backend,
                    dict(ns.options),
                    msgspec.to_builtins(ns.cache),
                )
        workers = {
            s.id: WorkerEntry(
                s.id,
                s.tenant,
                s.proc.pid if s.proc else 0,
                self._address("fwd", s.id),
                str(self.shared.runtime_dir / f"handoff-{s.id}.sock"),
                s.serving and not s.retiring,
            )
            for s in self.slots.values()
        }
        return Routes(self.generation, namespaces, workers)

    def _publish(self) -> None:
        self.generation += 1
        self.shared.routes.publish(self._routes())
        self._broadcast()

    def _broadcast(self) -> None:
        state = State(self.generation, self.draining, self.config.log_level)
        try:
            self.control.send(control_encoder.encode(state), block=False)
        except pynng.TryAgain:
            pass

    def _add_slots(self, tenants: tuple[TenantConfig, ...]) -> None:
        for tenant, cpu in plan_cpus(tenants, self.allowed_cpus):
            slot = Slot(self._next_slot, tenant, cpu)
            self._next_slot += 1
            self.slots[slot.id] = slot

    def _spawn(self, slot: Slot) -> None:
        spec = WorkerSpec(
            worker_id=slot.id,
            tenant=slot.tenant,
            cpu=slot.cpu,
            listen_fd=self.shared.grpc_sock.fileno(),
            routes_fd=self.shared.routes_fd,
            routes_bytes=ROUTES_BYTES,
            cache_fd=self.shared.cache_fd,
            cache_bytes=self.shared.cache_bytes,
            control_address=self.control_address,
            events_address=self.events_address,
            forward_address=self._address("fwd", slot.id),
            handoff_address=str(self.shared.runtime_dir / f"handoff-{slot.id}.sock"),
            config=self.config,
            supervisor_pid=os.getpid(),
        )
        env = {**os.environ, SPEC_ENV: msgspec.json.encode(spec).decode()}
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", "prism.workers.worker"], env=env, pass_fds=self.shared.fds
        )
        slot.started = slot.last_beat = time.monotonic()
        slot.booted = slot.serving = False
        slot.restart_at = None
        log.info(
            "worker %d (tenant %s, cpu %s) started: pid %d", slot.id, slot.tenant, slot.cpu, slot.proc.pid
        )

    def _spawn_admin(self) -> None:
        spec = {
            "listen_fd": self.shared.admin_sock.fileno(),
            "routes_fd": self.shared.routes_fd,
            "routes_bytes": ROUTES_BYTES,
            "log_level": self.config.log_level,
            "supervisor_pid": os.getpid(),
        }
        env = {**os.environ, "PRISM_ADMIN_SPEC": msgspec.json.encode(spec).decode()}
        self.admin = subprocess.Popen(
            [sys.executable, "-m", "prism.admin.main"],
            env=env,
            pass_fds=[self.shared.admin_sock.fileno(), self.shared.routes_fd],
        )

    # -- the loop ------------------------------------------------------------

    def run(self) -> int:
        try:
            self.shared = self._create_shared()
        except OSError as exc:
            print(f"prism: cannot start: {exc.strerror or exc}", file=sys.stderr)
            return 1
        self.control_address = f"ipc://{self.shared.runtime_dir / 'control.ipc'}"
        self.events_address = f"ipc://{self.shared.runtime_dir / 'events.ipc'}"
        wake = self._install_signals()
        pid_path = self.runtime_dir / "prism.pid"
        pid_path.write_text(f"{os.getpid()}\n")
        with (
            pynng.Pub0(listen=self.control_address) as control,
            pynng.Pull0(listen=self.events_address) as events,
        ):
            self.control, self.events = control, events
            self._add_slots(self.config.effective_tenants(len(self.allowed_cpus)))
            self._publish()
            self._spawn_admin()
            for slot in self.slots.values():
                self._spawn(slot)
            selector = selectors.DefaultSelector()
            selector.register(wake, selectors.EVENT_READ)
            selector.register(events.recv_fd, selectors.EVENT_READ)
            log.info("serving gRPC on %s, admin on %s", self.config.listen, self.config.admin_listen)
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
            while self._signals:
                self._on_signal(self._signals.pop(0))
            self._reap()
            now = time.monotonic()
            if self.draining:
                if not any(s.proc for s in self.slots.values()):
                    return
                continue
            self._check_heartbeats(now)
            self._restart_due(now)
            self._reap_admin(now)
            if self._handovers:
                self._finish_handovers()
            if not ready_sent and self.slots and all(s.serving for s in self.slots.values()):
                ready_sent = True
                self.notifier.ready(f"serving with {len(self.slots)} workers")
                log.info("all %d workers serving", len(self.slots))
            if now >= next_state:
                next_state = now + STATE_INTERVAL_S
                self._broadcast()
            if watchdog_s and now >= next_watchdog:
                next_watchdog = now + watchdog_s
                self.notifier.watchdog()

    def _drain_events(self) -> None:
        while True:
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
                slot.last_beat = time.monotonic()
                slot.booted = True
                if not slot.serving and event.generation >= 1:
                    slot.serving = True
                    self._publish()
            elif isinstance(event, BootFailed):
                self._boot_failed(slot, event.reason)

    def _boot_failed(self, slot: Slot, reason: str) -> None:
        message = f"worker {slot.id} of tenant {slot.tenant!r} cannot boot: {reason}"
        if not slot.from_reload:
            self._halt(message)
            return
        # A reload's new worker: give up on it, keep the workers it was to replace.
        log.error("reload: %s; keeping the previous workers of tenant %r", message, slot.tenant)
        slot.retiring = True
        slot.restart_at = None
        self._handovers = [(old, new) for old, new in self._handovers if slot.id not in new]
        for other in self.slots.values():
            if other.tenant == slot.tenant and not other.from_reload:
                other.retiring = False

    def _halt(self, reason: str) -> None:
        if not self._halted:
            print(f"prism: halting: {reason}", file=sys.stderr, flush=True)
            log.error("halting: %s", reason)
            self._halted = True
            self.exit_code = EXIT_HALTED

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap runs every turn
        if signum == signal.SIGHUP:
            self._reload()
        elif signum == signal.SIGTERM:
            self._start_drain()
        else:  # SIGINT, SIGQUIT: stop now
            log.info("stopping fast (%s)", signal.Signals(signum).name)
            self._halted = True

    def _start_drain(self) -> None:
        if self.draining:
            return
        log.info("draining: SIGTERM to every worker")
        self.notifier.stopping()
        self.draining = True
        self._broadcast()
        self.drain_deadline = time.monotonic() + self.config.graceful_timeout_s
        for slot in self.slots.values():
            slot.restart_at = None
            if slot.proc is not None:
                _signal(slot.proc, signal.SIGTERM)

    def _reap(self) -> None:
        for slot in self.slots.values():
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            code = proc.returncode
            slot.proc = None
            was_serving = slot.serving
            slot.serving = False
            _mark_dead(proc.pid)
            if self.draining or self._halted:
                continue
            if slot.retiring:
                continue
            if code == EXIT_BOOT_FAILED and not slot.booted:
                self._boot_failed(slot, "see its message above")
                if self._halted:
                    return
                continue
            if time.monotonic() - slot.started > STABLE_AFTER_S:
                slot.failures = 0
            delay = min(BACKOFF_BASE_S * 2**slot.failures, BACKOFF_MAX_S) * random.uniform(0.5, 1.5)
            slot.failures += 1
            slot.restart_at = time.monotonic() + delay
            log.warning(
                "worker %d (pid %d) exited with %s; restarting in %.2fs", slot.id, proc.pid, code, delay
            )
            from prism import metrics

            metrics.WORKER_RESTARTS.labels(slot.tenant).inc()
            if was_serving:
                self._publish()
        gone = [i for i, s in self.slots.items() if s.retiring and s.proc is None]
        if gone:
            for slot_id in gone:
                del self.slots[slot_id]
            if not self.draining and not self._halted:
                self._publish()  # the table no longer lists the retired workers
        if self.draining:
            now = time.monotonic()
            if now > self.drain_deadline:
                for slot in self.slots.values():
                    if slot.proc is not None:
                        log.warning("worker %d did not drain in time: SIGKILL", slot.id)
                        _signal(slot.proc, signal.SIGKILL)

    def _reap_admin(self, now: float) -> None:
        admin = self.admin
        if admin is not None and admin.poll() is not None:
            log.error("admin process (pid %d) exited with %s; restarting", admin.pid, admin.returncode)
            self.admin = None
            self._admin_restart_at = now + ADMIN_RESTART_S
        elif admin is None and now >= self._admin_restart_at:
            self._spawn_admin()

    def _finish_handovers(self) -> None:
        """Retire a reload's superseded workers once their replacements serve."""
        pending = []
        for old, new in self._handovers:
            starting = [self.slots[i] for i in new if i in self.slots and not self.slots[i].retiring]
            if all(s.serving for s in starting):
                for slot_id in old:
                    slot = self.slots.get(slot_id)
                    if slot is not None and not slot.retiring:
                        slot.retiring = True
                        if slot.proc is not None:
                            _signal(slot.proc, signal.SIGTERM)
                self._publish()
            else:
                pending.append((old, new))
        self._handovers = pending

    def _check_heartbeats(self, now: float) -> None:
        limit = self.config.heartbeat_timeout_s
        for slot in self.slots.values():
            proc = slot.proc
            if proc is None or slot.retiring:
                continue
            timeout = limit if slot.booted else BOOT_TIMEOUT_S
            if now - slot.last_beat > timeout:
                log.error(
                    "worker %d (pid %d) missed heartbeats for %.1fs: SIGKILL", slot.id, proc.pid, timeout
                )
                _signal(proc, signal.SIGKILL)

    def _restart_due(self, now: float) -> None:
        for slot in self.slots.values():
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)

    # -- reload --------------------------------------------------------------

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            new = self._reload_config()
            check_deployable(new)
        except ConfigError as exc:
            log.error("reload rejected, keeping the running config: %s", exc)
            self.notifier.ready("reload rejected")
            return
        fixed = ("listen", "admin_listen", "data_dir", "cache", "max_message_bytes")
        for name in fixed:
            if getattr(new, name) != getattr(self.config, name):
                log.warning(
                    "reload: %s changes only at restart; keeping %r", name, getattr(self.config, name)
                )
                new = msgspec.structs.replace(new, **{name: getattr(self.config, name)})
        old_tenants = {t.name: t for t in self.config.effective_tenants(len(self.allowed_cpus))}
        new_tenants = {t.name: t for t in new.effective_tenants(len(self.allowed_cpus))}
        self.config = new
        replaced: list[TenantConfig] = []
        superseded: dict[str, set[int]] = {}
        for name, tenant in new_tenants.items():
            old = old_tenants.get(name)
            if old is None or (old.workers, old.cpus) != (tenant.workers, tenant.cpus):
                replaced.append(tenant)
                superseded[name] = {s.id for s in self.slots.values() if s.tenant == name and not s.retiring}
        for name in old_tenants.keys() - new_tenants.keys():
            for slot in self.slots.values():
                if slot.tenant == name:
                    slot.retiring = True  # its namespaces are gone: nothing to hand over
        before = set(self.slots)
        self._add_slots(tuple(replaced))
        started = set(self.slots) - before
        for slot_id in started:
            self.slots[slot_id].from_reload = True
        for tenant in replaced:
            new_ids = {i for i in started if self.slots[i].tenant == tenant.name}
            # The superseded workers serve until their replacements do.
            self._handovers.append((superseded[tenant.name], new_ids))
        self._publish()
        for slot_id in started:
            self._spawn(self.slots[slot_id])
        for slot in self.slots.values():
            if slot.retiring and slot.proc is not None:
                _signal(slot.proc, signal.SIGTERM)
        log.info("reloaded: generation %d, %d workers", self.generation, len(self.slots))
        self.notifier.ready("reloaded")

    # -- stop ------------------------------------------------------------------

    def _stop_everything(self) -> None:
        procs = [s.proc for s in self.slots.values() if s.proc is not None]
        if self.admin is not None:
            procs.append(self.admin)
        for proc in procs:
            _signal(proc, signal.SIGINT if self._halted else signal.SIGTERM)
        deadline = time.monotonic() + FAST_STOP_S
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        signal.set_wakeup_fd(-1)


def _signal(proc: subprocess.Popen[bytes], signum: int) -> None:
    try:
        proc.send_signal(signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid)
    except OSError:
        pass
