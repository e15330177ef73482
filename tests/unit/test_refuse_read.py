"""A read the shut door refuses, refused whole (``prism.rpc.refuse_read``).

Whatever the client sends, a server that refuses a read's leading unary
calls in one pass must send the same bytes, report the same calls and leave
h2 in the same state as one whose door refuses each call as it reads it;
over TCP, the client gets a RESOURCE_EXHAUSTED answer for each, counted as
the door's refusals are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prism.config.quotas import OverloadConfig
from prism.errors import StatusCode
from prism.limits import Shedder
from prism.limits.shed import AHEAD_FLOOR
from prism.proto import kv_pb2
from prism.rpc import protocol
from prism.rpc.flood import WINDOW_UPDATES_PER_DATA_FRAME_SENT
from prism.rpc.h2send import final_block
from prism.rpc.held import HOLD_S
from prism.rpc.protocol import GrpcProtocol
from prism.rpc.refuse_read import Refusing

from .h2client import frame
from .test_held import AHEAD, PUT, _nothing_came, door_shut
from .test_plain_frames import ALL, PATHS, PLAIN, WARM_UP, _request_headers, action
from .test_quotas import limited
from .test_refused_unheld import REFUSAL, RefusingRun, client_events, send_request, trailers_only

_DATA_PATHS = {
    p.encode() for p in PATHS[:2]
}  # (the third, "/s/M", stands for a call that is not a data call)


def _operation_of(headers: Any) -> str | None:
    for name, value in headers:
        if name == b":path":
            return "get" if value in _DATA_PATHS else None
    return None


def _refusing_whole(proto: GrpcProtocol) -> Refusing:
    """``proto``, refusing each read's leading data calls in one pass."""
    refusing = Refusing(_operation_of, {})
    refusing.block = final_block(REFUSAL)
    proto.refuse_read = lambda: refusing
    return refusing


class WholeRun(RefusingRun):
    """Every call refused: by the fast server a read at a time where it can
    be, by the slow one (through h2's streams) a call at a time."""

    whole = 0  # calls refused a read at a time
    reopened = False

    def __init__(self) -> None:
        super().__init__(set(range(8)))

    def servers(self) -> tuple[GrpcProtocol, GrpcProtocol]:
        fast, slow = super().servers()
        self.refusing = _refusing_whole(fast)
        self.whole_sids: set[int] = set()  # streams refused a read at a time
        self.refused_now: set[int] = set()  # (in the last read)
        receive = fast.receive_data

        def receive_data(data: Any) -> Any:
            got = receive(data)
            # (Refused whole: the leading HEADERS and DATA pairs of the read.)
            n = 2 * self.refusing.refused
            frames = _frames(data) if n else []
            sids = {sid for _, sid, _ in frames[:n:2]}
            self.whole_sids |= sids
            self.refused_now |= sids
            return got

        fast.receive_data = receive_data  # type: ignore[method-assign]
        return fast, slow

    def act(self, step: tuple[Any, ...]) -> None:
        if step == ("raw", "headers_low"):
            # HEADERS again on the client's last stream, refused (whole, or
            # a call at a time): to h2 a stream id it has forgotten (the
            # connection ends, PROTOCOL_ERROR, RFC 9113 5.1.1), where a call
            # at a time h2 holds it, closed (STREAM_CLOSED). The run ends.
            self.reopened = True
            return
        super().act(step)

    def deliver(self, cut: int, *, everything: bool = False) -> None:
        if self.reopened:
            return
        super().deliver(cut, everything=everything)
        self.whole += self.refusing.refused
        self.refusing.refused = 0

    def compare(self) -> None:
        # Refused whole, a read's leading calls are answered and closed
        # before h2 takes in the rest of the read: what the client sends
        # about those streams later in the read (a reset, DATA again, a
        # window update), or a connection error after them, finds them
        # answered, where a call at a time h2 acted first (a reset, a
        # connection closed without their answers). Both are HTTP/2's. So
        # the frames on those streams may differ (each is answered by the
        # server refusing whole), and every other frame must be the same, in
        # order (a header block by its stream and flags: h2's HPACK encodings
        # depend on the blocks h2 encoded before, and h2 encodes refusals
        # once the client has resized the table).
        fast, slow = _frames(self.fast._h2._data_to_send), _frames(self.slow._h2._data_to_send)
        # (What the connection's window has taken in, to give back: the same.)
        windows = (self.fast._h2, self.slow._h2)
        assert len({w._inbound_flow_control_window_manager._bytes_processed for w in windows}) == 1
        answered = {sid for _, sid, raw in fast if _is_refusal(raw)}
        assert self.refused_now <= answered
        self.refused_now = set()
        if fast != slow:
            assert _shape(fast, self.whole_sids) == _shape(slow, self.whole_sids)
            self.slow._h2._data_to_send = bytearray(self.fast._h2._data_to_send)
        super().compare()


