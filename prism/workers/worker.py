"""A worker process: serves gRPC for one tenant's namespaces.

The worker template (``prism.workers.zygote``) forks each worker from its
imported modules, or, failing that, the supervisor execs ``python -m
prism.workers.worker``; either way the worker gets its ``WorkerSpec`` from a
memfd and the listening socket, routing table, its tenant's namespace table
and the cache table as inherited file descriptors. Neither process that
forks runs a loop or a thread: trio's loop and nng's threads start here,
after the fork.

Inside, one trio loop runs: the gRPC server on the shared listening socket,
the nng endpoint other workers forward calls to, heartbeats to the
supervisor, and a watch on the routing table that opens and retires
namespaces as the supervisor republishes it.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import signal
import socket
import sys
from pathlib import Path

import msgspec
import trio

from prism.cache.shared import SharedCache
from prism.log import setup_logging
from prism.nng import pynng
from prism.router.handoff import TenantHandoff, serve_handoffs
from prism.router.messages import BootFailed, Heartbeat, State, control_decoder, control_encoder
from prism.router.readiness import Readiness
from prism.router.remote import Forwarding
from prism.router.table import RoutingTableReader, RoutingTableUnavailable
from prism.rpc.accept_share import TABLE_BYTES as ACCEPTS_BYTES
from prism.rpc.accept_share import AcceptShare
from prism.rpc.listen import serve_listeners
from prism.workers import heap
from prism.workers.app import App
from prism.workers.lifeline import die_with_parent, name_process, wait_for_parent
from prism.workers.migrating import WorkerMigrations
from prism.workers.spec import EXIT_BOOT_FAILED, WORKER_LABEL_ENV, WorkerSpec, read_spec
from prism.workers.tenant_table import open_tenant_table

log = logging.getLogger("prism.worker")

HEARTBEAT_INTERVAL_S = 0.25
ROUTES_POLL_S = 0.25
HEALTH_INTERVAL_S = 1.0
# Python's default (700 net new container objects) made a worker collect
# about 500 times a second at 64 calls in flight on PostgreSQL: every call
# in flight holds a few dozen objects, so each wave of calls crossed the
# threshold and the collector walked live objects only: up to a tenth of a
# call's CPU. At 10,000 it collects a few times a minute under the same
# load; cyclic garbage still goes, just in larger, rarer batches.
GC_GEN0_THRESHOLD = 10_000


class BootError(Exception):
    """The worker cannot start serving (its namespaces' backends will not open)."""


class Worker:
    """One worker process's wiring: its loops, sockets, signals, heartbeats and
    drain, around the ``App`` that serves calls and the ``Forwarding`` policy
    for the namespaces it does not hold."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.routes = RoutingTableReader(mmap.mmap(spec.routes_fd, spec.routes_bytes))
        # Our tenant's namespaces, backend options included (not in the shared table).
        self.own = open_tenant_table(spec.namespaces_fd, spec.namespaces_bytes)
        self.cache = SharedCache(mmap.mmap(spec.cache_fd, spec.cache_bytes)) if spec.cache_fd >= 0 else None
        self.remote = Forwarding(
            tenant=spec.tenant,
            worker_id=spec.worker_id,
            address=spec.forward_address,
            routes=self.routes,
            host=self,
        )
        self.app = App(
            spec.config,
            shared_cache=self.cache,
            remote=self.remote,
            locator=self.remote,
            tenant=spec.tenant,
            worker=str(spec.worker_id),
        )
        if spec.accepts_fd >= 0:
            accepts = mmap.mmap(spec.accepts_fd, ACCEPTS_BYTES)
            self.app.settings.accept_share = AcceptShare(accepts, spec.worker_id)
        self.migrations = self.app.migrating = WorkerMigrations(Path(spec.config.data_dir), spec.worker_id)
        self.generation = -1
        self.draining = False
        self._applying = trio.Lock()
        self._readiness = Readiness()
        self.app.health.follow(self.not_ready)

    def not_ready(self) -> str | None:
        """Why the gateway is not ready yet (``Check("")`` is NOT_SERVING), or None.
        Read from the newest table at every Check, so it flips at the moment the
        supervisor publishes (and sends READY=1) and ``/readyz`` does."""
        try:
            return self._readiness.reason(self.routes.current())
        except RoutingTableUnavailable as exc:
            return str(exc)

    # -- routing -------------------------------------------------------------

    async def apply_routes(self, *, strict: bool = False) -> None:
        """Open and retire namespaces as the routing table's newest generation says."""
        # The control loop, the table watch and forwarding call this; one at
        # a time, or two could open the same namespace.
        async with self._applying:
            routes = self.routes.current()
            if routes.generation == self.generation:
                return
            # Written before this routing generation: at least as new as it.
            own = self.own.current()
            self.migrations.want(own.migrations)
            await self.app.apply(own.namespaces, strict=strict)
            waiting = self._settle_migrations()
            # A phase that moves the backend answering waits for the writes this
            # worker acknowledged to be on it; not there in time, the generation is
            # not reported (the supervisor goes back to the old phase).
            switched = await self.migrations.switch(waiting)
            self.app.settings.security.apply(routes.security)
            self.app.apply_limits(self.spec.tenant, routes)
            # Our tenant's other workers accept on the same socket: take a
            # burst's share, not all of it (prism.rpc.accept_share). All of
            # them, serving yet or not: whether one accepts is in its cell.
            share = self.app.settings.accept_share
            if share is not None:
                share.siblings = tuple(w.id for w in routes.tenant_workers(self.spec.tenant))
            if switched:
                self.generation = routes.generation
            self.app.health.poke()  # Watch("") reads readiness again
            self.remote.bus.owners_gone({w.id for w in routes.workers.values() if w.serving})

    def _settle_migrations(self) -> list[str]:
        """Apply moved migration serials; the tenant's first worker runs the backfills.
        Returns the migrating namespaces whose phase waits for ``WorkerMigrations.switch``."""
        first = self.routes.current().tenant_workers(self.spec.tenant)
        return self.migrations.settle(
            {h.config.name: h.backend for h in self.app.namespaces.held()},
            bool(first) and first[0].id == self.spec.worker_id,
        )

    # -- loops ---------------------------------------------------------------

    async def _heartbeats(self, push: pynng.Push0) -> None:
        while True:
            beat = Heartbeat(
                self.spec.worker_id, os.getpid(), self.generation, self.app.settings.active_calls
            )
            try:
                push.send(control_encoder.encode(beat), block=False)
            except pynng.TryAgain:
                pass  # the supervisor is busy or restarting: the next beat will do
            await trio.sleep(HEARTBEAT_INTERVAL_S)

    async def _control(self, sub: pynng.Sub0, drain: trio.Event) -> None:
        while True:
            raw = await sub.arecv()
            try:
                state: State = control_decoder.decode(raw)
            except msgspec.DecodeError:
                log.warning("undecodable control message ignored")
                continue
            logging.getLogger("prism").setLevel(state.log_level.upper())
            if state.generation != self.generation:
                await self.apply_routes()
            if state.draining:
                drain.set()

    async def _watch_health(self) -> None:
        while True:
            await trio.sleep(HEALTH_INTERVAL_S)
            await self.app.check_health()

    async def _watch_routes(self) -> None:
        failures = 0
        while True:
            await trio.sleep(ROUTES_POLL_S)
            if self.routes.generation() != self.generation:
                await self.apply_routes()
            if self.routes.failures != failures:
                failures = self.routes.failures
                log.error(
                    "routing table unreadable, keeping generation %d: %s",
                    self.generation,
                    self.routes.last_error,
                )
            await self.app.close_retired()

    async def run(self) -> None:
        spec = self.spec
        try:
            await self.apply_routes(strict=True)
        except Exception as exc:
            raise BootError(str(exc)) from exc
        # The inherited fd becomes ours: closing the listener on drain must
        # release it, or the kernel would keep queueing connections to us.
        sock = socket.socket(fileno=spec.listen_fd)
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        drain = trio.Event()
        with (
            pynng.Push0(dial=spec.events_address, block_on_dial=False) as push,
            pynng.Sub0(dial=spec.control_address, block_on_dial=False) as sub,
            trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) as signals,
        ):
            sub.subscribe(b"")
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.remote.bus.run)
                    self.app.settings.handoff = TenantHandoff(spec.tenant, self.routes.current)
                    await nursery.start(serve_handoffs, spec.handoff_address, self.app.settings)
                    nursery.start_soon(self._serve_then_stop, listener, nursery)
                    nursery.start_soon(self._heartbeats, push)
                    nursery.start_soon(self._control, sub, drain)
                    nursery.start_soon(self._watch_routes)
                    nursery.start_soon(self._watch_health)
                    nursery.start_soon(self.app.keep_reopening)
                    await nursery.start(self.migrations.run)
                    self._settle_migrations()  # a backfill that waited for the nursery
                    nursery.start_soon(heap.trim_when_quiet, lambda: self.app.settings.traffic_bytes)
                    nursery.start_soon(self._on_drain, drain, nursery)
                    async for signum in signals:
                        if signum == signal.SIGTERM:
                            drain.set()
                        else:
                            nursery.cancel_scope.cancel()
                            break
            finally:
                self.remote.bus.close()
                with trio.CancelScope(shield=True):
                    await self.app.aclose()

    async def _serve_then_stop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        settings = self.app.settings
        await serve_listeners([listener], settings)
        # Our own connections have closed; connections other workers handed
        # to us are served outside the listener and may still have calls, and
        # so may other workers' forwarded calls: those sent before their
        # sender read the table that says we drain (it polls every
        # ROUTES_POLL_S) are answered, not dropped (UNAVAILABLE at the sender).
        linger_until = trio.current_time() + 2 * ROUTES_POLL_S
        bus = self.remote.bus
        while settings.connections or bus.serving or trio.current_time() < linger_until:
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()  # drained: every connection has closed

    async def _on_drain(self, drain: trio.Event, nursery: trio.Nursery) -> None:
        await drain.wait()
        log.info("worker %d draining", self.spec.worker_id)
        self.app.settings.start_drain()
        await trio.sleep(self.spec.config.graceful_timeout_s)
        nursery.cancel_scope.cancel()


