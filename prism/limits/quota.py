"""Quotas: token-bucket rates and concurrency caps, per namespace and per tenant.

A namespace's ``limits`` and its tenant's ``limits`` (``prism.config.quotas``)
are each a ``Limit``: a token bucket (``rps`` tokens a second, at most
``burst`` kept) and a count of calls in flight against ``concurrency``. A
call takes a token from and holds a place in both, or is refused with
``QuotaExceeded`` (RESOURCE_EXHAUSTED, the limit named, and a pushback: the
milliseconds until a token will be there, which the server sends as the
``grpc-retry-pushback-ms`` trailer of gRPC's retry design A6).

Where: in the worker that owns the namespace, at the one admission point of
each call path (``prism.rpc.calls`` for calls on a connection, answered at
once or by a task; ``prism.router.remote`` for forwarded ones). Limits are
per worker, so only the owner's count means anything; a front worker that
forwards a call does not know the owner's buckets, and counting there too
would charge a forwarded call twice. The front worker's ``Quotas`` has no
entry for a namespace it does not hold, which admits at the cost of a dict
lookup.

Cost: a worker with no limits configured has an empty ``Quotas``, which the
call paths test (``quotas.active``) before anything else; with limits, a
call pays a dict lookup, a refill (a subtraction, a multiply, a ``min``) and
two counter updates per ``Limit``.

Time comes from the caller (trio's clock in the server), so tests drive the
refill with ``trio.testing.MockClock``. A reload (``Quotas.apply``) updates
the ``Limit`` objects in place: the tokens left and the calls in flight
carry over, so a reload neither resets a bucket nor forgets who holds a place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

from prism.config.quotas import LimitsConfig
from prism.errors import ResourceExhausted

# A place under ``concurrency`` frees when some call ends, which nobody can
# tell in advance: the pushback is a short guess.
CONCURRENCY_PUSHBACK_MS: Final = 10
_INF: Final = math.inf


class QuotaExceeded(ResourceExhausted):
    """A call refused by a quota or by overload shedding, with the
    milliseconds a client should wait before retrying and the metric reason."""

    def __init__(self, message: str, pushback_ms: int, namespace: str, reason: str) -> None:
        super().__init__(message)
        self.pushback_ms = pushback_ms
        self.namespace = namespace
        self.reason = reason


class Limit:
    """One ``limits`` table: of a namespace (``kind = "namespace"``) or a tenant."""

    __slots__ = ("_messages", "burst", "cap", "inflight", "kind", "name", "rate", "stamp", "tokens")

    def __init__(self, kind: str, name: str, limits: LimitsConfig, now: float) -> None:
        self.kind = kind
        self.name = name
        self.inflight = 0
        self.rate = 0.0
        self.burst = 0.0
        self.cap = 0
        self.tokens = 0.0
        self.stamp = now
        self.set(limits, now, fresh=True)

    def set(self, limits: LimitsConfig, now: float, *, fresh: bool = False) -> None:
        """Take ``limits``; a bucket keeps its tokens (up to its new size)."""
        self.refill(now)
        self.rate = limits.rps if limits.rps is not None else math.inf
        burst = limits.burst if limits.burst is not None else max(1.0, self.rate)
        self.burst = float(burst) if limits.rps is not None else math.inf
        self.tokens = self.burst if fresh else min(self.tokens, self.burst)
        self.cap = limits.concurrency if limits.concurrency is not None else 2**62
        # A flood is refused thousands of times a second: its words are made once.
        self._messages = (
            f'{self.kind} "{self.name}": concurrency limit {self.cap} exceeded',
            f'{self.kind} "{self.name}": rps limit {self.rate:g} exceeded',
        )

    def refill(self, now: float) -> None:
        if self.rate != math.inf:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def refusal(self, now: float) -> QuotaExceeded | None:
        """Why a call may not start now (nothing taken), or None."""
        why = self.shortfall(now, 0)
        return None if why is None else QuotaExceeded(why[0], why[1], "", why[2])

    def shortfall(self, now: float, ahead: int) -> tuple[str, int, str] | None:
        """Why a call may not start now behind ``ahead`` calls let in and not
        yet started (nothing taken): its message, pushback and reason; or None."""
        if self.inflight + ahead >= self.cap:
            return (
                self._messages[0],
                CONCURRENCY_PUSHBACK_MS,
                "concurrency" if self.kind == "namespace" else "tenant_concurrency",
            )
        if self.rate == math.inf:
            return None
        self.refill(now)
        if self.tokens - ahead >= 1.0:
            return None
        wait_ms = max(1, math.ceil((1.0 + ahead - self.tokens) / self.rate * 1000.0))
        return self._messages[1], wait_ms, "rps" if self.kind == "namespace" else "tenant_rps"


def _refused(limit: Limit, now: float, namespace: str) -> QuotaExceeded:
    refusal = limit.refusal(now)
    assert refusal is not None
    refusal.namespace = namespace
    return refusal


class Lease:
    """A call's places under its limits, given back by ``release`` when it ends."""

    __slots__ = ("limits",)

    def __init__(self, limits: tuple[Limit, ...]) -> None:
        self.limits = limits

    def admit(self, namespace: str, now: float) -> Lease:
        """Take a token from and a place in every limit, or raise ``QuotaExceeded``
        (taking nothing)."""
        for limit in self.limits:
            # ``refusal``'s checks, inlined: this runs on every limited call.
            if limit.inflight >= limit.cap:
                break
            rate = limit.rate
            if rate != _INF:
                tokens = limit.tokens + (now - limit.stamp) * rate
                limit.tokens = tokens if tokens < limit.burst else limit.burst
                limit.stamp = now
                if limit.tokens < 1.0:
                    break
        else:
            for limit in self.limits:
                limit.tokens -= 1.0
                limit.inflight += 1
            return self
        # Raised as made, never held in a local: a frame holding the exception
        # its own traceback holds is a reference cycle, and a flood refused
        # thousands of times a second left ~12,000 objects for the garbage
        # collector per 10,000 allocations, in collections of 10-57 ms that
        # stalled every call of the worker (the neighbour's p99).
        raise _refused(limit, now, namespace)

    def verdict(self, now: float, ahead: dict[Limit, int]) -> tuple[str, int, str] | None:
        """Whether ``admit`` would refuse a call now, behind the calls of
        ``ahead`` (per limit: let in, not admitted yet): its message, pushback
        and reason, or None, the call then counted in ``ahead``. Nothing taken."""
        for limit in self.limits:
            why = limit.shortfall(now, ahead.get(limit, 0))
            if why is not None:
                return why
        for limit in self.limits:
            ahead[limit] = ahead.get(limit, 0) + 1
        return None

    def release(self) -> None:
        for limit in self.limits:
            limit.inflight -= 1

    def refund(self) -> None:
        """Give back the tokens ``admit`` took (a call that another path will admit again)."""
        for limit in self.limits:
            limit.tokens += 1.0