def _shape(frames: list[tuple[int, int, bytes]], leave_out: set[int]) -> list[tuple[int, int, bytes]]:
    return [
        (kind, sid, raw[3:5] if kind == _HEADERS else raw)
        for kind, sid, raw in frames
        if sid not in leave_out
    ]


_HEADERS = 0x1
_BLOCK = final_block(REFUSAL)


def _is_refusal(raw: bytes) -> bool:
    """Whether the frame ``raw`` is a trailers-only answer (every call here is
    refused; its block is ``_BLOCK``, or h2's encoding of it once the client
    has resized the HPACK table, which depends on what h2 encoded before)."""
    return raw[3:5] == b"\x01\x05"


def _frames(out: bytes | bytearray) -> list[tuple[int, int, bytes]]:
    """``out``'s frames: (type, stream id, the frame's bytes)."""
    frames, pos = [], 0
    while pos + 9 <= len(out):
        stop = pos + 9 + int.from_bytes(out[pos : pos + 3], "big")
        frames.append(
            (out[pos + 3], int.from_bytes(out[pos + 5 : pos + 9], "big") & 0x7FFFFFFF, bytes(out[pos:stop]))
        )
        pos = stop
    return frames


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(action, min_size=10, max_size=100))
@example(steps=[PLAIN] * 8 + [ALL])  # a read of plain calls alone: all refused in one pass
@example(steps=[PLAIN, ("request", PATHS[2], b"", 0, None, None), PLAIN, ALL])  # not a data call between
@example(steps=[PLAIN, ALL, ("stream_window", 50, 5), ALL])  # a window update on a refused stream
@example(steps=[("request", PATHS[0], b"", 3, None, None), PLAIN, ALL, ("late",), ALL])  # a body later
@example(steps=[PLAIN, ("raw", "data_again"), ALL])
@example(steps=[("request", PATHS[0], b"abc", 4, None, None)] * 3 + [ALL])  # grpc-core's window updates
def test_a_read_refused_whole_agrees_with_each_call_refused(steps: list[tuple[Any, ...]]) -> None:
    WholeRun().play(WARM_UP + steps)


def test_a_read_of_two_methods_counts_each_call_by_its_operation() -> None:
    """Calls of two methods alternating in one read, refused in one pass
    (each header block read again by comparison while it repeats): every
    call counted under its own operation."""
    run = WholeRun()
    paths = {p.encode(): op for p, op in zip(PATHS[:2], ("get", "put"), strict=True)}
    run.refusing.operation_of = lambda headers: paths.get(dict(headers)[b":path"])
    put = ("request", PATHS[1], b"", 0, None, None)
    # (Each block decoded once first: put's path enters HPACK's table, and
    # GetItems' index in it moves.)
    run.play([*WARM_UP, put, ALL, put, ALL, PLAIN, ALL])
    run.refusing.counts.clear()
    whole = run.whole
    for step in [PLAIN, PLAIN, put, PLAIN, put, put, put, PLAIN]:
        run.act(step)
    run.deliver(0, everything=True)
    assert run.whole - whole == 8  # one pass
    assert run.refusing.counts == {"get": 4, "put": 4}


def test_a_read_of_plain_calls_is_refused_in_one_pass_and_the_connection_serves_on() -> None:
    run = WholeRun()
    run.play(WARM_UP)
    events = client_events(run)
    sids = [send_request(run, n) for n in range(10)]
    run.deliver(0, everything=True)
    assert run.whole == 10  # one pass: no call was judged on its own
    assert run.refusing.counts == {"get": 10}
    assert not set(sids) & set(run.fast._h2.streams)  # never h2's
    assert run.fast._flood.opened == run.slow._flood.opened
    answers = trailers_only(events)
    assert sorted(answers) == sids
    assert {a[b"grpc-status"] for a in answers.values()} == {b"8"}
    # A call that is not a data call ends the pass: it and what follows are
    # judged one by one (here the per-call door refuses them too).
    run.act(PLAIN)
    run.act(("request", PATHS[2], b"", 0, None, None))
    run.act(PLAIN)
    run.deliver(0, everything=True)
    assert run.whole == 11
    # The door open, the connection serves on: a call on a stream h2 holds.
    run.fast.refuse_read = None
    run.fast.shed = run.slow.shed = lambda headers: None
    sid = run.client.get_next_available_stream_id()
    run.act(PLAIN)
    run.deliver(0, everything=True)
    assert run.calls[-1][0].stream_id == sid
    assert sid in run.fast._h2.streams


def test_grpc_core_calls_are_refused_in_one_pass_window_updates_and_all() -> None:
    # grpc-core's clients send a WINDOW_UPDATE for the stream between a call's
    # HEADERS and DATA, and one for the connection after them.
    run = WholeRun()
    run.play(WARM_UP)
    window = run.fast._h2.outbound_flow_control_window
    for n in range(6):
        run.act(("request", PATHS[0], b"%d" % n, 4, None, None))
    run.deliver(0, everything=True)
    assert run.whole == 6
    assert run.fast._h2.outbound_flow_control_window == window + 6 * (len(frame(b"0")) + 100)
    assert run.fast._flood._window_updates == run.slow._flood._window_updates


