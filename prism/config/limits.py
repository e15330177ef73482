"""What one peer may take: the ``[http2]`` section and ``max_inflight``.

Every number has both bounds. The defaults follow what gRPC's own servers,
Go's net/http2 and Envoy settle on; the reasons for each limit are in the
code that enforces it (``prism.rpc``).
"""

from __future__ import annotations

import math

import msgspec

from prism.config.fields import GIB, KIB, MIB, FieldError

MAX_STREAMS = 2**31 - 1  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS is 31-bit in practice
DAY_S = 86_400.0
STREAM_WINDOW = 65_536  # a stream's initial window, and a message's prefix (prism.rpc.budget)


class Http2Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per connection, unless the name says worker."""

    # None: the top-level ``max_concurrent_streams`` (which keeps working).
    max_concurrent_streams: int | None = None
    max_header_list_bytes: int = 16 * KIB
    max_connection_buffer_bytes: int = 16 * MIB
    max_worker_buffer_bytes: int = 512 * MIB
    handshake_timeout_s: float = 10.0  # preface and first SETTINGS (TLS has its own, in [tls])
    idle_timeout_s: float = 300.0  # no open stream this long: GOAWAY(NO_ERROR), close
    keepalive_time_s: float = 60.0  # a server PING on a quiet connection; 0: off
    keepalive_timeout_s: float = 20.0  # no PING ACK within this: close
    max_connection_age_s: float = 0.0  # 0: off; else GOAWAY(NO_ERROR) at this age (+ jitter)
    max_connections: int = 10_000  # per worker; beyond: a new connection is closed at once


def _seconds(value: float, where: str, *, low: float, high: float, zero_ok: bool = False) -> None:
    if zero_ok and value == 0:
        return
    if not (math.isfinite(value) and low < value <= high):
        off = "0 (off), or " if zero_ok else ""
        raise FieldError(where, f"{value} out of range ({off}> {low:g} and at most {high:g} seconds)")


def _count(value: int, where: str, low: int, high: int) -> None:
    if not low <= value <= high:
        raise FieldError(where, f"{value} out of range ({low}-{high})")


def validate_limits(
    http2: Http2Config, max_inflight: int, top_level_streams: int, max_message_bytes: int
) -> None:
    if http2.max_concurrent_streams is not None:
        _count(http2.max_concurrent_streams, "http2.max_concurrent_streams", 1, MAX_STREAMS)
        if top_level_streams not in (100, http2.max_concurrent_streams):
            raise FieldError(
                "http2.max_concurrent_streams",
                f"{http2.max_concurrent_streams} disagrees with the top-level "
                f"max_concurrent_streams ({top_level_streams}): set one of them",
            )
    _count(http2.max_header_list_bytes, "http2.max_header_list_bytes", 1 * KIB, 1 * MIB)
    _count(http2.max_connection_buffer_bytes, "http2.max_connection_buffer_bytes", max(64 * KIB, 1), 4 * GIB)
    if http2.max_connection_buffer_bytes < max_message_bytes + STREAM_WINDOW:
        raise FieldError(
            "http2.max_connection_buffer_bytes",
            f"{http2.max_connection_buffer_bytes} is less than max_message_bytes ({max_message_bytes}) "
            f"+ {STREAM_WINDOW}: one message and a stream's window must fit",
        )
    _count(
        http2.max_worker_buffer_bytes,
        "http2.max_worker_buffer_bytes",
        http2.max_connection_buffer_bytes,
        64 * GIB,
    )
    _seconds(http2.handshake_timeout_s, "http2.handshake_timeout_s", low=0, high=300)
    _seconds(http2.idle_timeout_s, "http2.idle_timeout_s", low=0, high=DAY_S)
    _seconds(http2.keepalive_time_s, "http2.keepalive_time_s", low=0.1, high=DAY_S, zero_ok=True)
    _seconds(http2.keepalive_timeout_s, "http2.keepalive_timeout_s", low=0, high=3600)
    _seconds(http2.max_connection_age_s, "http2.max_connection_age_s", low=0.1, high=30 * DAY_S, zero_ok=True)
    _count(http2.max_connections, "http2.max_connections", 1, 1_000_000)
    _count(max_inflight, "max_inflight", 1, 1_000_000)
