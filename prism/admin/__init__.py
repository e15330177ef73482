"""The admin process: Prometheus metrics, health probes and a read-only admin API over HTTP.

It runs apart from the workers so that a slow scrape (reading every worker's
metric files) or a probe storm never takes time from a gRPC call, and so that
liveness and readiness stay answerable while workers restart.
"""

from __future__ import annotations

from prism.admin.app import make_app

__all__ = ["make_app"]
