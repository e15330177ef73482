"""The answering half of ``GrpcProtocol``: headers, messages, trailers and
outbound flow control for the calls of one connection, sans I/O.

``GrpcProtocol`` (``protocol.py``) reads requests; this base class holds what
it sends back, so that each module keeps one job. It works on the
connection's h2 state (``_h2``), its open calls (``calls``) and the calls
waiting for flow-control window (``_blocked``), which ``GrpcProtocol`` owns.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import h2.exceptions

from prism.errors import StatusCode
from prism.rpc.budget import ConnectionBudget
from prism.rpc.call import Call
from prism.rpc.compression import frame
from prism.rpc.h2conn import RESPONSE_HEADERS, TRAILERS_OK, ServerConnection
from prism.rpc.h2send import ENCODED_RESPONSE_HEADERS

_UNSAFE: Final = re.compile(rb"[^\x20-\x24\x26-\x7e]")


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode a grpc-message as the gRPC spec asks (UTF-8, then %XX
    for bytes outside printable ASCII and for '%')."""
    raw = message.encode("utf-8", "replace")
    if _UNSAFE.search(raw) is None:  # the common case, checked in C
        return raw
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


# Answers up to this size are not weighed against the budgets: the
# concurrent-stream limit bounds what small answers can hold.
_WEIGHED_ANSWER: Final = 16 * 1024


