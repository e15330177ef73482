"""What a worker admits: per-namespace and per-tenant quotas (``quota``) and
adaptive overload shedding (``shed``). No trio, no I/O: the callers pass the time."""

from prism.limits.quota import Lease, Limit, QuotaExceeded, Quotas
from prism.limits.shed import SHEDDER, Shedder

__all__ = ["SHEDDER", "Lease", "Limit", "QuotaExceeded", "Quotas", "Shedder"]
