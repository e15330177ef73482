"""Quotas and overload: a namespace's or a tenant's ``limits``, and ``[overload]``.

``limits = { rps = 5000, burst = 1000, concurrency = 256 }`` holds a
namespace (or, on a tenant, all its namespaces together) to a token-bucket
rate and a cap on calls in flight, per worker process. Each field is
optional and an absent one is unlimited; ``burst`` (the bucket's size) needs
``rps`` and defaults to one second of it. ``[overload]`` is the adaptive
shedding of ``prism.limits.shed``. Enforced by ``prism.limits``.
"""

from __future__ import annotations

import math

import msgspec

from prism.config.fields import FieldError

MAX_RPS = 100_000_000.0
MAX_BURST = 100_000_000
MAX_CONCURRENCY = 1_000_000


class LimitsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per worker: calls per second (``rps``, with ``burst`` calls at once
    after a quiet spell) and calls in flight (``concurrency``)."""

    rps: float | None = None
    burst: int | None = None
    concurrency: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.rps is None and self.concurrency is None


class OverloadConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Adaptive shedding (``prism.limits.shed``): once the shortest queueing
    delay seen over ``interval_ms`` stayed above ``target_delay_ms``, new
    calls are refused at once until it falls back under.

    Off by default: with many new connections each with a call (1,000
    clients connecting at once), first calls wait behind the handshakes,
    and those that waited past the target would be refused where they
    could still be answered within their deadlines.
    ``bench/overload.py`` measures it against its targets."""

    enabled: bool = False
    target_delay_ms: float = 5.0
    interval_ms: float = 100.0


def validate_limits_table(limits: LimitsConfig | None, where: str) -> None:
    """Check ``limits`` (at ``where``, e.g. ``namespaces[0].limits``)."""
    if limits is None:
        return
    if limits.rps is not None and not (math.isfinite(limits.rps) and 0 < limits.rps <= MAX_RPS):
        raise FieldError(f"{where}.rps", f"{limits.rps} out of range (> 0 and at most {MAX_RPS:g})")
    if limits.burst is not None:
        if limits.rps is None:
            raise FieldError(f"{where}.burst", "needs rps (burst is the size of the rps bucket)")
        if not 1 <= limits.burst <= MAX_BURST:
            raise FieldError(f"{where}.burst", f"{limits.burst} out of range (1-{MAX_BURST})")
    if limits.concurrency is not None and not 1 <= limits.concurrency <= MAX_CONCURRENCY:
        raise FieldError(f"{where}.concurrency", f"{limits.concurrency} out of range (1-{MAX_CONCURRENCY})")


def validate_overload(overload: OverloadConfig) -> None:
    target, interval = overload.target_delay_ms, overload.interval_ms
    if not (math.isfinite(target) and 0 < target <= 10_000):
        raise FieldError("overload.target_delay_ms", f"{target} out of range (> 0 and at most 10000 ms)")
    if not (math.isfinite(interval) and 1 <= interval <= 60_000):
        raise FieldError("overload.interval_ms", f"{interval} out of range (1-60000 ms)")
    if interval < target:
        raise FieldError(
            "overload.interval_ms",
            f"{interval} is less than target_delay_ms ({target}): nothing could be seen",
        )
