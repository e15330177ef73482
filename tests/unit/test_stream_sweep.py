"""Closed streams are forgotten in sweeps whose cost is spread over the
streams opened since the last one (``prism.rpc.h2read``), not one sweep per
new stream once a connection holds many: the streams of one large read are
all still open while it is taken in, and sweeping them for every new one
was a third of a worker's CPU under load."""

from __future__ import annotations

from typing import Any

from prism.benchmark.frames import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, SETTINGS, frame
from prism.benchmark.workload import grpc_frame
from prism.rpc.hpack_cache import stateless_block
from prism.rpc.protocol import GrpcProtocol

BLOCK = stateless_block(
    [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/s/M"), (b":authority", b"x"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
    ]
)  # fmt: skip
CALL_END = 2


def _requests(first_sid: int, n: int) -> bytes:
    out = bytearray()
    for sid in range(first_sid, first_sid + 2 * n, 2):
        out += frame(HEADERS, END_HEADERS, sid, BLOCK) + frame(DATA, END_STREAM, sid, grpc_frame(b"x"))
    return bytes(out)


def test_a_large_read_sweeps_a_few_times_and_closed_streams_are_still_forgotten() -> None:
    proto = GrpcProtocol(max_concurrent_streams=10_000)
    proto.initiate()
    proto.receive_data(PREFACE + frame(SETTINGS, 0, 0, b""))
    proto.data_to_send()
    sweeps = 0
    walk = proto._h2._open_streams

    def counting(remainder: int) -> Any:
        nonlocal sweeps
        sweeps += 1
        return walk(remainder)

    proto._h2._open_streams = counting  # type: ignore[method-assign]
    sid = 1
    for _ in range(10):  # ten reads of 500 calls each, every call answered after its read
        events = proto.receive_data(_requests(sid, 500))
        sid += 1000
        ended = [call for kind, call in events if kind == CALL_END and call is not None]
        assert len(ended) == 500
        for call in ended:
            proto.send_unary(call, b"ok")
        proto.data_to_send()
        # The streams h2 holds stay bounded by the open ones plus a sweep's margin.
        assert len(proto._h2.streams) <= 500 + 2 * 128
    # 5,000 streams opened: a sweep per stream past the first 128 would be
    # thousands; spread over the streams, it is one per 128 new ones at most.
    assert sweeps <= 5_000 // 128 + 1
    assert sweeps >= 10
