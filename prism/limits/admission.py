"""The admission check every call path makes before a data call's handler runs.

``Admission.admit`` is called by ``prism.rpc.calls`` (calls on a connection,
answered at once or by a task) and ``prism.router.remote`` (calls another
worker forwarded here), with the call's namespace. It answers at once for a
namespace this worker does not hold (the call is forwarded, and its owner
decides: limits are per worker, see ``prism.limits.quota``); otherwise it
refuses the call while the worker sheds (``prism.limits.shed``) or while a
quota of the namespace or its tenant is spent, raising ``QuotaExceeded``
(counted in ``prism_calls_limited_total`` by namespace and reason), or
returns the call's ``Lease`` (None without limits) for the caller to release
when the call ends.
"""

from __future__ import annotations

from collections.abc import Container

from prism import metrics
from prism.limits.quota import Lease, QuotaExceeded, Quotas
from prism.limits.shed import SHEDDER, Shedder


class Admission:
    """A worker's quotas and shedder, and which namespaces it holds."""

    __slots__ = ("local", "quotas", "shedder")

    def __init__(self, shedder: Shedder = SHEDDER) -> None:
        self.quotas = Quotas()
        self.shedder = shedder
        # The namespaces this worker serves (the App's table); anything else
        # is forwarded, and admitted by its owner.
        self.local: Container[str] = ()

    def admit(
        self, namespace: str, inflight: int, now: float, *, shed: bool = True, waited: float = 0.0
    ) -> Lease | None:
        """The call's lease, or ``QuotaExceeded`` (see the module docstring).
        ``shed=False``: the call queues for nothing (a shared-cache hit);
        ``waited``: how long the call has waited since it reached the machine."""
        if namespace not in self.local:
            return None
        shedder = self.shedder
        if shed and shedder.enabled and shedder.refuses(inflight, now, waited):
            metrics.call_limited(namespace, "overload")
            raise QuotaExceeded(
                f"worker overloaded: queueing delay above {shedder.target_s * 1000:g} ms; retry",
                shedder.pushback_ms,
                namespace,
                "overload",
            )
        if not self.quotas.active:
            return None
        lease = self.quotas.by_namespace.get(namespace)
        if lease is None:
            return None
        try:
            return lease.admit(namespace, now)
        except QuotaExceeded as exc:
            metrics.call_limited(namespace, exc.reason)
            raise
