"""The send side of ``h2conn.ServerConnection``: answers written without h2's frame machinery.

h2's ``send_headers``/``send_data`` build frame objects, run generic header
processing and log each frame; for an OK unary answer that was about three
times the work of writing the frames' bytes. So the common answers are
written here as bytes, while h2's stream state machine and flow-control
windows are driven exactly as h2's own calls would drive them, so h2's view
of the connection stays true:

- ``send_plain_unary``: a whole OK answer of one message (headers, DATA,
  trailers) whose message fits both flow-control windows. A message within
  one frame is copied into h2's output buffer. A larger one is not copied at
  all: its DATA frames' 9-byte headers and views of the serialized message
  are queued as separate buffers (``_segments``), in order with h2's own
  output, for the writer to hand to the kernel in one ``sendmsg``
  (``prism.rpc.writev``). Copying a 1 MiB answer into h2's buffer, then out
  of it into ``bytes`` (h2's ``data_to_send``), and the framing before that,
  were most of a large GetItems' CPU.
- ``send_plain_data``: as much of a call's queued output as the windows
  allow, in DATA frames (streaming answers, and answers that wait for window).
- ``send_plain_final``: a trailers-only answer (an error status before any
  message: a refusal, NOT_FOUND, ...), one HEADERS frame whose header
  fields are each encoded once (``final_block``). Through h2 it
  cost a refused call more than serving a SQLite read did, so a worker
  shedding load spent more on each refusal than on a call.

``buffers_to_send`` takes everything queued, as buffers in wire order;
``data_to_send`` (h2's API) the same joined, for callers that want bytes.
"""

from __future__ import annotations

from typing import Final

import h2.connection
from h2.connection import ConnectionInputs, ConnectionState
from h2.stream import StreamClosedBy, StreamInputs, StreamState

from prism.rpc.compression import ACCEPT_ENCODING, ENCODINGS
from prism.rpc.hpack_cache import stateless_block

# One piece of output: h2's buffer, a frame header, a view of a message.
Chunk = bytes | bytearray | memoryview

# The header lists of every successful answer: the response headers (which
# advertise the encodings requests may use: prism.rpc.compression), and the
# trailers of an OK status.
RESPONSE_HEADERS: Final = (
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", ACCEPT_ENCODING),
)
TRAILERS_OK: Final = ((b"grpc-status", b"0"),)
# The response headers of a call whose answers are compressed, by encoding
# (h2's path sends them: the HPACK cache has their blocks).
ENCODED_RESPONSE_HEADERS: Final = {e: (*RESPONSE_HEADERS, (b"grpc-encoding", e)) for e in sorted(ENCODINGS)}

# Their HPACK blocks, encoded once, and the 9-byte frame headers (length,
# type, flags; the stream id follows) that carry them in a plain unary answer.
_RESPONSE_BLOCK: Final = stateless_block(RESPONSE_HEADERS)
_TRAILERS_BLOCK: Final = stateless_block(TRAILERS_OK)
_HEADERS_FRAME_HEAD: Final = len(_RESPONSE_BLOCK).to_bytes(3, "big") + b"\x01\x04"  # END_HEADERS
_TRAILERS_FRAME_HEAD: Final = len(_TRAILERS_BLOCK).to_bytes(3, "big") + b"\x01\x05"  # + END_STREAM
_FINAL_FRAME_FLAGS: Final = b"\x01\x05"  # HEADERS, END_HEADERS | END_STREAM
# A stream whose request has ended: an answer's frames close it.
_ANSWERABLE: Final = StreamState.HALF_CLOSED_REMOTE
_MESSAGE_PREFIX: Final = 5  # gRPC's: compressed flag, 4-byte length
_DATA_NO_FLAGS: Final = b"\x00\x00"


# Header fields of trailers-only answers seen, and their stateless HPACK
# encodings. A block of such fields is their encodings joined (none touches
# the dynamic table), so each field is encoded once: a worker's error
# answers are few distinct statuses and messages (naming a namespace or a
# limit), with a pushback that varies by the millisecond. The bound is only
# against messages that carry a varying figure.
_FIELDS: dict[tuple[bytes, bytes], bytes] = {}
_MAX_FIELDS: Final = 1024


