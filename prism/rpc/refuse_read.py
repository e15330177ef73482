"""Refusing a read's new unary calls in one pass while the overload door is shut.

At twice what a worker can serve, the door (``prism.limits.shed``) refuses
more than half the calls it reads, and what the refusals cost comes out of
the calls it serves. Through the plain path (``prism.rpc.h2read``) a
refusal was read frame by frame into entries, judged, answered and
forgotten one call at a time: py-spy on an SQLite worker offered twice its
saturation put ~7 us of the reader's CPU on each, a share of a served
call's ~87 us that alone left the worker under nine tenths of its
saturation.

But once the door is shut, its verdict is one for all the new calls of a
read: a call is refused for having come late, or behind too much work in
flight (``Shedder.refuses_all``), and neither changes between the calls of
one read (the calls let in before a call only add to the work ahead of it).
So a read the door refuses is refused here, whole: its leading requests, each
a HEADERS frame opening a stream and one DATA frame ending it (a unary
call's request, as gRPC clients send it; grpc-core's, with a WINDOW_UPDATE
for the stream between them and one for the connection after), are read
and answered in one loop, with the state changes the plain path and its
refusal make (the stream id, the windows, the flood guard's counts; the
stream is never h2's, as there), and the same refusal frames. Anything
else ends the loop, and the rest of the read takes the ordinary path, where
each call is judged on its own: a frame of another kind, a request in
pieces or whose body is not in the read, a header block ``CachingDecoder``
has not decoded before, a WINDOW_UPDATE past the flood rule, or a call that
is not a data call (health, reflection: served).

One thing differs from refusing each call: the calls are answered and
closed before the rest of the read is taken in. What the client sends
about those streams later in the same read (a reset, DATA again, HEADERS
again) finds them closed, and their answers may go out before h2's replies
to the frames after them (a SETTINGS ACK): both HTTP/2's.
``tests/unit/test_refuse_read.py`` holds it against the plain path refusing
each call, and names those differences.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, Protocol

from h2.connection import ConnectionState

from prism.rpc.flood import FloodGuard
from prism.rpc.h2conn import ServerConnection

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_FRAME_HEAD: Final = 9
_FINAL_FLAGS: Final = b"\x01\x05"  # HEADERS, END_HEADERS | END_STREAM
_FRAME_HEADER: Final = struct.Struct(">IBI")
_WINDOW_UPDATE_HEAD: Final = 4 << 8 | 0x8  # a WINDOW_UPDATE's length and type, as unpacked
_LARGEST_WINDOW: Final = 2**31 - 1  # RFC 9113 6.9.1
# Header lists seen, by identity (the decoder's cache hands out the same list
# for the same block), with the operation of the call they open (None: not a
# data call). Kept with the list, so that its id is not another's.
_MAX_KNOWN: Final = 64


class Reading(Protocol):
    """What is used of ``GrpcProtocol``: its h2 connection, the DATA bytes
    of the read to give back to the connection's window, its flood guard,
    and its answers waiting for window (a connection's WINDOW_UPDATE)."""

    _h2: ServerConnection
    _unacked: int
    _flood: FloodGuard
    _blocked: dict[int, Any]  # streams whose answers wait for window

    def _pump_blocked(self) -> None: ...


class Refusing:
    """A read's refusal: the trailers-only block every data call of it is
    answered with, and what was refused (the caller counts it)."""

    __slots__ = ("block", "counts", "known", "operation_of", "refused", "trailers")

    def __init__(self, operation_of: Callable[[Any], str | None], counts: dict[str, int]) -> None:
        self.operation_of = operation_of  # a request's headers -> its data operation, or None
        self.counts = counts  # operation -> calls refused (added to)
        self.known: dict[int, tuple[Any, str | None]] = {}
        self.trailers: Any = None  # the refusal's trailers, and their HPACK block
        self.block = b""
        self.refused = 0  # calls refused by the last ``refuse_leading``


def refuse_leading(proto: Reading, data: Any, refusing: Refusing) -> Any:
    """Refuse the leading unary data calls of ``data`` (see the module
    docstring); what is left of it for the ordinary path."""
    refusing.refused = 0
    conn = proto._h2
    buffer = conn.incoming_buffer
    block = refusing.block
    if (
        conn._held
        or buffer._preamble_len
        or buffer._headers_buffer
        or buffer._data
        or conn.state_machine.state is not ConnectionState.SERVER_OPEN
        or conn.encoder.header_table.resized
        or len(block) > conn.max_outbound_frame_size
    ):
        return data
    view = memoryview(data)
    end = len(view)
    pos = 0
    unpack = _FRAME_HEADER.unpack_from
    max_length = conn.max_inbound_frame_size
    largest = min(max_length, conn.local_settings.initial_window_size)  # a request's DATA frame
    window = conn._inbound_flow_control_window_manager
    room = before = window.current_window_size  # the connection's receive window, as the read takes it
    outbound = conn.outbound_flow_control_window
    send_window = conn.remote_settings.initial_window_size  # a new stream's
    plain_block = conn._decoder.plain
    guard = proto._flood
    known = refusing.known
    counts = refusing.counts
    highest = conn.highest_inbound_stream_id
    # The header block of the call before, as bytes, and what it was found
    # to be: a client sends the same block for calls of the same method
    # (every header indexed), read again here by a comparison in place.
    same = b""
    same_expected: int | None = None
    operation = ""  # (before the first block: no calls)
    run_from = 0  # the first of the calls refused since ``operation`` was found
    as_bytes = type(data) is bytes
    sids: list[int] = []
    updates = 0  # WINDOW_UPDATE frames taken in
    connection_updates = 0
    ahead: tuple[int, int, int] | None = None  # the header of the frame at ``pos``, if unpacked
    while end - pos >= 2 * _FRAME_HEAD:
        head, flags, sid = ahead or unpack(view, pos)
        length = head >> 8
        if head & 0xFF != _HEADERS or flags != _END_HEADERS or length > max_length:
            break
        sid &= 0x7FFFFFFF
        if not sid & 1 or sid <= highest:
            break
        at = block_end = pos + _FRAME_HEAD + length
        if end - at < _FRAME_HEAD:
            break
        head, flags, body_sid = unpack(view, at)
        # grpc-core's clients send a WINDOW_UPDATE for the stream between its
        # HEADERS and DATA, and one for the connection after them: taken in
        # as the plain path takes them (valid, within the flood rule).
        call_updates = 0
        if head == _WINDOW_UPDATE_HEAD and body_sid & 0x7FFFFFFF == sid:
            call_updates = 1
            if (
                end - at < 2 * _FRAME_HEAD + 4
                or not 0 < _increment(view, at) <= _LARGEST_WINDOW - send_window
                or not guard.window_updates_allowed(updates + 1, len(sids) + 1)
            ):
                break
            at += _FRAME_HEAD + 4
            head, flags, body_sid = unpack(view, at)
        size = head >> 8
        stop = at + _FRAME_HEAD + size
        if (
            head & 0xFF != _DATA
            or flags != _END_STREAM
            or body_sid & 0x7FFFFFFF != sid
            or stop > end
            or size > largest
            or size > room
        ):
            break
        increment = 0
        ahead = None
        if end - stop >= _FRAME_HEAD + 4:
            ahead = unpack(view, stop)  # the next call's HEADERS, or the connection's WINDOW_UPDATE
            if ahead[0] == _WINDOW_UPDATE_HEAD and not ahead[2] & 0x7FFFFFFF:
                increment = _increment(view, stop)
                if not 0 < increment <= _LARGEST_WINDOW - outbound or not guard.window_updates_allowed(
                    updates + call_updates + 1, len(sids) + 1
                ):
                    break
                call_updates += 1
                ahead = None
        at = pos + _FRAME_HEAD
        if not (
            length == len(same) and (data.startswith(same, at) if as_bytes else view[at:block_end] == same)
        ):
            request_block = bytes(view[at:block_end])
            decoded = plain_block(request_block)
            if decoded is None:
                break
            headers, expected = decoded
            seen = known.get(id(headers))
            if seen is None or seen[0] is not headers:
                if len(known) >= _MAX_KNOWN:
                    known.clear()
                seen = known[id(headers)] = (headers, refusing.operation_of(headers))
            found = seen[1]
            if found is None:
                break
            if len(sids) > run_from:
                counts[operation] = counts.get(operation, 0) + len(sids) - run_from
                run_from = len(sids)
            same, same_expected, operation = request_block, expected, found
        if same_expected is not None and same_expected != size:
            break
        # What the plain path's HEADERS, DATA and WINDOW_UPDATEs and the refusal leave.
        highest = sid
        room -= size
        updates += call_updates
        if increment:
            outbound += increment
            connection_updates += 1
            stop += _FRAME_HEAD + 4
        sids.append(sid)
        pos = stop
    n = len(sids)
    if not n:
        return data
    if n > run_from:
        counts[operation] = counts.get(operation, 0) + n - run_from
    refusing.refused = n
    head = len(block).to_bytes(3, "big") + _FINAL_FLAGS
    out = conn._data_to_send
    # (As ``send_refusal`` keeps it: refusals alone may be held.)
    if conn._refusal_bytes == len(out) and not conn._segments:
        conn._refusal_bytes += n * (_FRAME_HEAD + len(block))
    else:
        conn._refusal_bytes = -1
    # Each refusal a HEADERS frame: ``head``, its stream id, ``block``.
    out += head + (block + head).join([sid.to_bytes(4, "big") for sid in sids]) + block
    conn.highest_inbound_stream_id = highest
    window.current_window_size = room
    conn.outbound_flow_control_window = outbound
    proto._unacked += before - room
    guard.opened += n
    guard.empty_run = 0
    if updates:
        guard.window_updates(updates)  # (each was allowed as it was read)
        if connection_updates and proto._blocked:
            proto._pump_blocked()  # (the plain path's WINDOW_UPDATE entry)
    return view[pos:]


def _increment(view: memoryview, at: int) -> int:
    """The window increment of the WINDOW_UPDATE frame at ``at``."""
    return int.from_bytes(view[at + _FRAME_HEAD : at + _FRAME_HEAD + 4], "big") & 0x7FFFFFFF