class Responses:
    """Answers for the calls of one connection (see the module docstring)."""

    _h2: ServerConnection
    calls: dict[int, Call]
    _blocked: dict[int, Call]
    budget: ConnectionBudget
    out_held: int
    writing: int
    compression_min_bytes: int

    if TYPE_CHECKING:

        def _drop_input(self, call: Call) -> None: ...  # Requests'

    @property
    def refusals_only(self) -> bool:
        """Whether all the connection has queued to send is refusals of calls
        as they were read (``_refuse_read``): output that may be held (``prism.rpc.held``)."""
        return self._h2.refusals_only

    def send_unary(self, call: Call, payload: bytes) -> None:
        """Answer a call with one message and status OK."""
        if call.done:
            return
        conn = self._h2
        n = len(payload)
        if n > _WEIGHED_ANSWER and not self._fits(call, n):
            return
        if call._answer_encoding is not None and n >= self.compression_min_bytes:
            self._send_encoded(call, payload)
            call._trailers = TRAILERS_OK
            self._pump(call)
            return
        if conn.send_plain_unary(call.stream_id, payload):
            self._finish(call)
            return
        conn.send_headers(call.stream_id, RESPONSE_HEADERS)
        call._headers_sent = True
        call._out += n.to_bytes(5, "big")  # flag byte 0 + length
        call._out += payload
        self._charge_out(n + 5)
        call._trailers = TRAILERS_OK
        self._pump(call)

    def send_headers(self, call: Call) -> None:
        """Send a streaming response's headers now, before its first message."""
        if not call.done and not call._headers_sent:
            self._send_response_headers(call)
            self._pump(call)

    def send_message(self, call: Call, payload: bytes) -> None:
        """Queue one message of a streaming response."""
        if call.done:
            return
        if call._answer_encoding is not None:
            self._send_encoded(call, payload)
        else:
            if not call._headers_sent:
                self._send_response_headers(call)
            call._out += len(payload).to_bytes(5, "big")  # flag byte 0 + length
            call._out += payload
            self._charge_out(len(payload) + 5)
        self._pump(call)

    def _send_response_headers(self, call: Call) -> None:
        encoding = call._answer_encoding
        headers = RESPONSE_HEADERS if encoding is None else ENCODED_RESPONSE_HEADERS[encoding]
        self._h2.send_headers(call.stream_id, headers)
        call._headers_sent = True

    def _send_encoded(self, call: Call, payload: bytes) -> None:
        """Queue one answer message of a call whose answers are compressed
        (``prism.rpc.compression``), after its headers if they are not sent yet."""
        if not call._headers_sent:
            self._send_response_headers(call)
        prefix, body = frame(call._answer_encoding, payload, self.compression_min_bytes)
        call._out += prefix
        call._out += body
        self._charge_out(len(body) + 5)

    def send_status(
        self, call: Call, status: StatusCode, message: str = "", extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """End a call with trailers (after messages, or trailers-only); ``extra``
        trailers follow the status (a retry pushback)."""
        if call.done or call._trailers is not None:
            return
        if status == StatusCode.OK and not message:
            trailers: tuple[tuple[bytes, bytes], ...] = TRAILERS_OK
        else:
            trailers = ((b"grpc-status", str(int(status)).encode()),)
            if message:
                trailers += ((b"grpc-message", encode_grpc_message(message)),)
            trailers += extra
        if not call._headers_sent:
            # Trailers-only response: one HEADERS frame with everything.
            call._failed = True
            self._send_final_headers(call, RESPONSE_HEADERS[:2] + trailers)
            return
        call._trailers = trailers
        self._pump(call)

    def send_error(
        self, call: Call, status: StatusCode, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        """End a call with an error status; further input for it is ignored."""
        call._failed = True
        self.send_status(call, status, message, extra)

    def _refuse_http(self, call: Call, status: bytes, reason: str) -> None:
        call._failed = True
        self._send_final_headers(
            call,
            (
                (b":status", status),
                (b"content-type", b"text/plain"),
                (b"grpc-status", b"%d" % StatusCode.UNKNOWN),
                (b"grpc-message", encode_grpc_message(reason)),
            ),
        )

    def _send_final_headers(self, call: Call, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        call._headers_sent = True
        self._write_final(call.stream_id, headers)
        self._finish(call)

    def _refuse_read(self, sid: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """Answer ``headers`` (trailers only) on a stream refused as it was
        read: if its request came whole, without h2 ever holding the stream
        (``prism.rpc.h2read``), else as any stream's final answer."""
        conn = self._h2
        if conn.pending_ended(sid) and conn.send_refusal(sid, headers):
            conn.forget_pending(sid)
            return
        conn.open_pending(sid)
        self._write_final(sid, headers)

    def _write_final(self, sid: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        """One HEADERS frame that ends stream ``sid``: plainly when it can be, else by h2."""
        if sid not in self._h2.streams:
            # The client reset it in the same read that opened it, and h2 has
            # already forgotten it (closed streams are swept as new ones open):
            # to h2, a HEADERS frame on it would open a stream of our own.
            return
        try:
            if not self._h2.send_plain_final(sid, headers):
                self._h2.send_headers(sid, headers, end_stream=True)
        except h2.exceptions.StreamClosedError:
            # The client reset the stream in the same read that opened it
            # (h2 has taken in every frame of a read before we answer any).
            pass

    def _finish(self, call: Call) -> None:
        call.done = True
        self.calls.pop(call.stream_id, None)
        self._blocked.pop(call.stream_id, None)
        if call._out:
            self._release_out(len(call._out))
            call._out = bytearray()
        self._drop_input(call)

    def _fits(self, call: Call, n: int) -> bool:
        """Whether a large answer may be queued: always while the connection
        holds no undelivered output (one answer up to max_message_bytes always
        fits), else only within the budgets. If not, the call is answered
        RESOURCE_EXHAUSTED naming the limit, and False."""
        written = self.unwritten()
        unsent = self.out_held + written
        if not unsent or self.budget.room(n + written):
            return True
        limit = self.budget.full(n + written) or "the buffer budget"
        self.send_error(
            call,
            StatusCode.RESOURCE_EXHAUSTED,
            f"an answer of {n} bytes does not fit in {limit}: the client has "
            f"{unsent} bytes of answers it has not read yet",
        )
        return False

    def written(self, n: int) -> None:
        """The writer handed ``n`` more bytes of its batch to the kernel."""
        self.writing -= n

    def unwritten(self) -> int:
        """Bytes queued for the socket or being written (held, though not charged)."""
        return self._h2.unsent_bytes + self.writing

    def _charge_out(self, n: int) -> None:
        self.out_held += n
        self.budget.charge(n)

    def _release_out(self, n: int) -> None:
        self.out_held -= n
        self.budget.release(n)

    def _pump(self, call: Call) -> None:
        """Send as much of a call's queued output as flow control allows."""
        conn = self._h2
        out = call._out
        sid = call.stream_id
        while out:
            sent = conn.send_plain_data(sid, out)
            if sent is None:  # the stream or the connection is not plainly open: h2 decides
                sent = min(len(out), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                if sent > 0:
                    conn.send_data(sid, bytes(out[:sent]))
            if sent <= 0:
                self._blocked[sid] = call
                return
            del out[:sent]
            self._release_out(sent)
        self._blocked.pop(sid, None)
        if call._trailers is not None:
            conn.send_headers(sid, call._trailers, end_stream=True)
            self._finish(call)

    def _pump_blocked(self) -> None:
        for call in list(self._blocked.values()):
            try:
                self._pump(call)
            except h2.exceptions.StreamClosedError:
                self._finish(call)
