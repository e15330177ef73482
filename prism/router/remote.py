"""The forwarding policy: where a call for a namespace this worker does not
hold goes, and how a call forwarded here is served.

``ForwardBus`` (``forward.py``) carries calls and answers between workers;
this module decides what goes on it:

- A call naming a namespace of another abstraction than its service's is
  FAILED_PRECONDITION, wherever that namespace lives.
- A call for another tenant's namespace goes to a serving worker of that
  tenant. While that tenant has none (its workers are still starting, or
  restarting), the call waits for one, at most ``OWNER_WAIT_S`` and never
  past its deadline, instead of failing at once. One for a namespace the
  routing table gives to this worker but that it has not opened yet (a
  reload moved or added it a moment ago) waits for it to open, so a move
  fails no call; unless its remote backend is known to be down (the worker
  retries it): that is UNAVAILABLE at once, naming why.
- A forwarded call is never forwarded again. A worker that no longer holds
  the namespace of a call forwarded to it answers "moved"
  (``ForwardAnswer.moved``): the sender read an older routing table than the
  owner's, so it applies the newest one and tries once more.
- A Subscribe stream cannot be forwarded: ``tenant_of`` tells PubSub which
  tenant its client should name to reach the namespace's workers.
- With security on, a call goes out with the caller this worker's access
  check established (not its bearer token), and a call forwarded here is
  checked again against the access rules for that caller before it runs.
"""

from __future__ import annotations

import math
import time
from typing import Any, Final, Protocol

import trio

from prism import metrics
from prism.errors import DeadlineExceeded, FailedPrecondition, NotFound, StatusCode, Unavailable
from prism.router.forward import ForwardBus, Moved, RemoteStatus
from prism.router.messages import ForwardAnswer, ForwardCall
from prism.router.table import RoutingTableReader, WorkerEntry
from prism.rpc.boundary import failure_status
from prism.rpc.call import Call, CallContext, Caller
from prism.rpc.methods import UNARY, Method
from prism.rpc.pieces import Pieces
from prism.rpc.settings import Answered, ServerSettings
from prism.tracing import context as tracing

# Which abstraction each service's calls need.
ABSTRACTION_OF_SERVICE: Final = {
    b"prism.kv.v1.KeyValue": "keyvalue",
    b"prism.timeseries.v1.TimeSeries": "timeseries",
    b"prism.pubsub.v1.PubSub": "pubsub",
}
# How long a call waits for a namespace this worker was just given to open.
OPEN_WAIT_S: Final = 5.0
_OPEN_POLL_S: Final = 0.005
# How long a call waits for a serving worker of the namespace's tenant (its
# workers boot, or one restarts): covers a worker's start on a busy machine;
# a client's shorter deadline ends the wait sooner.
OWNER_WAIT_S: Final = 5.0
_OWNER_POLL_S: Final = 0.01


class ForwardedCall:
    """A call another worker forwarded here, as handlers see it (a ``CallContext``)."""

    __slots__ = ("caller", "deadline", "messages", "metadata", "namespace", "path", "started", "trace")

    forwarded = True

    def __init__(self, request: ForwardCall) -> None:
        self.path = request.path
        self.messages: list[bytes | bytearray | Pieces] = [request.payload]
        self.metadata: list[tuple[str, str | bytes]] = request.metadata
        self.deadline = math.inf if request.timeout_s is None else trio.current_time() + request.timeout_s
        self.started = time.perf_counter()
        self.namespace = ""
        # Who made the call, as the sender established it (to be checked here).
        self.caller: Caller | None = Caller(request.principal, request.peer)


class Local(Protocol):
    """The serving side of this process (``prism.workers.app.App``)."""

    @property
    def settings(self) -> ServerSettings:
        """Its method table and observer."""
        ...

    def holds(self, namespace: str) -> bool:
        """Whether ``namespace`` is open here."""
        ...

    def unreachable(self, namespace: str) -> str | None:
        """Why ``namespace``'s remote backend could not be opened, or None."""
        ...


class Host(Protocol):
    """The worker process the policy runs in (``prism.workers.worker.Worker``)."""

    @property
    def app(self) -> Local: ...

    @property
    def generation(self) -> int:
        """The routing table generation whose namespaces this process holds."""
        ...

    async def apply_routes(self) -> None:
        """Open and retire namespaces as the routing table's newest generation says."""
        ...


