"""Calls refused as they are read, without h2 ever holding their streams.

A request read whole by the plain path and refused at once (the overload
door, a quota: ``GrpcProtocol.shed`` and ``limit``) is answered and closed
without an h2 stream (``prism.rpc.h2read``: ``Pending``). Whatever the client
does around it, the server must send the same bytes, report the same calls
and leave h2's open streams as a server does that makes every such stream
h2's first and refuses it through h2's state machine, as before.
"""

from __future__ import annotations

from typing import Any

import h2.events
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.rpc.boundary import shed_trailers
from prism.rpc.protocol import GrpcProtocol

from .test_plain_frames import ALL, PATHS, PLAIN, WARM_UP, WINDOW, Run, action

REFUSAL = shed_trailers(0.005, 10)
_GOAWAY = 0x7
_PROTOCOL_ERROR = (1).to_bytes(4, "big")
_STREAM_CLOSED = (5).to_bytes(4, "big")


def _refusing(proto: GrpcProtocol, refused: frozenset[int]) -> GrpcProtocol:
    """``proto``, refusing the n-th request it reads plainly if n % 8 is in ``refused``."""
    seen = 0

    def shed(headers: Any) -> Any:
        nonlocal seen
        seen += 1
        return REFUSAL if seen % 8 in refused else None

    proto.shed = shed
    return proto


def _through_h2(proto: GrpcProtocol) -> GrpcProtocol:
    """``proto``, making every stream h2's before it refuses it (the former path)."""
    proto._h2.pending_ended = lambda sid: False  # type: ignore[method-assign]
    return proto


class RefusingRun(Run):
    def __init__(self, refused: set[int]) -> None:
        self.refused = frozenset(refused)
        super().__init__()

    def servers(self) -> tuple[GrpcProtocol, GrpcProtocol]:
        return (
            _refusing(GrpcProtocol(initial_window_bytes=WINDOW), self.refused),
            _refusing(_through_h2(GrpcProtocol(initial_window_bytes=WINDOW)), self.refused),
        )

    def compare(self) -> None:
        # One difference is allowed: a client's HEADERS on a stream refused
        # as it was read. To h2 that stream is one it has forgotten (as it
        # forgets closed streams in its sweeps): a stream id below the
        # highest, PROTOCOL_ERROR (RFC 9113 5.1.1); through h2, a closed
        # stream, STREAM_CLOSED (5.1). Either way the connection ends with
        # a GOAWAY naming the same last stream.
        if self.slow.broken and self.fast.broken:
            fast, slow = self.fast._h2._data_to_send, self.slow._h2._data_to_send
            # (A GOAWAY is the last frame: 9 bytes of header, then 8 of payload.)
            if fast != slow and fast[:-4] == slow[:-4] and len(fast) >= 17 and fast[-14] == _GOAWAY:
                assert (fast[-4:], slow[-4:]) == (_PROTOCOL_ERROR, _STREAM_CLOSED)
                self.slow._h2._data_to_send = bytearray(fast)
        super().compare()


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(action, min_size=10, max_size=100), refused=st.sets(st.integers(0, 7), min_size=1))
# Frames on a refused stream after its answer: a window update, a reset, DATA again.
@example(refused=set(range(8)), steps=[PLAIN, ALL, ("stream_window", 50, 5), ALL])
@example(refused=set(range(8)), steps=[PLAIN, ("raw", "data_again"), ALL])
# A refused request whose body comes in a later read: h2's stream, as before.
@example(refused=set(range(8)), steps=[("request", PATHS[0], b"", 3, None, None), ALL, ("late",), ALL])
# HEADERS again on a stream refused as it was read (found by hypothesis): a GOAWAY either way.
@example(
    refused={0, 1},
    steps=[("late",)] * 3 + [PLAIN, ALL, ("odd", 0, False), ("raw", "headers_low")] + [PLAIN] * 3,
)
# grpc-core's calls: a window update on the stream between its HEADERS and DATA.
@example(refused={1, 3, 5, 7}, steps=[("request", PATHS[0], b"abc", 4, None, None)] * 6 + [ALL])
def test_refusals_without_h2_streams_agree_with_refusals_through_them(
    steps: list[tuple[Any, ...]], refused: set[int]
) -> None:
    RefusingRun(refused).play(WARM_UP + steps)


def client_events(run: Run) -> list[h2.events.Event]:
    """What ``run``'s client receives from now on (appended as it comes)."""
    events: list[h2.events.Event] = []
    receive = run.client.receive_data

    def recording(data: Any) -> Any:
        got = receive(data)
        events.extend(got)
        return got

    run.client.receive_data = recording  # type: ignore[method-assign]
    return events


def send_request(run: RefusingRun, n: int) -> int:
    """The client sends a unary data call (body ``n``); its stream id."""
    sid: int = run.client.get_next_available_stream_id()
    run.act(("request", PATHS[0], b"%d" % n, 0, None, None))
    return sid


def trailers_only(events: list[h2.events.Event]) -> dict[int, dict[bytes, bytes]]:
    """The answers in ``events`` by stream, each of which ended its stream (trailers only)."""
    answers = {ev.stream_id: dict(ev.headers) for ev in events if isinstance(ev, h2.events.ResponseReceived)}
    ended = [ev.stream_id for ev in events if isinstance(ev, h2.events.StreamEnded)]
    assert sorted(answers) == sorted(ended)
    return answers


def test_a_refused_call_read_whole_leaves_no_h2_stream_and_the_connection_serves_on() -> None:
    run = RefusingRun(set(range(8)))  # every request refused
    for step in WARM_UP:
        run.act(step)
    events = client_events(run)
    refused = []
    for n in range(10):
        refused.append(send_request(run, n))
        run.deliver(0, everything=True)
        assert refused[-1] not in run.fast._h2.streams  # never h2's
    # What the client got: a trailers-only RESOURCE_EXHAUSTED answer ending each stream.
    answers = trailers_only(events)
    assert sorted(answers) == refused
    assert {a[b"grpc-status"] for a in answers.values()} == {b"8"}
    assert all(b"grpc-retry-pushback-ms" in a for a in answers.values())
    # The connection goes on: a request let in is a call, on a stream h2 holds.
    run.fast.shed = run.slow.shed = lambda headers: None
    sid = run.client.get_next_available_stream_id()
    run.act(("request", PATHS[0], b"x", 0, None, None))
    run.deliver(0, everything=True)
    assert run.calls[-1][0].stream_id == sid
    assert sid in run.fast._h2.streams