def final_block(headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The HPACK block of a trailers-only answer, from each field's encoding, made once."""
    fields = _FIELDS
    out = []
    for field in headers:
        encoded = fields.get(field)
        if encoded is None:
            if len(fields) >= _MAX_FIELDS:
                fields.clear()
            encoded = fields[field] = stateless_block((field,))
        out.append(encoded)
    return b"".join(out)


class PlainSender(h2.connection.H2Connection):
    """h2's connection with the plain send paths (see the module docstring)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._init_sender()

    def _init_sender(self) -> None:
        # Output queued before what h2's buffer (``_data_to_send``) holds now:
        # h2's earlier buffers and the frames of large answers, in wire order,
        # and their bytes (held until written: ``unsent_bytes``).
        self._segments: list[Chunk] = []
        self._segment_bytes = 0
        # DATA frames queued to the client by every send path, for the
        # WINDOW_UPDATE flood limit (``prism.rpc.flood``).
        self.data_frames_sent = 0
        # The bytes of refusals (``send_refusal``) queued since the queue was
        # last emptied, while nothing else was: else -1 (``refusals_only``).
        self._refusal_bytes = 0

    @property
    def unsent_bytes(self) -> int:
        """Bytes queued to send and not yet taken by the writer."""
        return self._segment_bytes + len(self._data_to_send)

    @property
    def refusals_only(self) -> bool:
        """Whether what is queued to send is refusals and nothing else (``prism.rpc.held``)."""
        return 0 < self._refusal_bytes == len(self._data_to_send) and not self._segments

    def buffers_to_send(self) -> list[Chunk]:
        """Everything queued to send, in order, as buffers (nothing copied); the queue is emptied."""
        self._refusal_bytes = 0
        out = self._segments
        if self._data_to_send:
            out.append(self._data_to_send)
            self._data_to_send = bytearray()
        if out:
            self._segments = []
            self._segment_bytes = 0
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        if amount is None:
            return b"".join(self.buffers_to_send())
        # h2's partial reads: not ours to split, so join first; what is left
        # is not known to be refusals alone.
        self._data_to_send = bytearray(b"".join(self.buffers_to_send()))
        self._refusal_bytes = -1
        return super().data_to_send(amount)

    def send_plain_unary(self, sid: int, payload: bytes) -> bool:
        """Queue a whole OK answer of one message (headers, DATA, trailers) on
        stream ``sid`` if it is the common case: the stream open, the message
        within both flow-control windows, the connection open and the HPACK
        table size unchanged. False (nothing done) otherwise; the caller then
        goes through h2's ``send_headers``/``send_data``.
        """
        n = len(payload) + _MESSAGE_PREFIX
        stream = self.streams.get(sid)
        if (
            stream is None
            or n > stream.outbound_flow_control_window
            or n > self.outbound_flow_control_window
            or self.state_machine.state is not ConnectionState.SERVER_OPEN
            or self.encoder.header_table.resized
        ):
            return False
        size = self.max_outbound_frame_size
        machine = stream.state_machine
        if machine.state is _ANSWERABLE and machine.headers_sent is None and machine.client is False:
            # The usual stream (the request ended, nothing sent yet): what the
            # inputs below do to it, less the events nobody reads (~2 us a call).
            machine.headers_sent = machine.trailers_sent = True
            machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
            machine.state = StreamState.CLOSED
        else:
            machine.process_input(StreamInputs.SEND_HEADERS)
            machine.process_input(StreamInputs.SEND_DATA)
            machine.process_input(StreamInputs.SEND_HEADERS)
            machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= n
        self.outbound_flow_control_window -= n
        self.data_frames_sent += -(-n // size)
        sid_bytes = sid.to_bytes(4, "big")
        if n <= size:
            self._data_to_send += b"".join(
                (
                    _HEADERS_FRAME_HEAD,
                    sid_bytes,
                    _RESPONSE_BLOCK,
                    n.to_bytes(3, "big"),
                    _DATA_NO_FLAGS,
                    sid_bytes,
                    b"\x00",
                    len(payload).to_bytes(4, "big"),
                    payload,
                    _TRAILERS_FRAME_HEAD,
                    sid_bytes,
                    _TRAILERS_BLOCK,
                )
            )
            return True
        # Headers, then the first DATA frame's header and the message prefix,
        # closing h2's buffer as it is; then frame headers and views of the
        # message; then the trailers, in h2's next buffer.
        out = self._data_to_send
        out += b"".join(
            (
                _HEADERS_FRAME_HEAD,
                sid_bytes,
                _RESPONSE_BLOCK,
                size.to_bytes(3, "big"),
                _DATA_NO_FLAGS,
                sid_bytes,
            )
        )
        out += b"\x00" + len(payload).to_bytes(4, "big")
        segments = self._segments
        self._segment_bytes += len(out) + len(payload) + 9 * (-(-n // size) - 1)
        segments.append(out)
        head = _DATA_NO_FLAGS + sid_bytes
        view = memoryview(payload)
        pos = size - _MESSAGE_PREFIX
        segments.append(view[:pos])
        end = len(payload)
        while pos < end:
            m = min(size, end - pos)
            segments.append(m.to_bytes(3, "big") + head)
            segments.append(view[pos : pos + m])
            pos += m
        self._data_to_send = bytearray(_TRAILERS_FRAME_HEAD + sid_bytes + _TRAILERS_BLOCK)
        return True

    def send_plain_final(self, sid: int, headers: tuple[tuple[bytes, bytes], ...]) -> bool:
        """Queue a trailers-only answer on stream ``sid``: one HEADERS frame
        ending the stream. False (nothing done) unless the stream is open, the
        connection too, the HPACK table size unchanged and the block within
        one frame; the caller then goes through h2's ``send_headers``."""
        stream = self.streams.get(sid)
        if (
            stream is None
            or self.state_machine.state is not ConnectionState.SERVER_OPEN
            or self.encoder.header_table.resized
        ):
            return False
        block = final_block(headers)
        if len(block) > self.max_outbound_frame_size:
            return False
        machine = stream.state_machine
        if machine.state is _ANSWERABLE and machine.headers_sent is None and machine.client is False:
            machine.headers_sent = True  # (as send_plain_unary does)
            machine.stream_closed_by = StreamClosedBy.SEND_END_STREAM
            machine.state = StreamState.CLOSED
        else:
            machine.process_input(StreamInputs.SEND_HEADERS)  # raises as h2's send_headers would
            machine.process_input(StreamInputs.SEND_END_STREAM)
        self._data_to_send += b"".join(
            (len(block).to_bytes(3, "big"), _FINAL_FRAME_FLAGS, sid.to_bytes(4, "big"), block)
        )
        return True

    def send_refusal(self, sid: int, headers: tuple[tuple[bytes, bytes], ...]) -> bool:
        """Queue a trailers-only answer on stream ``sid``, which h2 does not
        hold (a request read whole and refused as it was read): the frame
        ``send_plain_final`` would write, with no state to drive. False
        (nothing done) where that one would be False."""
        if self.state_machine.state is not ConnectionState.SERVER_OPEN or self.encoder.header_table.resized:
            return False
        block = final_block(headers)
        if len(block) > self.max_outbound_frame_size:
            return False
        out = self._data_to_send
        if self._refusal_bytes == len(out) and not self._segments:
            self._refusal_bytes += 9 + len(block)
        else:
            self._refusal_bytes = -1
        out += b"".join((len(block).to_bytes(3, "big"), _FINAL_FRAME_FLAGS, sid.to_bytes(4, "big"), block))
        return True

    def send_plain_data(self, sid: int, data: bytearray) -> int | None:
        """Queue as much of ``data`` on stream ``sid`` as both flow-control
        windows allow, in DATA frames of the peer's maximum frame size,
        written straight into h2's output buffer; the number of bytes queued
        (0: no window now). None when the stream is gone or the connection is
        not open, and the caller goes through h2's ``send_data`` (which raises
        as it should).

        The frames are the bytes h2's ``send_data`` would write, and h2's
        connection and stream state machines and windows are driven exactly
        as it drives them, frame by frame; its per-frame objects, checks and
        logging were most of a large answer's cost.
        """
        stream = self.streams.get(sid)
        if stream is None or self.state_machine.state is not ConnectionState.SERVER_OPEN:
            return None
        room = min(len(data), stream.outbound_flow_control_window, self.outbound_flow_control_window)
        if room <= 0:
            return 0
        size = self.max_outbound_frame_size
        head = _DATA_NO_FLAGS + sid.to_bytes(4, "big")  # type DATA, no flags, the stream
        connection_input = self.state_machine.process_input
        stream_input = stream.state_machine.process_input
        out = self._data_to_send
        sent = 0
        with memoryview(data) as view:  # released before the caller trims ``data``
            while sent < room:
                n = min(size, room - sent)
                connection_input(ConnectionInputs.SEND_DATA)
                stream_input(StreamInputs.SEND_DATA)
                out += n.to_bytes(3, "big") + head
                out += view[sent : sent + n]
                sent += n
        stream.outbound_flow_control_window -= sent
        self.outbound_flow_control_window -= sent
        self.data_frames_sent += -(-sent // size)  # the frames just queued
        return sent