class Forwarding:
    """One worker's forwarding: KeyValue's (and every service's) ``Remote``,
    PubSub's ``Locator``, and the handler of its ``ForwardBus``."""

    def __init__(
        self, *, tenant: str, worker_id: int, address: str, routes: RoutingTableReader, host: Host
    ) -> None:
        self._tenant = tenant
        self._worker_id = worker_id
        self._routes = routes
        self._host = host
        self.bus = ForwardBus(address, self.serve)

    def tenant_of(self, namespace: str) -> str | None:
        """The tenant holding ``namespace``, for a Subscribe this worker cannot serve."""
        entry = self._routes.current().namespaces.get(namespace)
        if entry is None:
            return None
        if entry.abstraction != "pubsub":
            raise FailedPrecondition(
                f"namespace {namespace!r} is a {entry.abstraction} namespace, not pubsub"
            )
        if entry.tenant == self._tenant:
            raise Unavailable(f"namespace {namespace!r} is being opened; retry")
        return entry.tenant

    def forward_now(self, call: Call, request: Any, answered: Answered) -> bool:
        """Send a unary call for another tenant's namespace to its owner
        without waiting (``prism.rpc.settings.ForwardNow``): what ``forward``
        does on its first attempt, with ``answered`` called back. False
        wherever ``forward`` would do more than send and wait (a namespace
        held here, unknown, of another abstraction, no owner serving yet):
        the handler's path does that."""
        namespace = getattr(request, "namespace", None)
        if type(namespace) is not str or call.forwarded:
            return False
        routes = self._routes.current()
        entry = routes.namespaces.get(namespace)
        if entry is None:
            return False
        wanted = ABSTRACTION_OF_SERVICE.get(call.path.split(b"/", 2)[1])
        if wanted is not None and entry.abstraction != wanted:
            return False
        owners = routes.owners(namespace)
        if any(w.id == self._worker_id for w in owners):
            return False
        metadata = call.metadata
        if call.caller is not None:
            metadata = [entry for entry in metadata if entry[0] != "authorization"]  # (see forward)
        deadline = call.deadline
        span = None
        if tracing.makers:  # (tracing off: this one test)
            span, metadata = tracing.forwarding(metadata, namespace)
            if span is not None:
                answered = _ending(span, answered)

        def settle(answer: ForwardAnswer | None) -> None:
            if answer is None:
                if trio.current_time() >= deadline:
                    answered(None, DeadlineExceeded("deadline exceeded"))
                else:
                    answered(None, Unavailable(f"the owning worker of {namespace!r} did not answer; retry"))
            elif answer.status == StatusCode.OK:
                answered(answer.payload, None)
            elif answer.moved:
                # The owner let the namespace go: refresh the table and try
                # once more, as ``forward`` does (in a task: that may wait).
                assert self.bus.nursery is not None
                self.bus.nursery.start_soon(self._once_more, namespace, call, answered)
            else:
                answered(None, RemoteStatus(answer.status, answer.message, answer.pushback_ms))

        payload = bytes(call.messages[0])
        if not self.bus.post(owners, call.path, payload, metadata, deadline, call.caller, settle):
            tracing.end(span)
            return False
        call.namespace = namespace
        metrics.forwarded(namespace, call.path.rsplit(b"/", 1)[-1].decode())
        return True

    async def _once_more(self, namespace: str, call: Call, answered: Answered) -> None:
        """``forward_now``'s second attempt, after a moved answer."""
        payload: bytes | None = None
        error: Exception | None = None
        with trio.move_on_at(call.deadline):
            try:
                await self._host.apply_routes()
                payload = await self.forward(namespace, call, first_attempt=2)
                if payload is None:
                    error = NotFound(f"unknown namespace {namespace!r}")
            except Exception as exc:
                error = exc
        if payload is None and error is None:
            error = DeadlineExceeded("deadline exceeded")
        answered(payload, error)
        error = None  # (this frame in the exception's traceback, holding it: a reference cycle)

    async def forward(self, namespace: str, call: CallContext, *, first_attempt: int = 1) -> bytes | None:
        """The answer to a call for ``namespace``, which this process does not
        hold; None if no tenant holds it. (``first_attempt`` 2: the table was
        just refreshed after a moved answer.)"""
        for attempt in range(first_attempt, 3):
            routes = self._routes.current()
            entry = routes.namespaces.get(namespace)
            if entry is None:
                return None
            wanted = ABSTRACTION_OF_SERVICE.get(call.path.split(b"/", 2)[1])
            if wanted is not None and entry.abstraction != wanted:
                raise FailedPrecondition(
                    f"namespace {namespace!r} is a {entry.abstraction} namespace, not {wanted}"
                )
            owners = routes.owners(namespace)
            if any(w.id == self._worker_id for w in owners):
                return await self._run_when_open(namespace, call)
            if call.forwarded:
                # The sender's table still names us; ours may be older still.
                if attempt == 1 and self._routes.generation() != self._host.generation:
                    await self._host.apply_routes()
                    continue
                raise Moved(
                    StatusCode.UNAVAILABLE,
                    f"namespace moved while the call was forwarded: {namespace!r}; retry",
                )
            if not any(w.serving for w in owners):
                owners = await self._serving_owners(namespace, call.deadline)
            metrics.forwarded(namespace, call.path.rsplit(b"/", 1)[-1].decode())
            metadata = call.metadata
            if call.caller is not None:
                # Checked here: the owner trusts the caller, not the token, so
                # the token stays in this process.
                metadata = [entry for entry in metadata if entry[0] != "authorization"]
            span, metadata = tracing.forwarding(metadata, namespace)
            error: BaseException | None = None
            try:
                return await self.bus.forward(
                    owners, call.path, bytes(call.messages[0]), metadata, call.deadline, call.caller
                )
            except Moved as exc:
                error = exc
                # The owner we picked had already let the namespace go (a
                # reload moved it): our table is older than its; refresh, once.
                if attempt == 2:
                    raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                tracing.end(span, error)
                error = None  # (this frame in the exception's traceback, holding it: a reference cycle)
            await self._host.apply_routes()
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _serving_owners(self, namespace: str, deadline: float) -> list[WorkerEntry]:
        """The owners of ``namespace`` once one of them serves (the routing
        table says so), waiting at most ``OWNER_WAIT_S`` and not past ``deadline``."""
        give_up = min(deadline, trio.current_time() + OWNER_WAIT_S)
        with trio.move_on_at(give_up):
            while True:
                owners = self._routes.current().owners(namespace)
                if not owners or any(w.serving for w in owners):
                    return owners
                await trio.sleep(_OWNER_POLL_S)
        if trio.current_time() >= deadline:
            raise DeadlineExceeded("deadline exceeded")
        entry = self._routes.current().namespaces.get(namespace)
        tenant = entry.tenant if entry is not None else "?"
        raise Unavailable(f"no worker of tenant {tenant!r} is serving (waited {OWNER_WAIT_S:g} s); retry")

    async def _run_when_open(self, namespace: str, call: CallContext) -> bytes:
        local = self._host.app
        with trio.move_on_after(OPEN_WAIT_S):
            while not local.holds(namespace):
                await self._host.apply_routes()
                down = local.unreachable(namespace)
                if down is not None:
                    raise Unavailable(f"namespace {namespace!r}: backend unreachable, retrying: {down}")
                if not local.holds(namespace):
                    await trio.sleep(_OPEN_POLL_S)
        if not local.holds(namespace):
            raise Unavailable(f"namespace {namespace!r} is being opened; retry")
        method = local.settings.methods.get(call.path)
        assert method is not None  # the call got here through this method
        return await method.invoke(method.decode(call.messages[0]), call)

    async def serve(self, request: ForwardCall) -> ForwardAnswer:
        """Run a call another worker forwarded here, as a connection would
        (a shared-cache hit answered at once, the same error boundary), and
        observe it."""
        settings = self._host.app.settings
        method = settings.methods.get(request.path)
        if method is None or method.kind != UNARY:
            return ForwardAnswer(request.id, StatusCode.UNIMPLEMENTED, "method cannot be forwarded", b"")
        call = ForwardedCall(request)
        # Traced (when on) as a client's call is: its span continues the
        # sender's forwarding span, named by the forwarded traceparent.
        token = None if settings.tracing is None else settings.tracing.enter(call, request.peer)
        try:
            answer = await _run(method, call, request.id, settings)
            observer = settings.observer
            if observer is not None:
                observer(call, method, StatusCode(answer.status), time.perf_counter() - call.started)
        finally:
            if token is not None:
                tracing.current.reset(token)
        return answer


