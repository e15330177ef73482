"""The audit log: one JSON line per denied call, and one per allowed write
when ``audit_writes`` is on.

Lines go to the logger ``prism.audit`` in the JSON format of ``prism.log``,
with the fields ``principal``, ``peer`` (the client's address), ``namespace``,
``method`` and, for a denial, ``status`` and ``reason``; the line's ``ts`` is
its time. Nothing else: never a value, a token or a password. Each field is
chosen here, from the identity the check established and the request's
namespace, so no request content can slip in.

The logger has its own level (INFO), whatever the server's log level:
audit lines are a record, not diagnostics a quieter level may hide.

Denials are bounded per process (``DENIALS_PER_S``, with as large a burst):
a client without credentials can cause them as fast as it can send, and each
line is a write to stderr, which a slow journal can make block the worker.
Nothing is dropped silently: the next line written carries ``dropped``, the
number of denial lines left out since the previous one, and ``dropped``
counts them all. Allowed writes are never dropped: their volume is what the
operator asked for, from callers who did authenticate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from prism.rpc.call import Caller

DENIALS_PER_S: Final = 1000.0
# Namespaces come from requests; a valid one has at most 128 characters.
MAX_NAMESPACE_CHARS: Final = 256

log = logging.getLogger("prism.audit")
log.setLevel(logging.INFO)


class Audit:
    """Writes the audit lines of one worker process."""

    def __init__(
        self, *, denials_per_s: float = DENIALS_PER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = denials_per_s
        self._clock = clock
        self._tokens = denials_per_s
        self._refilled = clock()
        self._unreported = 0
        self.dropped = 0  # denial lines left out since this process started

    def denied(
        self, principal: str | None, peer: str, namespace: str, method: str, status: str, reason: str
    ) -> None:
        """Record a refused call (``status``: UNAUTHENTICATED or PERMISSION_DENIED)."""
        now = self._clock()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            self._unreported += 1
            self.dropped += 1
            return
        self._tokens -= 1.0
        self._write(
            logging.WARNING, "denied", principal, peer, namespace, method, status=status, reason=reason
        )

    def allowed_write(self, caller: Caller, namespace: str, method: str) -> None:
        """Record a write the rules allowed (with ``audit_writes``)."""
        self._write(logging.INFO, "write", caller.principal, caller.address, namespace, method)

    def _write(
        self,
        level: int,
        event: str,
        principal: str | None,
        peer: str,
        namespace: str,
        method: str,
        **more: str,
    ) -> None:
        if len(namespace) > MAX_NAMESPACE_CHARS:
            namespace = namespace[:MAX_NAMESPACE_CHARS] + "..."
        fields: dict[str, object] = {
            "principal": principal,
            "peer": peer,
            "namespace": namespace,
            "method": method,
            **more,
        }
        if self._unreported:
            fields["dropped"] = self._unreported
            self._unreported = 0
        log.log(level, event, extra={"fields": fields})