class Quotas:
    """Namespace -> its ``Lease`` (its own limit and its tenant's), for the
    namespaces of this worker that have any limit."""

    def __init__(self) -> None:
        self.by_namespace: dict[str, Lease] = {}
        self.active = False  # any limit at all: the call paths test only this when not
        self._namespaces: dict[str, Limit] = {}
        self._tenant: Limit | None = None

    def apply(
        self,
        tenant: str,
        tenant_limits: LimitsConfig | None,
        namespaces: Mapping[str, LimitsConfig | None] | Iterable[tuple[str, LimitsConfig | None]],
        now: float,
    ) -> None:
        """Hold ``namespaces`` (name -> its limits) of ``tenant`` to these limits from now on."""
        pairs = namespaces.items() if isinstance(namespaces, Mapping) else namespaces
        if tenant_limits is None or tenant_limits.unlimited:
            self._tenant = None
        elif self._tenant is not None and self._tenant.name == tenant:
            self._tenant.set(tenant_limits, now)
        else:
            self._tenant = Limit("tenant", tenant, tenant_limits, now)
        kept: dict[str, Limit] = {}
        leases: dict[str, Lease] = {}
        for name, limits in pairs:
            own: Limit | None = None
            if limits is not None and not limits.unlimited:
                own = self._namespaces.get(name)
                if own is None:
                    own = Limit("namespace", name, limits, now)
                else:
                    own.set(limits, now)
                kept[name] = own
            chain = tuple(x for x in (own, self._tenant) if x is not None)
            if chain:
                leases[name] = Lease(chain)
        self._namespaces = kept
        self.by_namespace = leases
        self.active = bool(leases)
