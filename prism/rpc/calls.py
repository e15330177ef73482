"""A connection's calls: from a request's start to its answer.

``Calls`` is ``prism.rpc.server.Connection``'s half that runs calls: it
starts each call's handler (a task, or none for an answer that needs no
waiting), holds it to its deadline and to ``max_inflight``, runs the access
check, and turns the outcome into the answer and its status. The other half,
the connection's reader, writer and timers, is ``Connection``'s.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from prism import metrics
from prism.errors import DeadlineExceeded, PrismError, ResourceExhausted, StatusCode
from prism.limits import Lease, QuotaExceeded
from prism.rpc import peek, streams
from prism.rpc.boundary import failure_status, pushback_trailer, refusal_trailers, shed_trailers
from prism.rpc.call import Call
from prism.rpc.methods import CLIENT_STREAM, SEND_HEADERS, UNARY, Method
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.settings import ServerSettings
from prism.security.identity import PeerIdentity

# An enum member read from its class is an attribute lookup through the enum
# machinery, several times a dict lookup's cost: the unary path reads this.
_OK = StatusCode.OK
# ``Calls._admit``'s answer for a call it refused (else: the call's quota lease, or None).
_REFUSED: Any = object()


class Calls:
    """The calls of one connection (see the module docstring)."""

    settings: ServerSettings
    proto: GrpcProtocol
    identity: PeerIdentity
    peer_principal: str | None
    opened: int  # streams the peer has opened so far (prism.rpc.keepalive)
    _nursery: trio.Nursery | None
    _scopes: dict[int, trio.CancelScope]
    _now: Callable[[], float]
    _window_lot: trio.lowlevel.ParkingLot | None
    _input_lot: trio.lowlevel.ParkingLot | None
    ended = False  # the connection is over (set by Connection.serve): late answers are dropped
    shed_counts: dict[str, int]  # operation -> calls refused at the door in the read being taken in
    # Calls a quota refused (not the shedder) so far: a read with such a call
    # rests its connection (Connection._took).
    limited = 0
    let_in = 0  # calls of the read being taken in that the door let in
    # Of the read being taken in: the calls let in per limit, and those a
    # quota refused as they were read, per (namespace, operation, reason).
    quota_ahead: dict[Any, int]
    quota_counts: dict[tuple[str, str, str], int]
    peeked: list[Any] | None = None  # the read's frames ``first_data`` maps
    first_data: dict[int, Any]

    def wake(self) -> None:
        raise NotImplementedError  # prism.rpc.writing: the writer flushes

    def _maybe_close(self) -> None:
        raise NotImplementedError  # Connection's

    def _on_start(self, call: Call) -> None:
        self.opened += 1
        if call.timeout_s is not None:
            call.deadline = call.opened + call.timeout_s
        method = self.settings.methods.get(call.path)
        if method is None:
            self.proto.send_error(
                call, StatusCode.UNIMPLEMENTED, f"unknown method {call.path.decode('latin-1')}"
            )
            return
        if method.kind == CLIENT_STREAM:
            # Its handler starts now, before the request is complete.
            if self._admit(call, method) is _REFUSED:
                return
            assert self._nursery is not None
            self._nursery.start_soon(
                self._run_streaming, call, method, streams.requests(self.proto, call, method, self._inputs())
            )

    def _on_message(self, call: Call) -> None:
        if call._inq is None and len(call.messages) > 1:
            self.proto.send_error(
                call, StatusCode.INVALID_ARGUMENT, "a unary request must carry exactly one message"
            )

    def _on_end(self, call: Call) -> None:
        call.started = time.perf_counter()
        if call._inq is not None:
            return  # its handler reads on to the end (streams.requests)
        method = self.settings.methods.get(call.path)
        if method is None:
            return
        if len(call.messages) != 1:
            self.proto.send_error(
                call,
                StatusCode.INVALID_ARGUMENT,
                f"a unary request must carry exactly one message, got {len(call.messages)}",
            )
            return
        if method.kind == UNARY:
            if method.now is not None and self._answer_now(call, method):
                return
            if self.settings.forward_now is not None and self._forward_now(call, method):
                return
        lease = self._admit(call, method)
        if lease is _REFUSED:
            return
        assert self._nursery is not None
        if method.kind == UNARY:
            self._nursery.start_soon(self._run_unary, call, method, lease)
        else:
            self._nursery.start_soon(self._run_streaming, call, method, None, lease)

    def _admit(self, call: Call, method: Method) -> Lease | None:
        """Whether the call's handler may run: its deadline has not passed
        already, the worker is under ``max_inflight``, and the namespace's
        quotas and the overload shedder (``prism.limits``) let it; else it is
        answered here (``_REFUSED``). Admitted, it counts in flight until its
        task ends, and holds its quota lease (None without limits) until then."""
        settings = self.settings
        lease = None
        try:
            if call.timeout_s is not None and call.deadline <= self._now():
                raise DeadlineExceeded("deadline exceeded")
            if settings.inflight >= settings.max_inflight:
                metrics.call_refused("max_inflight")
                raise ResourceExhausted("too many calls in flight on this worker")
            if method.action is not None and call._inq is None:  # a data call with one request
                lease = self._limit(call, method)
        except PrismError as refusal:
            self._answer_failure(call, method, refusal)
            if self.proto.draining:
                self._maybe_close()
            return _REFUSED  # type: ignore[no-any-return]
        settings.inflight += 1
        return lease

    def _shed_new(self, headers: Any) -> tuple[tuple[bytes, bytes], ...] | None:
        """``GrpcProtocol.shed`` while shedding is enabled: the refusal of a
        new data call, as its HEADERS are read, while the worker sheds; None
        to serve it. Refused there, a call costs its frames and its answer:
        about a third of what a refusal made through a Call did, which is
        what lets shedding relieve a worker busy on its CPU. The namespace is
        not read yet: the refusal is counted under namespace "". A
        shared-cache hit is refused too (it cannot be told from a miss yet)."""
        settings = self.settings
        shedder = settings.admission.shedder
        now = trio.current_time()
        # In flight: those running, and those of this read let in before it
        # (they start once the read is taken in; Connection._dispatch).
        let_in = self.let_in
        if not shedder.refuses(settings.unary_inflight + let_in, now, now - self.proto.arrived, let_in):
            self.let_in = let_in + 1
            return None
        operation = settings.methods.data_operation(headers)
        if operation is None:
            return None  # not a data call (health, reflection): served
        counts = self.shed_counts  # (counted in /metrics once a read: Connection._dispatch)
        counts[operation] = counts.get(operation, 0) + 1
        return shed_trailers(shedder.target_s, shedder.pushback_ms)

    def _admit_read(self, n: int) -> bool:
        """``GrpcProtocol.admit_read``: all ``n`` new calls of the read let in
        at once (``Shedder.admits_all``; none was before them), else each judged."""
        now = trio.current_time()
        shedder, inflight = self.settings.admission.shedder, self.settings.unary_inflight
        if self.let_in or not shedder.admits_all(inflight, n, now, now - self.proto.arrived):
            return False
        self.let_in = n
        return True

    def _limit_new(self, headers: Any, plain: list[Any], at: int) -> tuple[tuple[bytes, bytes], ...] | None:
        """``GrpcProtocol.limit`` while this worker has quotas: the refusal of
        a new unary data call by its namespace's or tenant's quota, as its
        frames are read (its request came whole in the read: ``prism.rpc.peek``);
        None to go on, the call's own path then holding it to its quotas.
        Refused here, a call costs what the door's refusal does, a quarter of
        one through its Call. Only on a connection a quota has refused before;
        not while calls are checked for access (that comes first) or traced
        (each is logged). Set on the connection by its first refusal, a Call's
        (``_answer_failure``): the others do not call it at all."""
        settings = self.settings
        quotas = settings.admission.quotas
        if not quotas.active or settings.security.secured or settings.tracing is not None:
            return None
        if plain is not self.peeked:  # (a read's frames, mapped once)
            self.peeked, self.first_data = plain, peek.first_data(plain)
        entry = self.first_data.get(plain[at][1])
        namespace = peek.namespace(entry) if entry is not None else None
        if namespace is None or (lease := quotas.by_namespace.get(namespace)) is None:
            return None
        for name, value in headers:
            if name == b":path":
                method = settings.methods.get(bytes(value))
                break
        else:
            return None
        if method is None or method.action is None or method.kind != UNARY:
            return None
        verdict = lease.verdict(trio.current_time(), self.quota_ahead)
        if verdict is None:
            return None
        message, pushback_ms, reason = verdict
        key = (namespace, method.operation, reason)
        self.quota_counts[key] = self.quota_counts.get(key, 0) + 1  # (counted once a read)
        self.limited += 1
        settings.admission.shedder.limited += 1
        return refusal_trailers(message, pushback_ms)

    def _limit(self, call: Call, method: Method) -> Lease | None:
        """The quota and shedding check (``prism.limits.admission``) of a
        call about to get a task; its request is decoded here for its
        namespace (and kept for the handler)."""
        if call.request is None:
            try:
                call.request = method.decode(call.messages[0])
            except Exception:
                return None  # the handler's path answers with the decoding error
        settings = self.settings
        now = trio.current_time()
        namespace = call.request.namespace
        # A call the door judged is not judged again (refused here, through
        # its Call, a call cost over twice what the door's refusal did).
        return settings.admission.admit(
            namespace, settings.unary_inflight, now, shed=not call.judged, waited=now - call.opened
        )

    def _answer_now(self, call: Call, method: Method) -> bool:
        """Answer a unary call whose answer needs no waiting (``Method.now``)
        here, in the reader's step, without a task, a cancel scope or a
        coroutine: a task per call was a tenth of a shared-cache hit's CPU.
        A call the access check refuses, or whose deadline has passed, is
        answered here too. It holds nothing, so ``max_inflight`` does not count it."""
        try:
            call.request = method.decode(call.messages[0])
        except Exception:
            return False  # the handler's path answers with the decoding error
        try:
            if call.timeout_s is not None and call.deadline <= self._now():
                raise DeadlineExceeded("deadline exceeded")
            if self.settings.security.secured:
                self._authorize(call, method, call.request)
            admission = self.settings.admission
            lease = None
            if admission.quotas.active:
                lease = admission.admit(call.request.namespace, 0, trio.current_time(), shed=False)
        except PrismError as exc:
            self._answer_failure(call, method, exc)
        else:
            answer = method.answer_now(call.request, call)
            if lease is not None:
                lease.release()
                if answer is None:
                    lease.refund()  # the handler's path takes it again
            if answer is None:
                return False
            self.proto.send_unary(call, answer)
            self._observe(call, method, _OK)
        if self.proto.draining:
            self._maybe_close()
        return True

    def _forward_now(self, call: Call, method: Method) -> bool:
        """Send a unary call for another tenant's namespace to its owner
        here, in the reader's step, and answer it when the owner's answer
        comes back (``_forwarded``), without a task, a cancel scope or an
        event to wait on: a forwarded call cost 1.7x a local one, its front
        worker more than the whole local call. False: the handler's path."""
        settings = self.settings
        request = call.request
        if request is None:
            try:
                request = call.request = method.decode(call.messages[0])
            except Exception:
                return False  # the handler's path answers with the decoding error
        namespace = getattr(request, "namespace", None)
        if type(namespace) is not str or settings.holds(namespace):
            return False  # a local call (the common case: two lookups, then the handler's path)
        if settings.inflight >= settings.max_inflight or (
            call.timeout_s is not None and call.deadline <= self._now()
        ):
            return False  # refused on the handler's path, as any call
        if settings.security.secured and call.caller is None:
            try:
                self._authorize(call, method, request)
            except PrismError as exc:  # refused (and audited) once, here
                self._answer_failure(call, method, exc)
                if self.proto.draining:
                    self._maybe_close()
                return True
        assert settings.forward_now is not None
        if not settings.forward_now(call, request, lambda p, e: self._forwarded(call, method, p, e)):
            return False
        settings.inflight += 1
        return True

    def _forwarded(self, call: Call, method: Method, payload: bytes | None, error: Exception | None) -> None:
        """The owner's answer to a call ``_forward_now`` sent."""
        settings = self.settings
        settings.inflight -= 1
        if self.ended or call.done:
            return  # the connection or the stream went meanwhile
        proto = self.proto
        if error is not None or payload is None:
            self._answer_failure(call, method, error or AssertionError("no answer and no error"))
        else:
            proto.release_request(call)
            proto.send_unary(call, payload)
            self._observe(call, method, _OK)
        self.wake()
        if proto.draining or proto.peer_gone:
            self._maybe_close()

    def _on_reset(self, call: Call) -> None:
        scope = self._scopes.get(call.stream_id)
        if scope is not None:
            scope.cancel()

    async def _run_unary(self, call: Call, method: Method, lease: Lease | None) -> None:
        sid = call.stream_id
        proto = self.proto
        # Its sojourn: from when its bytes reached the machine to this first
        # step (the kernel's buffers and the event loop's queue, prism.limits.shed).
        self.settings.admission.shedder.observe_sojourn(trio.current_time() - call.opened)
        try:
            with trio.CancelScope(deadline=call.deadline) as scope:
                self._scopes[sid] = scope
                request = call.request if call.request is not None else method.decode(call.messages[0])
                if self.settings.security.secured and call.caller is None:  # else _answer_now checked it
                    self._authorize(call, method, request)
                answer = await method.invoke(request, call)
                proto.release_request(call)
                proto.send_unary(call, answer)
                status = _OK
            if scope.cancelled_caught:
                status = StatusCode.DEADLINE_EXCEEDED if not call.done else StatusCode.CANCELLED
                proto.send_error(call, status, "deadline exceeded")
            self._observe(call, method, status)
        except Exception as exc:
            self._answer_failure(call, method, exc)
        finally:
            self._task_ended(sid, lease)

    async def _run_streaming(
        self, call: Call, method: Method, requests: AsyncIterator[Any] | None, lease: Lease | None = None
    ) -> None:
        sid = call.stream_id
        proto = self.proto
        self.settings.streams_open += 1
        try:
            with trio.CancelScope(deadline=call.deadline) as scope:
                self._scopes[sid] = scope
                if requests is None:
                    arg: Any = call.request if call.request is not None else method.decode(call.messages[0])
                    if self.settings.security.secured:
                        self._authorize(call, method, arg)
                else:
                    arg = requests
                responses: AsyncIterator[Any] = method.handler(arg, call)
                # Closed here, not by the garbage collector, whatever ends the
                # call: a handler's ``finally``/``async with`` (a PubSub
                # subscription giving back unacked messages) runs in this task.
                async with contextlib.aclosing(responses):  # type: ignore[type-var]
                    async for response in responses:
                        if response is SEND_HEADERS:
                            proto.send_headers(call)
                            self.wake()
                            continue
                        proto.send_message(call, response.SerializeToString())
                        self.wake()
                        await streams.wait_for_room(self.proto, call, self._windows())
                proto.send_status(call, StatusCode.OK)
                self._observe(call, method, _OK)
            if scope.cancelled_caught:
                proto.send_error(call, StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception as exc:
            self._answer_failure(call, method, exc)
        finally:
            self.settings.streams_open -= 1
            self._task_ended(sid, lease)

    def _task_ended(self, sid: int, lease: Lease | None) -> None:
        """What every call task does last: let go of what it held, flush."""
        del self._scopes[sid]
        self.settings.inflight -= 1
        if lease is not None:
            lease.release()
        self.wake()
        if self.proto.draining or self.proto.peer_gone:
            self._maybe_close()

    def _windows(self) -> trio.lowlevel.ParkingLot:
        if self._window_lot is None:
            self._window_lot = trio.lowlevel.ParkingLot()
        return self._window_lot

    def _inputs(self) -> trio.lowlevel.ParkingLot:
        if self._input_lot is None:
            self._input_lot = trio.lowlevel.ParkingLot()
        return self._input_lot

    def _authorize(self, call: Call, method: Method, request: Any) -> None:
        """The access check (``prism.security.runtime``) of a call on this connection,
        every call path's: sets ``call.caller``, or raises Unauthenticated or PermissionDenied."""
        if method.action is not None:  # else open to every caller
            call.caller = self.settings.security.check_call(
                call, method, request.namespace, self.identity, self.peer_principal
            )

    def _answer_failure(self, call: Call, method: Method, exc: Exception) -> None:
        status, message = failure_status(exc, method)
        pushback_ms = getattr(exc, "pushback_ms", None)  # QuotaExceeded's, or a forwarded one's
        if type(exc) is QuotaExceeded and exc.reason != "overload":
            self.limited += 1
            self.settings.admission.shedder.limited += 1
            self.proto.limit = self._limit_new  # (from now on: a connection unrefused pays no call)
        if pushback_ms is not None and pushback_ms >= 0:
            self.proto.send_error(call, status, message, pushback_trailer(pushback_ms))
        else:
            self.proto.send_error(call, status, message)
        self._observe(call, method, status)

    def _observe(self, call: Call, method: Method, status: StatusCode) -> None:
        observer = self.settings.observer
        if observer is not None:
            observer(call, method, status, time.perf_counter() - call.started)
