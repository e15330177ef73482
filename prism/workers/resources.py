"""What the supervisor creates once and every child inherits, and how a child is started with it.

The gRPC and admin sockets are bound here, in the supervisor, so that a
restarted worker or admin process serves the same socket with no window in
which the port is closed or taken. The routing table and the cache table are
memfds: a child is not a fork of the supervisor (the admin process is a
fresh interpreter, ``subprocess`` execs ``python -m``; a worker is forked by
the worker template, ``prism.workers.forked``, itself exec'd so), so it maps
them from the descriptors passed down with the spec that names them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec

from prism.cache.shared import SharedCache
from prism.config import ServerConfig
from prism.metrics_files import mark_process_dead
from prism.router.table import ReloadNote, Routes, RoutingTableWriter, WorkerEntry
from prism.rpc.accept_share import TABLE_BYTES as ACCEPTS_BYTES
from prism.rpc.accept_share import forget
from prism.security.section import section_of
from prism.workers.forked import ForkedChild, Zygote, become_subreaper
from prism.workers.routes_size import (
    namespace_entries,
    option_digests,
    routes_bytes_for,
    settings_of,
    tenant_entries,
)
from prism.workers.slot import Slot, SlotState

if TYPE_CHECKING:
    from prism.workers.migrations import Migrations
from prism.workers.spec import (
    SPEC_FD_ENV,
    WORKER_LABEL_ENV,
    AdminSpec,
    WorkerSpec,
    ZygoteSpec,
    config_for_tenant,
    spec_fd,
)
from prism.workers.tenant_table import TenantTables

log = logging.getLogger("prism.supervisor")

Child = subprocess.Popen[bytes] | ForkedChild

__all__ = ["NO_RELOAD", "Resources", "bind", "signal_child"]

NO_RELOAD: Final = ReloadNote()  # no reload yet


def bind(address: tuple[str, int], field: str = "listen") -> socket.socket:
    """A listening TCP socket on ``address`` that children can inherit; an
    OSError whose text names the config ``field`` and the address if not."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise type(exc)(exc.errno, f"{field}: cannot listen on {shown}: {exc.strerror or exc}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def _memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, 0)  # inheritable is set below, for the children
    os.ftruncate(fd, size)
    os.set_inheritable(fd, True)
    return fd, mmap.mmap(fd, size)


