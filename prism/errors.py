"""The one exception tree. Each ``PrismError`` carries its gRPC status code.

Backends translate their drivers' exceptions into these; the RPC dispatcher
is the single place that turns them into ``grpc-status``/``grpc-message``.
Anything else that escapes a handler is a bug: logged once, answered INTERNAL.
"""

from __future__ import annotations

import enum


class StatusCode(enum.IntEnum):
    """gRPC status codes (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class PrismError(Exception):
    """Base of every error a client may see; ``str(exc)`` is the grpc-message."""

    grpc_status: StatusCode = StatusCode.UNKNOWN


class InvalidArgument(PrismError):
    grpc_status = StatusCode.INVALID_ARGUMENT


class NotFound(PrismError):
    grpc_status = StatusCode.NOT_FOUND


class ResourceExhausted(PrismError):
    grpc_status = StatusCode.RESOURCE_EXHAUSTED


class Unavailable(PrismError):
    grpc_status = StatusCode.UNAVAILABLE


class DeadlineExceeded(PrismError):
    grpc_status = StatusCode.DEADLINE_EXCEEDED


class Unimplemented(PrismError):
    grpc_status = StatusCode.UNIMPLEMENTED


class Unauthenticated(PrismError):
    grpc_status = StatusCode.UNAUTHENTICATED


class PermissionDenied(PrismError):
    grpc_status = StatusCode.PERMISSION_DENIED


class FailedPrecondition(PrismError):
    grpc_status = StatusCode.FAILED_PRECONDITION


class Internal(PrismError):
    """A failure we detected ourselves (not a bug): its message is safe to show."""

    grpc_status = StatusCode.INTERNAL


class ConfigError(Exception):
    """Invalid configuration; ``str(exc)`` is one line naming the field and the reason."""
