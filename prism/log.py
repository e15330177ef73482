"""Structured logs: one JSON object per line on stderr.

Nothing on the hot path logs at info level; a handler's unexpected exception
is logged once, with its traceback, by the RPC error boundary. Every line,
traceback included, goes through ``prism.redact``: a DSN or URL that reaches
a message (in a foreign library's exception text, say) shows no password.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import msgspec

from prism.redact import redact

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
            "pid": os.getpid(),
        }
        # Structured lines (the audit log) pass their fields with extra={"fields": {...}}.
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        # The call's trace, while tracing is on (prism.tracing.context.TraceIdFilter).
        trace_id = getattr(record, "trace_id", None)
        if trace_id is not None:
            entry["trace_id"] = trace_id
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return _encoder.encode(entry).decode()


def setup_logging(level: str = "info") -> None:
    """Send prism's logs to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("prism")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