@dataclass
class Resources:
    """The sockets, tables and addresses of one server run."""

    grpc_sock: socket.socket
    admin_sock: socket.socket
    routes_fd: int
    routes_bytes: int
    routes: RoutingTableWriter
    cache_fd: int  # -1: no shared cache
    cache_bytes: int
    runtime_dir: Path
    fds: list[int] = field(default_factory=list)  # what every worker inherits
    # Each tenant's namespaces, options included: only its own workers get its table.
    tenants: TenantTables = field(default_factory=TenantTables)
    # The worker template (prism.workers.forked); None: not started yet, or
    # given up on (workers are exec'd then).
    zygote: Zygote | None = None
    fork_workers: bool = True
    # Keys the option digests of the routing table (routes_size.option_digests); the admin process has it too.
    options_key: bytes = field(default_factory=lambda: os.urandom(32))
    # The connections each worker holds, which its siblings read before
    # accepting (prism.rpc.accept_share); -1: none.
    accepts_fd: int = -1
    accepts: mmap.mmap | None = None

    @classmethod
    def create(cls, config: ServerConfig, runtime_dir: Path, cpus: int) -> Resources:
        """Bind the sockets and create the tables; raises OSError (a port taken, no memory)."""
        grpc_sock = bind(config.listen_host_port(), "listen")
        try:
            admin_sock = bind(config.admin_host_port(), "admin_listen")
        except OSError:
            grpc_sock.close()
            raise
        routes_bytes = routes_bytes_for(config, cpus)  # sized to the config (prism.workers.routes_size)
        routes_fd, routes_map = _memfd("prism-routes", routes_bytes)
        cache_fd, cache_bytes = -1, 0
        if config.cache.total_bytes:
            # Always made (pages are committed only when used), so that a
            # reload can turn a namespace's cache on.
            cache_bytes = config.cache.total_bytes
            cache_fd, cache_map = _memfd("prism-cache", cache_bytes)
            SharedCache.format_zeroed(cache_map, config.cache.slot_bytes).close()
        accepts_fd, accepts = _memfd("prism-accepts", ACCEPTS_BYTES)  # zeroed: no worker yet
        fds = [grpc_sock.fileno(), admin_sock.fileno(), routes_fd, accepts_fd]
        fds += [cache_fd] if cache_fd >= 0 else []
        return cls(
            grpc_sock,
            admin_sock,
            routes_fd,
            routes_bytes,
            RoutingTableWriter(routes_map),
            cache_fd,
            cache_bytes,
            runtime_dir,
            fds,
            accepts_fd=accepts_fd,
            accepts=accepts,
        )

    def worker_gone(self, worker_id: int) -> None:
        """A worker has exited (reaped): its siblings stop leaving connections to it."""
        if self.accepts is not None:
            forget(self.accepts, worker_id)

    # -- addresses -----------------------------------------------------------

    @property
    def control_address(self) -> str:
        """The supervisor's PUB socket: state for every worker."""
        return f"ipc://{self.runtime_dir / 'control.ipc'}"

    @property
    def events_address(self) -> str:
        """The supervisor's PULL socket: heartbeats and boot failures."""
        return f"ipc://{self.runtime_dir / 'events.ipc'}"

    def forward_address(self, slot_id: int) -> str:
        return f"ipc://{self.runtime_dir / f'fwd-{slot_id}.ipc'}"

    def handoff_address(self, slot_id: int) -> str:
        return str(self.runtime_dir / f"handoff-{slot_id}.sock")

    # -- the routing table ---------------------------------------------------

    def routes_for(
        self,
        generation: int,
        config: ServerConfig,
        cpus: int,
        slots: Iterable[Slot],
        security_serial: int,
        ready_once: bool = False,
        reload: ReloadNote = NO_RELOAD,
        migrations: Migrations | None = None,
    ) -> Routes:
        """The routing table for ``config`` served by ``slots``; only SERVING slots are listed as serving."""
        namespaces = namespace_entries(config, cpus)
        workers = {
            s.id: WorkerEntry(
                s.id,
                s.tenant,
                s.proc.pid if s.proc else 0,
                self.forward_address(s.id),
                self.handoff_address(s.id),
                s.state is SlotState.SERVING,
            )
            for s in slots
        }
        tenant_limits = {
            t.name: msgspec.to_builtins(t.limits)
            for t in config.effective_tenants(cpus)
            if t.limits is not None
        }
        return Routes(
            generation,
            namespaces,
            workers,
            section_of(config, security_serial),
            tenant_limits=tenant_limits,
            ready_once=ready_once,
            tenants=tenant_entries(config, cpus),
            settings=settings_of(config),
            option_digests=option_digests(config, cpus, self.options_key),
            reload=reload,
            migrations=migrations.entries(generation, config, cpus, slots) if migrations else {},
            migration_answers=migrations.table_answers() if migrations else {},
        )

    # -- children --------------------------------------------------------------

    def start_worker(self, slot: Slot, config: ServerConfig) -> Child:
        """A worker for ``slot``, with its spec, the shared fds and its tenant's
        own namespace table (published first): forked by the worker template,
        else exec'd as ``python -m prism.workers.worker``."""
        namespaces_fd, namespaces_bytes = self.tenants.fd_of(slot.tenant)
        spec = WorkerSpec(
            worker_id=slot.id,
            tenant=slot.tenant,
            cpu=slot.cpu,
            listen_fd=self.grpc_sock.fileno(),
            routes_fd=self.routes_fd,
            routes_bytes=self.routes_bytes,
            namespaces_fd=namespaces_fd,
            namespaces_bytes=namespaces_bytes,
            cache_fd=self.cache_fd,
            cache_bytes=self.cache_bytes,
            control_address=self.control_address,
            events_address=self.events_address,
            forward_address=self.forward_address(slot.id),
            handoff_address=self.handoff_address(slot.id),
            config=config_for_tenant(config, slot.tenant),
            supervisor_pid=os.getpid(),
            accepts_fd=self.accepts_fd,
        )
        label = f"{slot.id}:{slot.tenant}@cpu{slot.cpu}"
        zygote = self._zygote()
        if zygote is not None:
            fd = spec_fd(spec)
            try:
                return zygote.fork(fd, namespaces_fd, label)
            except OSError as exc:
                log.warning("worker template failed (%s): workers are exec'd from now on", exc)
                self.stop_zygote()
                self.fork_workers = False
            finally:
                os.close(fd)
        fds = [*self.fds, namespaces_fd]
        return _spawn("prism.workers.worker", spec, fds, {WORKER_LABEL_ENV: label})

    def _zygote(self) -> Zygote | None:
        """The running worker template, started on first use; None: exec workers."""
        if self.zygote is None and self.fork_workers:
            if not become_subreaper():
                self.fork_workers = False  # forked workers could not be our children
                return None
            ours, theirs = Zygote.socket_pair()
            try:
                spec = ZygoteSpec(supervisor_pid=os.getpid(), socket_fd=theirs.fileno())
                self.zygote = Zygote(_spawn("prism.workers.zygote", spec, [*self.fds, theirs.fileno()]), ours)
            finally:
                theirs.close()
        return self.zygote

    def stop_zygote(self) -> subprocess.Popen[bytes] | None:
        """Stop the worker template (its workers live on); its process, to wait for."""
        zygote, self.zygote = self.zygote, None
        if zygote is None:
            return None
        zygote.close()
        return zygote.proc

    def start_admin(
        self, config: ServerConfig, config_file: str = "", overrides: Mapping[str, Any] | None = None
    ) -> subprocess.Popen[bytes]:
        """Exec ``python -m prism.admin.main`` on the admin socket and the routing table;
        ``config_file`` and ``overrides`` (flags) are how the config was loaded (``POST /v1/config``)."""
        spec = AdminSpec(
            listen_fd=self.admin_sock.fileno(),
            routes_fd=self.routes_fd,
            routes_bytes=self.routes_bytes,
            log_level=config.log_level,
            supervisor_pid=os.getpid(),
            token_file=config.admin_token_file,
            tls=config.admin.tls,
            config_file=config_file,
            options_key=self.options_key.hex(),
            data_dir=str(Path(config.data_dir).absolute()),
            overrides={k: v for k, v in (overrides or {}).items() if v is not None},
        )
        return _spawn("prism.admin.main", spec, [self.admin_sock.fileno(), self.routes_fd])