def _ending(span: Any, answered: Answered) -> Answered:
    """``answered``, ending the forwarding ``span`` first."""

    def ended(payload: bytes | None, error: Exception | None) -> None:
        tracing.end(span, error)
        answered(payload, error)

    return ended


async def _run(method: Method, call: ForwardedCall, call_id: int, settings: ServerSettings) -> ForwardAnswer:
    # A deadline that passed on the way here: no handler runs (as on a
    # connection), not even the shared cache's answer, which has no checkpoint
    # for the cancel scope below to stop it at.
    if call.deadline <= trio.current_time():
        return ForwardAnswer(call_id, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", b"")
    with trio.CancelScope(deadline=call.deadline):
        try:
            request: Any = method.decode(call.messages[0])
            security = settings.security
            if security.secured and method.action is not None:
                security.check_caller(call.caller, method, request.namespace, forwarded=True)
            # The owner is where quotas hold (prism.limits.quota says why).
            lease = None
            if method.action is not None:
                lease = settings.admission.admit(request.namespace, settings.inflight, trio.current_time())
            try:
                payload = method.answer_now(request, call)
                if payload is None:
                    payload = await method.invoke(request, call)
            finally:
                if lease is not None:
                    lease.release()
        except Moved as exc:
            return ForwardAnswer(call_id, exc.grpc_status, str(exc), b"", moved=True)
        except Exception as exc:
            status, message = failure_status(exc, method)
            return ForwardAnswer(call_id, status, message, b"", pushback_ms=getattr(exc, "pushback_ms", -1))
        return ForwardAnswer(call_id, StatusCode.OK, "", payload)
    return ForwardAnswer(call_id, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", b"")
