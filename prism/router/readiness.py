"""When the gateway is ready: one definition for ``Health.Check("")``,
systemd's READY=1 and the admin ``/readyz``.

The gateway is ready when every configured namespace has at least one
serving worker of its tenant in the routing table (``WorkerEntry.serving``:
heartbeating on a routing generation). Then any call, on any worker, for any
namespace reaches a process that holds it, locally or forwarded, instead of
"no worker of the owning tenant is serving".

Readiness is about workers, not backends. A namespace whose remote backend
(PostgreSQL, Redis, NATS) is down, at boot or later, does not make the
gateway unready: its worker serves, the namespace's own health
(``Check("<namespace>")``) is NOT_SERVING and its calls answer UNAVAILABLE
while the worker retries the backend. One tenant's database must not take
every other tenant out of a load balancer's rotation.

Readiness is the gateway's boot, then its life: once a table was ready, the
tables after it say so (``Routes.ready_once``), and the gateway stays ready
while any worker serves. A tenant whose workers restart (or crash in a loop)
has its namespaces' own health NOT_SERVING and its calls wait for its
workers or fail UNAVAILABLE; the other tenants stay in rotation. Before,
one tenant's crashing worker took every tenant's host out of a load
balancer's rotation for as long as it took to restart.

All three readers compute it from the same published table, so they flip
together: the supervisor right after it publishes a generation, the admin
process and the workers whenever they read the table.
"""

from __future__ import annotations

from prism.router.table import Routes

__all__ = ["Readiness", "not_ready_reason"]


def not_ready_reason(routes: Routes) -> str | None:
    """Why ``routes`` is not ready (one line), or None when every namespace
    has a serving worker (and, with no namespaces, some worker serves), or
    once an earlier table was ready, some worker serves."""
    serving = {w.tenant for w in routes.workers.values() if w.serving}
    if not serving:
        total = len(routes.workers)
        if total == 0:
            return f"no workers in routing table generation {routes.generation}"
        return f"0 of {total} workers serving"
    if routes.ready_once:
        return None
    waiting: dict[str, int] = {}
    for entry in routes.namespaces.values():
        if entry.tenant not in serving:
            waiting[entry.tenant] = waiting.get(entry.tenant, 0) + 1
    if not waiting:
        return None
    count = sum(waiting.values())
    tenants = ", ".join(repr(t) for t in sorted(waiting))
    return f"{count} namespace(s) have no serving worker yet (tenant {tenants})"


class Readiness:
    """``not_ready_reason`` of the newest table, computed once per generation
    (a table of 10,000 namespaces is walked once, not on every Check)."""

    __slots__ = ("_generation", "_reason")

    def __init__(self) -> None:
        self._generation = -1
        self._reason: str | None = "no routing table read yet"

    def reason(self, routes: Routes) -> str | None:
        if routes.generation != self._generation:
            self._reason = not_ready_reason(routes)
            self._generation = routes.generation
        return self._reason