def _spawn(
    module: str,
    spec: WorkerSpec | AdminSpec | ZygoteSpec,
    fds: list[int],
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Exec ``python -m module`` with ``spec`` in a memfd it inherits (see ``prism.workers.spec``)."""
    fd = spec_fd(spec)
    try:
        env = {**os.environ, **(extra_env or {}), SPEC_FD_ENV: str(fd)}
        return subprocess.Popen([sys.executable, "-m", module], env=env, pass_fds=[*fds, fd])
    finally:
        os.close(fd)  # the child has its own copy


def signal_child(proc: Child, signum: int) -> None:
    """Send ``signum`` to a child; one that has already exited (not yet reaped) is no error."""
    try:
        proc.send_signal(signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


def wait_or_kill(procs: list[Child], within_s: float) -> None:
    """Wait for ``procs`` (signalled to stop) for ``within_s`` in all; SIGKILL those still running."""
    deadline = time.monotonic() + within_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_child(proc, signal.SIGKILL)
            proc.wait()


def mark_dead(pid: int) -> None:
    """Delete a dead child's live-gauge files (``livesum``/``liveall``); its counters stay."""
    try:
        mark_process_dead(pid)
    except OSError:
        pass


EXIT_CONFIG = 2  # as `prism serve` for a config error


def start_failure_code(exc: OSError) -> int:
    """1 when trying again later may work (a port in use, no memory), 2 when
    the configured value cannot work here (an address not on this machine, a
    privileged port, a host name that does not resolve)."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EADDRNOTAVAIL) or isinstance(exc, socket.gaierror):
        return EXIT_CONFIG
    return 1
