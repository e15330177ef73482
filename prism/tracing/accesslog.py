"""The access log (``[tracing] access_log = true``): one JSON line per call.

Each answered call writes one line on stderr, next to the other log lines
and in their shape (``ts``, ``level``, ``logger``, ``msg``, ``pid``), with
who called (``peer``, ``principal``), what (``namespace``, ``method``), how
it ended (``status``, ``duration_ms``), the request and response message
bytes, and the call's ``trace_id`` (null when the call has none: not
sampled, and its client sent no ``traceparent``). Encoded by msgspec and
written directly: a call pays one encode and one write, not a LogRecord.
"""

from __future__ import annotations

import os
import sys
import time

import msgspec


class AccessEntry(msgspec.Struct, frozen=True, kw_only=True):
    ts: str
    level: str = "info"
    logger: str = "prism.access"
    msg: str = "call"
    pid: int
    peer: str
    principal: str | None
    namespace: str
    method: str
    status: str
    duration_ms: float
    bytes_in: int
    bytes_out: int
    trace_id: str | None


class AccessLog:
    """Writes ``AccessEntry`` lines to stderr (as it is at each write)."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder()
        self._pid = os.getpid()
        self._second = -1
        self._prefix = ""

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not once a call
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def write(
        self,
        *,
        peer: str,
        principal: str | None,
        namespace: str,
        method: str,
        status: str,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
        trace_id: str | None,
    ) -> None:
        entry = AccessEntry(
            ts=self._timestamp(),
            pid=self._pid,
            peer=peer,
            principal=principal,
            namespace=namespace,
            method=method,
            status=status,
            duration_ms=round(seconds * 1000, 3),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            trace_id=trace_id,
        )
        line = self._encoder.encode(entry)
        try:
            sys.stderr.write(line.decode() + "\n")
        except (OSError, ValueError):
            pass  # stderr closed: the call is answered anyway