def test_a_window_update_past_the_flood_rule_ends_the_pass() -> None:
    run = WholeRun()
    run.play(WARM_UP)
    # As many WINDOW_UPDATEs taken in as the rule allows, with the next
    # stream opened (counted directly: sent, the guard's GOAWAY would come first).
    for proto in (run.fast, run.slow):
        guard = proto._flood
        streams = guard.opened + 1
        guard._window_updates = 1 + 2 * (
            streams + WINDOW_UPDATES_PER_DATA_FRAME_SENT * proto._h2.data_frames_sent
        )
    sid = run.client.get_next_available_stream_id()
    run.client.send_headers(sid, _request_headers(PATHS[0]))
    run.client.increment_flow_control_window(5, stream_id=sid)  # one too many
    run.client.send_data(sid, frame(b"x"), end_stream=True)
    run.deliver(0, everything=True)
    assert run.whole == 0  # judged on the ordinary path: the flood guard's
    assert run.fast.broken and run.slow.broken


# ---------------------------------------------------------------- the door's verdict, once a read

SHUT = OverloadConfig(enabled=True, target_delay_ms=5, interval_ms=100)


def _shut(call_s: float) -> Shedder:
    shedder = Shedder(SHUT)
    shedder.refuses(0, 0.0)  # an interval starts
    for _ in range(8):
        shedder.observe_sojourn(0.02)  # a standing queue
    shedder.refuses(0, 0.1)  # the decision: shut
    assert shedder.shut
    shedder.call_s = call_s
    return shedder


@settings(max_examples=300, deadline=None)
@given(
    inflight=st.integers(0, 4 * AHEAD_FLOOR),
    waited=st.floats(0.0, 0.02),
    call_s=st.floats(0.0, 0.0005),
    at=st.floats(0.1, 0.25),
)
def test_the_verdict_on_a_whole_read_is_the_door_s_on_each_of_its_calls(
    inflight: int, waited: float, call_s: float, at: float
) -> None:
    once, each = _shut(call_s), _shut(call_s)
    verdict = once.refuses_all(inflight, at, waited)
    if at >= 0.2:
        assert not verdict  # a decision is due: the calls' own path makes it
        return
    assert verdict == each.refuses(inflight, at, waited)
    if verdict:
        asked, late = once._asked, once._late
        once.count_refused(3)
        for _ in range(2):
            assert each.refuses(inflight, at, waited)
        assert (once._asked, once._late) == (each._asked, each._late) == (asked + 3, late + 3)


def test_an_open_door_refuses_no_whole_read() -> None:
    shedder = Shedder(SHUT)
    shedder.refuses(0, 0.0)
    assert not shedder.refuses_all(10 * AHEAD_FLOOR, 0.05, 1.0)


# ---------------------------------------------------------------- over TCP


async def test_a_read_the_shut_door_refuses_is_answered_and_counted_call_by_call(
    mock_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    real = protocol.refuse_leading

    def counting(proto: GrpcProtocol, data: Any, refusing: Refusing) -> Any:
        rest = real(proto, data, refusing)
        passes.append(refusing.refused)
        return rest

    monkeypatch.setattr(protocol, "refuse_leading", counting)
    before = limited("", "overload")
    async with door_shut(tmp_path, mock_clock) as (client, app):
        shedder = app.settings.admission.shedder
        asked = shedder._asked
        request = kv_pb2.PutItemsRequest(
            namespace="profiles", id="r", items=[kv_pb2.Item(key=b"k", value=b"lost")]
        )
        sids = [client.queue_call(PUT, frame(request.SerializeToString())) for _ in range(6)]
        assert isinstance(client.stream, trio.SocketStream)
        os.write(client.stream.socket.fileno(), client.conn.data_to_send())  # one write: one read
        assert await _nothing_came(client)  # refusals alone: held
        mock_clock.jump(HOLD_S)
        for sid in sids:
            r = await client.wait(sid)
            assert (r.status, r.message) == (
                StatusCode.RESOURCE_EXHAUSTED,
                "worker overloaded: queueing delay above 50 ms; retry",
            )
        assert 6 in passes  # in one pass
        assert shedder._asked - asked == 6  # judged, as the door counts its calls
        assert limited("", "overload") - before == 6
        # Nothing ahead of the next call now: the door lets it in, and it is served.
        app.settings.inflight -= AHEAD
        try:
            sid = await client.start_call(PUT, frame(request.SerializeToString()))
            assert (await client.wait(sid)).status == StatusCode.OK
        finally:
            app.settings.inflight += AHEAD
