"""The error boundary: the one place where an exception becomes a
``grpc-status`` and ``grpc-message``, for calls on a connection
(``prism.rpc.server``) and calls forwarded from another worker
(``prism.router.remote``) alike.
"""

from __future__ import annotations

import functools
import logging

from google.protobuf.message import DecodeError

from prism.errors import PrismError, StatusCode
from prism.rpc.h2conn import RESPONSE_HEADERS
from prism.rpc.methods import Method
from prism.rpc.respond import encode_grpc_message

log = logging.getLogger("prism.rpc")


def failure_status(exc: Exception, method: Method) -> tuple[StatusCode, str]:
    """The error boundary: PrismError -> its status; a bug -> INTERNAL, logged once."""
    if isinstance(exc, PrismError):
        return exc.grpc_status, str(exc)
    if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        return failure_status(exc.exceptions[0], method)  # one error, wrapped by a nursery
    if isinstance(exc, DecodeError):
        return StatusCode.INVALID_ARGUMENT, f"malformed request message: {exc}"
    log.error("unexpected error in %s", method.name, exc_info=exc)
    return StatusCode.INTERNAL, "internal error"


def pushback_trailer(pushback_ms: int) -> tuple[tuple[bytes, bytes], ...]:
    """gRPC's retry pushback (design A6): the client should wait this long
    before it retries; a refusal by a quota or by overload shedding sends it."""
    return ((b"grpc-retry-pushback-ms", b"%d" % pushback_ms),)


@functools.lru_cache(maxsize=4)
def shed_trailers(target_s: float, pushback_ms: int) -> tuple[tuple[bytes, bytes], ...]:
    """A shed call's trailers-only answer, as ``prism.limits.admission`` words it."""
    return refusal_trailers(
        f"worker overloaded: queueing delay above {target_s * 1000:g} ms; retry", pushback_ms
    )


@functools.lru_cache(maxsize=256)
def refusal_trailers(message: str, pushback_ms: int) -> tuple[tuple[bytes, bytes], ...]:
    """The trailers-only answer of a call refused as it was read (shed, or by a quota)."""
    return (
        *RESPONSE_HEADERS,
        (b"grpc-status", b"%d" % StatusCode.RESOURCE_EXHAUSTED),
        (b"grpc-message", encode_grpc_message(message)),
        *pushback_trailer(pushback_ms),
    )