def main() -> None:
    serve(read_spec(WorkerSpec))


def serve(spec: WorkerSpec, *, forked: bool = False) -> None:
    """Run this process as the worker ``spec`` describes, until it stops
    (exec'd: ``main``; ``forked`` by the worker template: ``prism.workers.zygote``)."""
    if forked:
        wait_for_parent(spec.supervisor_pid)
    die_with_parent(spec.supervisor_pid)
    name_process(os.environ.get(WORKER_LABEL_ENV, "prism-worker"))  # "ID:TENANT@cpuN", for ps and top
    # Reload is the supervisor's business; a hangup sent to the whole process
    # group (a closing terminal, kill -HUP -PGID) must not stop workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # likewise the supervisor's migration wake-up
    setup_logging(spec.config.log_level)
    try:
        if spec.cpu is not None:
            try:
                os.sched_setaffinity(0, {spec.cpu})
            except OSError as exc:
                raise BootError(f"cannot pin to CPU {spec.cpu}: {exc.strerror}") from None
        _settle_heap()
        trio.run(Worker(spec).run)
    except BootError as exc:
        reason = str(exc).replace("\n", " ")
        print(
            f"prism: worker {spec.worker_id} of tenant {spec.tenant!r} cannot boot: {reason}",
            file=sys.stderr,
            flush=True,
        )
        # The report makes the supervisor halt and SIGINT its children, this
        # one too, maybe while it exits: a traceback from an atexit hook then.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _report_boot_failure(spec, reason)
        sys.exit(EXIT_BOOT_FAILED)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        # SIGINT while still starting (the supervisor halting) arrives wrapped.
        if group.subgroup(KeyboardInterrupt) is None or group.subgroup(
            lambda e: not isinstance(e, KeyboardInterrupt | BaseExceptionGroup)
        ):
            raise


def _settle_heap() -> None:
    """Keep the garbage collector off what was built at import (modules,
    protobuf descriptors: tens of thousands of objects, alive for good) and
    let it run less often (GC_GEN0_THRESHOLD); set malloc for large messages
    (``prism.workers.heap``)."""
    heap.tune()
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _report_boot_failure(spec: WorkerSpec, reason: str) -> None:
    try:
        with pynng.Push0(dial=spec.events_address, send_timeout=500) as push:
            push.send(control_encoder.encode(BootFailed(spec.worker_id, os.getpid(), reason)))
    except pynng.NNGException:
        pass  # the exit code tells the supervisor too


if __name__ == "__main__":
    main()
