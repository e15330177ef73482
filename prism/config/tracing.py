"""``[tracing]``: OpenTelemetry spans exported over OTLP/HTTP, and the access log.

::

    [tracing]
    otlp_endpoint = "http://127.0.0.1:4318/v1/traces"  # "" (default): no spans
    sample_ratio = 0.01      # of calls whose client sent no traceparent
    export_queue = 2048      # spans waiting for the exporter; beyond: dropped
    access_log = true        # one JSON line per call on stderr

Both are off by default, and off they cost nothing: a worker does not even
import OpenTelemetry (``prism.tracing`` says how).
"""

from __future__ import annotations

import math
from urllib.parse import urlsplit

import msgspec

from prism.config.fields import FieldError


class TracingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Traces and the access log (see the module docstring)."""

    # Where spans go: an OTLP/HTTP (protobuf) traces URL; "" exports none.
    otlp_endpoint: str = ""
    # The share of calls traced when the client sent no ``traceparent``; a
    # call whose client did follows the client's sampled flag.
    sample_ratio: float = 0.01
    # Finished spans waiting for the export thread, at most; more are dropped.
    export_queue: int = 2048
    # How long one export may take (seconds) before it is given up.
    export_timeout_s: float = 10.0
    # One JSON line per answered call on stderr (prism.tracing.accesslog).
    access_log: bool = False

    @property
    def spans(self) -> bool:
        """Whether spans are made and exported."""
        return bool(self.otlp_endpoint)

    @property
    def enabled(self) -> bool:
        """Whether calls are followed at all (spans, or the access log)."""
        return self.spans or self.access_log


def validate_tracing(cfg: TracingConfig) -> None:
    """Raise ``FieldError`` for the first bad ``[tracing]`` value."""
    if cfg.otlp_endpoint:
        parts = urlsplit(cfg.otlp_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FieldError(
                "tracing.otlp_endpoint",
                f"expected an http:// or https:// URL naming a host, got {cfg.otlp_endpoint!r}",
            )
        try:
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise FieldError("tracing.otlp_endpoint", "the port is not a number in 1-65535") from None
    if not (math.isfinite(cfg.sample_ratio) and 0.0 <= cfg.sample_ratio <= 1.0):
        raise FieldError("tracing.sample_ratio", f"{cfg.sample_ratio} must be between 0 and 1")
    if not 1 <= cfg.export_queue <= 1_000_000:
        raise FieldError("tracing.export_queue", f"{cfg.export_queue} out of range (1-1000000)")
    if not (math.isfinite(cfg.export_timeout_s) and cfg.export_timeout_s > 0):
        raise FieldError("tracing.export_timeout_s", f"{cfg.export_timeout_s} must be > 0")
