"""A worker process: serves gRPC for one tenant's namespaces.

The supervisor starts each worker as ``python -m prism.workers.worker`` with
its ``WorkerSpec`` in the environment and the listening socket, routing table
and cache table as inherited file descriptors (fork + exec, never a bare
fork: nng's threads do not survive fork, and a worker must start clean).

Inside, one trio loop runs: the gRPC server on the shared listening socket,
the nng endpoint other workers forward calls to, heartbeats to the
supervisor, and a watch on the routing table that opens and retires
namespaces as the supervisor republishes it.
"""

from __future__ import annotations

import gc
import logging
import math
import mmap
import os
import signal
import socket
import sys
import time
from typing import Any

import msgspec
import pynng
import trio

from prism import metrics
from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig
from prism.errors import FailedPrecondition, StatusCode, Unavailable
from prism.log import setup_logging
from prism.router.forward import ForwardBus, RemoteStatus
from prism.router.handoff import TenantHandoff, serve_handoffs
from prism.router.messages import (
    BootFailed,
    ForwardAnswer,
    ForwardCall,
    Heartbeat,
    State,
    control_decoder,
    control_encoder,
)
from prism.router.table import Routes, RoutingTableReader
from prism.rpc.listen import serve_listeners
from prism.rpc.methods import UNARY
from prism.rpc.server import failure_status
from prism.workers.app import App
from prism.workers.lifeline import die_with_parent
from prism.workers.spec import EXIT_BOOT_FAILED, SPEC_ENV, WorkerSpec

log = logging.getLogger("prism.worker")

HEARTBEAT_INTERVAL_S = 0.25
ROUTES_POLL_S = 0.25
HEALTH_INTERVAL_S = 1.0
# Accept spreading between workers sharing the port (see prism.rpc.listen).
ACCEPT_BACKOFF_S = 0.0005
# Which abstraction each service's calls need (a call naming a namespace of
# another abstraction is FAILED_PRECONDITION, wherever that namespace lives).
_ABSTRACTION_OF_SERVICE = {
    b"prism.kv.v1.KeyValue": "keyvalue",
    b"prism.timeseries.v1.TimeSeries": "timeseries",
    b"prism.pubsub.v1.PubSub": "pubsub",
}
# The start of the answer a worker gives to a call forwarded for a namespace
# it no longer owns; the sender refreshes its table and tries again once.
MOVED = "namespace moved while the call was forwarded:"
# How long a call waits for a namespace this worker was just given to open.
OPEN_WAIT_S = 5.0
# Python's default (700 net new container objects) made a worker collect
# about 500 times a second at 64 calls in flight on PostgreSQL: every call
# in flight holds a few dozen objects, so each wave of calls crossed the
# threshold and the collector walked live objects only. That was 5-8 us of a
# ~70 us call. At 10,000 it collects a few times a minute under the same
# load; cyclic garbage still goes, just in larger, rarer batches.
GC_GEN0_THRESHOLD = 10_000


class BootError(Exception):
    """The worker cannot start serving (its namespaces' backends will not open)."""


class ForwardedCall:
    """What handlers see of a call that another worker forwarded here."""

    forwarded = True

    def __init__(self, request: ForwardCall) -> None:
        self.path = request.path
        self.messages = [request.payload]
        self.metadata = request.metadata
        self.deadline = trio.current_time() + request.timeout_s if request.timeout_s else math.inf
        self.started = time.perf_counter()
        self.namespace = ""


