"""The request half of ``GrpcProtocol``: request bytes into messages, under
flow control that holds the server to its buffer budgets, sans I/O.

``GrpcProtocol`` (``protocol.py``) parses frames and starts calls; this base
class takes each call's DATA: it cuts gRPC messages out of it (the size limit
checked on the 5-byte prefix, before anything is allocated for the message),
charges what it holds to the connection's ``ConnectionBudget`` and decides
when the client may send more (``prism.rpc.budget`` says how that bounds a
connection). A unary call's one message is in ``call.messages`` when its
stream ends (a message that came in pieces is copied together once, or
handed over as ``Pieces``: ``prism.rpc.pieces``); a streaming call's messages
wait, unsplit, in ``call._inq`` until its handler takes them with
``next_message``.

The bytes given to ``receive_data`` must not change afterwards: pieces of a
message under way are views of them (a ``bytes`` per read, as the server's
reader gives; anything else is copied at the end of the read). A view keeps
its whole read alive, so the reads a connection's views pin are bounded by
the bytes those views hold (``prism.rpc.pinned``).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Final

import h2.exceptions
from h2.stream import StreamState

from prism.errors import StatusCode
from prism.rpc.budget import INITIAL_STREAM_WINDOW, ConnectionBudget
from prism.rpc.call import Call
from prism.rpc.compression import MessageError, inflate
from prism.rpc.h2conn import ServerConnection
from prism.rpc.pieces import Pieces
from prism.rpc.pinned import PinnedReads

_PREFIX_LEN: Final = 5
# A streaming call's window is topped up once it has this much to give back
# (one WINDOW_UPDATE per consumed message would be a frame per message).
_TOP_UP_AT: Final = INITIAL_STREAM_WINDOW // 4
Events = list[tuple[int, Call | None]]
CALL_MESSAGE: Final = 1  # (protocol.py's event kinds, repeated to avoid an import cycle)
CALL_END: Final = 2


class Requests(PinnedReads):
    """Request input for the calls of one connection (see the module docstring)."""

    _h2: ServerConnection
    calls: dict[int, Call]
    max_message_bytes: int
    budget: ConnectionBudget
    _piecewise_paths: AbstractSet[bytes]
    _unacked: int  # DATA bytes of the current read, for the connection's window
    # Calls whose stream waits for window the budget had no room for (FIFO).
    _waiting: dict[int, Call]
    # Called when something was queued outside a ``receive_data`` (a window
    # granted on a release): the server's writer wakes.
    on_output: Callable[[], None]

    if TYPE_CHECKING:

        def send_error(
            self, call: Call, status: StatusCode, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
        ) -> None: ...  # Responses'

    def _on_data(self, sid: int, data: Any, length: int, ended: bool, out: Events) -> None:
        # The connection's window goes back as a read is taken in (once per
        # read, ``GrpcProtocol.receive_data``): what arrives is charged
        # below, or dropped (a closed or failed stream).
        self._unacked += length
        call = self.calls.get(sid)
        if call is not None and not call._failed:
            if length:
                credit = call._credit
                if credit >= length:
                    call._credit = credit - length
                else:
                    call._credit = 0
                    self.budget.charge(length - credit)
                    call._charged += length - credit
            if data:
                q = call._inq
                if q is not None:
                    if type(data) is list:  # a read's consecutive frames (prism.rpc.h2conn.PlainFrame)
                        for piece in data:
                            q += piece
                    else:
                        q += data
                    self._top_up(call)
                    out.append((CALL_MESSAGE, call))
                elif type(data) is list:
                    parts = call._parts
                    have = call._inlen
                    if parts is not None and call._need and have + length < call._need:
                        # Views that go on a message and do not end it (of
                        # plain frames: ``length`` is theirs): the usual read
                        # of a large message, taken at once.
                        parts += data
                        call._inlen = have + length
                        if not call._fresh:
                            self._viewers.append(call)
                        call._fresh += length
                    else:
                        for piece in data:
                            self._take_data(call, piece, out)
                            if call._failed:
                                break
                else:
                    self._take_data(call, data, out)
        if ended:
            self._end_call(sid, out)

    def _take_data(self, call: Call, data: Any, out: Events) -> None:
        # A message within one frame is copied out of it. A message that
        # spans frames needs the window for all of it (asked for once its
        # prefix says its size), and is kept as the pieces it comes in, views
        # of the bytes read (see the module docstring for when they are
        # copied instead), until it is whole: then it is copied together once
        # (``_whole``).
        parts = call._parts
        if parts is not None:
            have = call._inlen
            need = call._need
            n = len(data)
            if need and have + n <= need:
                parts.append(data)
                call._inlen = have + n
                if type(data) is memoryview:
                    if not call._fresh:
                        self._viewers.append(call)
                    call._fresh += n
                if have + n == need:
                    self._whole(call, out)
                return
            # The prefix was split, or the frame goes on past the message.
            data = b"".join((*parts, data))
            call._parts = None
            self._let_go_views(call)
        n = len(data)
        pos = 0
        while n - pos >= _PREFIX_LEN:
            flag = data[pos]
            if flag and not _compressed(call, flag):
                self.send_error(call, StatusCode.INTERNAL, _flag_error(flag))
                return
            length = int.from_bytes(data[pos + 1 : pos + _PREFIX_LEN], "big")
            if length > self.max_message_bytes:
                self._too_large(call, length)
                return
            end = pos + _PREFIX_LEN + length
            if end > n:
                break
            if flag:
                message = self._inflate(call, data[pos + _PREFIX_LEN : end])
                if message is None:
                    return
                call.messages.append(message)
            else:
                call.messages.append(bytes(data[pos + _PREFIX_LEN : end]))
            out.append((CALL_MESSAGE, call))
            pos = end
        if pos < n:
            rest = n - pos
            piece = data[pos:] if pos else data
            if type(piece) is memoryview:
                if not call._fresh:
                    self._viewers.append(call)
                call._fresh += rest
            call._parts = [piece]
            call._inlen = rest
            call._need = 0
            if rest >= _PREFIX_LEN:
                call._need = _PREFIX_LEN + int.from_bytes(data[pos + 1 : pos + _PREFIX_LEN], "big")
                self._ask_window(call, call._need - rest)

    def _inflate(self, call: Call, data: Any) -> bytes | None:
        """A unary call's compressed message, inflated, its growth charged to
        the budget while the call holds it; None: the call is answered with
        why not (``prism.rpc.compression``)."""
        assert call._encoding is not None
        try:
            message = inflate(call._encoding, data, self.max_message_bytes)
        except MessageError as exc:
            self.send_error(call, exc.grpc_status, str(exc))
            return None
        growth = len(message) - len(data)
        if growth > 0:
            self.budget.charge(growth)
            call._charged += growth
        return message

    def _whole(self, call: Call, out: Events) -> None:
        """A message that came in pieces is whole: to ``call.messages``, joined
        (or as ``Pieces``, for a method whose decoder reads them)."""
        parts = call._parts
        assert parts is not None
        call._parts = None
        compressed = parts[0][0]  # (its flag, checked with its prefix)
        parts[0] = memoryview(parts[0])[_PREFIX_LEN:]
        size = call._need - _PREFIX_LEN
        if compressed:  # never Pieces: inflated whole, from the joined bytes
            joined = b"".join(parts)
            self._let_go_views(call)
            message = self._inflate(call, joined)
            if message is None:
                return
            call.messages.append(message)
        elif call.path in self._piecewise_paths:
            call.messages.append(Pieces(parts, size))  # its views held until the call lets go
        else:
            call.messages.append(b"".join(parts))
            self._let_go_views(call)
        out.append((CALL_MESSAGE, call))

    def _too_large(self, call: Call, length: int) -> None:
        self.send_error(
            call,
            StatusCode.RESOURCE_EXHAUSTED,
            f"message of {length} bytes exceeds the maximum of {self.max_message_bytes}",
        )

    def _end_call(self, sid: int, out: Events) -> None:
        call = self.calls.get(sid)
        if call is None or call._failed:
            return
        call.half_closed = True
        self._waiting.pop(sid, None)
        if call._credit:  # window it will never use
            call._charged -= call._credit
            self.budget.release(call._credit)
            call._credit = 0
        if call._parts is not None:
            self.send_error(call, StatusCode.INVALID_ARGUMENT, "stream ended inside a message (truncated)")
            return
        out.append((CALL_END, call))

    # -- streaming requests ----------------------------------------------------

    def next_message(self, call: Call) -> bytes | None:
        """The next whole message of a streaming request, taken from its
        buffer (its bytes released, the client's window topped up); None if
        none has come whole yet. Raises ValueError for a message the server
        does not take, or MessageError for one it cannot inflate (the
        caller fails the call with either)."""
        q = call._inq
        if q is None or call.done:
            return None
        pos = call._inpos
        if len(q) - pos < _PREFIX_LEN:
            return None
        flag = q[pos]
        if flag and not _compressed(call, flag):
            raise MessageError(StatusCode.INTERNAL, _flag_error(flag))
        length = int.from_bytes(q[pos + 1 : pos + _PREFIX_LEN], "big")
        if length > self.max_message_bytes:
            raise ValueError(f"message of {length} bytes exceeds the maximum of {self.max_message_bytes}")
        end = pos + _PREFIX_LEN + length
        if end > len(q):
            return None
        if flag:
            assert call._encoding is not None
            with memoryview(q) as view:  # (released before q is trimmed below)
                message = inflate(call._encoding, view[pos + _PREFIX_LEN : end], self.max_message_bytes)
        else:
            message = bytes(q[pos + _PREFIX_LEN : end])
        if end == len(q):
            q.clear()
            end = 0
        elif end > 4096 and end * 2 > len(q):
            del q[:end]
            end = 0
        call._inpos = end
        taken = _PREFIX_LEN + length
        call._charged -= taken
        self.budget.release(taken)
        self._top_up(call)
        return message

    def stream_tail(self, call: Call) -> int:
        """Bytes of a streaming request left unconsumed (a truncated message, once it has ended)."""
        return 0 if call._inq is None else len(call._inq) - call._inpos

    def _top_up(self, call: Call) -> None:
        # Keep what the client may send, with what waits unconsumed, at the
        # initial window, or at the whole next message if that is larger.
        q = call._inq
        assert q is not None
        buffered = len(q) - call._inpos
        want = INITIAL_STREAM_WINDOW - buffered
        if buffered >= _PREFIX_LEN:
            pos = call._inpos
            need = _PREFIX_LEN + int.from_bytes(q[pos + 1 : pos + _PREFIX_LEN], "big")
            if need > self.max_message_bytes + _PREFIX_LEN:
                return  # refused when its handler reaches it
            if need - buffered > want:
                self._ask_window(call, need - buffered)
                return
        stream = self._h2.streams.get(call.stream_id)
        if stream is not None and want - stream._inbound_window_manager.current_window_size >= _TOP_UP_AT:
            self._ask_window(call, want)

    # -- window grants ---------------------------------------------------------

    def _ask_window(self, call: Call, want: int) -> None:
        """Let the client send ``want`` more bytes on the call's stream, if the
        budgets have room for them; else the stream waits for a release."""
        if self._waiting:
            # First come, first served: a large message waiting is not
            # overtaken for ever by smaller ones.
            call._wants = max(call._wants, want)
            self._wait(call)
            return
        if not self._grant(call, want):
            call._wants = want
            self._wait(call)

    def _grant(self, call: Call, want: int) -> bool:
        stream = self._h2.streams.get(call.stream_id)
        if stream is None or stream.state_machine.state is not StreamState.OPEN or call.done:
            return True  # nothing more comes on it: nothing to wait for
        increment = want - stream._inbound_window_manager.current_window_size
        if increment <= 0:
            return True
        if not self.budget.room(increment):
            return False
        try:
            self._h2.increment_flow_control_window(increment, call.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
            return True
        self.budget.charge(increment)
        call._charged += increment
        call._credit += increment
        return True

    def _wait(self, call: Call) -> None:
        self._waiting[call.stream_id] = call
        self.budget.worker.waiting[self.budget] = self.retry_waiting

    def retry_waiting(self) -> None:
        """Grant the waiting streams their window, in order, while there is room."""
        waiting = self._waiting
        granted = False
        while waiting:
            sid, call = next(iter(waiting.items()))
            if not self._grant(call, call._wants):
                break
            del waiting[sid]
            call._wants = 0
            granted = True
        if not waiting:
            self.budget.worker.waiting.pop(self.budget, None)
        if granted:
            self.on_output()

    def release_request(self, call: Call) -> None:
        """A unary call's handler is done with its request: release what it holds."""
        self._drop_input(call)

    def _drop_input(self, call: Call) -> None:
        """The call is over: release what its request holds."""
        self._waiting.pop(call.stream_id, None)
        charged = call._charged
        if charged:
            call._charged = call._credit = 0
            self.budget.release(charged)
        call._parts = None
        self._let_go_views(call)
        if call._inq is not None:
            call._inq = bytearray()
            call._inpos = 0


def _compressed(call: Call, flag: int) -> bool:
    """Whether a message's flag byte (not 0) says compressed, as the call's
    grpc-encoding allows (gRPC's doc/compression.md)."""
    return flag == 1 and call._encoding is not None


def _flag_error(flag: int) -> str:
    if flag != 1:
        return f"message flag {flag} is neither 0 nor 1 (compressed)"
    return "compressed message without grpc-encoding"