def namespace_config(entry: Any) -> NamespaceConfig:
    """A routing-table namespace entry as the config struct the backends take."""
    return msgspec.convert(
        {
            "name": entry.name,
            "abstraction": entry.abstraction,
            "backend": entry.backend,
            "options": entry.options,
            "cache": entry.cache,
        },
        NamespaceConfig,
    )


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.routes = RoutingTableReader(mmap.mmap(spec.routes_fd, spec.routes_bytes))
        self.cache = SharedCache(mmap.mmap(spec.cache_fd, spec.cache_bytes)) if spec.cache_fd >= 0 else None
        self.bus = ForwardBus(spec.forward_address, self._handle_forwarded)
        self.app = App(spec.config, shared_cache=self.cache, remote=self, locator=self)
        self.generation = -1
        self.draining = False
        self._applying = trio.Lock()

    # -- routing -------------------------------------------------------------

    def _mine(self, routes: Routes) -> list[NamespaceConfig]:
        return [namespace_config(e) for e in routes.namespaces.values() if e.tenant == self.spec.tenant]

    async def _apply_routes(self, *, strict: bool = False) -> None:
        # Both the control loop and the table watch call this; one at a time,
        # or both could open the same namespace.
        async with self._applying:
            routes = self.routes.current()
            if routes.generation == self.generation:
                return
            await self.app.apply(self._mine(routes), strict=strict)
            self.generation = routes.generation
            self.bus.owners_gone({w.id for w in routes.workers.values() if w.serving})

    def tenant_of(self, namespace: str) -> str | None:
        """PubSub's Locator: the tenant holding ``namespace`` (a Subscribe
        stream cannot be forwarded; its client is told where to connect)."""
        entry = self.routes.current().namespaces.get(namespace)
        if entry is None:
            return None
        if entry.abstraction != "pubsub":
            raise FailedPrecondition(
                f"namespace {namespace!r} is a {entry.abstraction} namespace, not pubsub"
            )
        if entry.tenant == self.spec.tenant:
            raise Unavailable(f"namespace {namespace!r} is being opened; retry")
        return entry.tenant

    async def forward(self, namespace: str, call: Any) -> bytes | None:
        """KeyValue's Remote: answer a call for a namespace this worker does not hold.

        Another tenant's namespace goes to a worker of that tenant. One that
        the routing table says is ours but that we have not opened yet (a
        reload moved or added it a moment ago) waits for it to open, so a move
        fails no call.
        """
        for attempt in (1, 2):
            routes = self.routes.current()
            entry = routes.namespaces.get(namespace)
            if entry is None:
                return None
            wanted = _ABSTRACTION_OF_SERVICE.get(call.path.split(b"/", 2)[1])
            if wanted is not None and entry.abstraction != wanted:
                raise FailedPrecondition(
                    f"namespace {namespace!r} is a {entry.abstraction} namespace, not {wanted}"
                )
            owners = routes.owners(namespace)
            if any(w.id == self.spec.worker_id for w in owners):
                return await self._run_when_open(namespace, call)
            if call.forwarded:
                # The sender's table still names us; ours may be older still.
                if attempt == 1 and self.routes.generation() != self.generation:
                    await self._apply_routes()
                    continue
                raise RemoteStatus(StatusCode.UNAVAILABLE, f"{MOVED} {namespace!r}; retry")
            metrics.forwarded(namespace, call.path.rsplit(b"/", 1)[-1].decode())
            try:
                return await self.bus.forward(
                    owners, call.path, call.messages[0], call.metadata, call.deadline
                )
            except RemoteStatus as exc:
                # The owner we picked had already let the namespace go (a
                # reload moved it): our table is older than its; refresh, once.
                if attempt == 2 or not str(exc).startswith(MOVED):
                    raise
                await self._apply_routes()
        return None

    async def _run_when_open(self, namespace: str, call: Any) -> bytes:
        with trio.move_on_after(OPEN_WAIT_S):
            while not self.app.holds(namespace):
                await self._apply_routes()
                if not self.app.holds(namespace):
                    await trio.sleep(0.005)
        if not self.app.holds(namespace):
            raise Unavailable(f"namespace {namespace!r} is being opened; retry")
        method = self.app.methods.get(call.path)
        assert method is not None  # the call got here through this method
        return await method.invoke(method.decode(call.messages[0]), call)

    async def _handle_forwarded(self, request: ForwardCall) -> ForwardAnswer:
        method = self.app.methods.get(request.path)
        if method is None or method.kind != UNARY:
            return ForwardAnswer(request.id, StatusCode.UNIMPLEMENTED, "method cannot be forwarded", b"")
        call = ForwardedCall(request)
        response = await self._run_forwarded(method, call, request)
        observer = self.app.settings.observer
        if observer is not None:
            observer(call, method, StatusCode(response.status), time.perf_counter() - call.started)
        return response

    async def _run_forwarded(self, method: Any, call: ForwardedCall, request: ForwardCall) -> ForwardAnswer:
        with trio.CancelScope(deadline=call.deadline) as scope:
            try:
                decoded = method.decode(request.payload)
                answer = method.answer_now(decoded, call)  # a shared-cache hit, as on a connection
                if answer is None:
                    answer = await method.invoke(decoded, call)
            except Exception as exc:
                status, message = failure_status(exc, method)
                return ForwardAnswer(request.id, status, message, b"")
            return ForwardAnswer(request.id, StatusCode.OK, "", answer)
        assert scope.cancelled_caught
        return ForwardAnswer(request.id, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", b"")

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
                await self._apply_routes()
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
                await self._apply_routes()
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
            await self._apply_routes(strict=True)
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
                    await nursery.start(self.bus.run)
                    self.app.settings.handoff = TenantHandoff(spec.tenant, self.routes.current)
                    if len(self.routes.current().workers) > 1:
                        self.app.settings.accept_backoff_s = ACCEPT_BACKOFF_S
                    await nursery.start(serve_handoffs, spec.handoff_address, self.app.settings)
                    nursery.start_soon(self._serve_then_stop, listener, nursery)
                    nursery.start_soon(self._heartbeats, push)
                    nursery.start_soon(self._control, sub, drain)
                    nursery.start_soon(self._watch_routes)
                    nursery.start_soon(self._watch_health)
                    nursery.start_soon(self._on_drain, drain, nursery)
                    async for signum in signals:
                        if signum == signal.SIGTERM:
                            drain.set()
                        else:
                            nursery.cancel_scope.cancel()
                            break
            finally:
                self.bus.close()
                with trio.CancelScope(shield=True):
                    await self.app.aclose()

    async def _serve_then_stop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        settings = self.app.settings
        await serve_listeners([listener], settings)
        # Our own connections have closed; connections other workers handed
        # to us are served outside the listener and may still have calls.
        while settings.connections:
            await trio.sleep(0.02)
        nursery.cancel_scope.cancel()  # drained: every connection has closed

    async def _on_drain(self, drain: trio.Event, nursery: trio.Nursery) -> None:
        await drain.wait()
        log.info("worker %d draining", self.spec.worker_id)
        self.app.settings.start_drain()
        await trio.sleep(self.spec.config.graceful_timeout_s)
        nursery.cancel_scope.cancel()


def main() -> None:
    spec = msgspec.json.decode(os.environ[SPEC_ENV], type=WorkerSpec)
    die_with_parent(spec.supervisor_pid)
    # Reload is the supervisor's business; a hangup sent to the whole process
    # group (a closing terminal, kill -HUP -PGID) must not stop workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
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
    protobuf descriptors: ~39,000 objects, alive for good) and let it run
    less often (GC_GEN0_THRESHOLD)."""
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
