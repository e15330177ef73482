"""gRPC message compression (gRPC's doc/compression.md): gzip and deflate.

A request names its messages' encoding in ``grpc-encoding``; each message
says in its prefix's flag byte whether it is compressed. What the server
does (``prism.rpc.protocol`` and ``prism.rpc.inbound`` for requests,
``prism.rpc.respond`` for answers):

- ``identity``, ``gzip`` and ``deflate`` (zlib's format, as gRPC's
  ``deflate`` is) are taken; any other encoding is UNIMPLEMENTED, with
  ``grpc-accept-encoding`` naming ours. A compressed flag on a call without
  an encoding is INTERNAL, as is a message that does not inflate.
- ``max_message_bytes`` bounds a message before and after inflating. It is
  inflated with zlib's output bound (``max_length``), so a small message that
  would inflate to gigabytes stops at the limit, RESOURCE_EXHAUSTED, having
  made at most the limit's worth of output.
- Answers: a call whose request came compressed, and whose client lists the
  same encoding in its ``grpc-accept-encoding``, has its answers of at least
  ``compression_min_bytes`` compressed with it (as grpc-go's server answers
  in the request's encoding); an answer that does not shrink goes as it is,
  flag 0. Every other call, stock clients' included (they advertise gzip
  but send uncompressed), is answered as before: no compression work, the
  same plain paths. With ``compress_answers = "accepting_clients"`` an
  uncompressed call's answers are compressed too, when its client accepts
  gzip or deflate (``preferred``): bandwidth bought with the worker's CPU.

Inflating and deflating are done inline, in the step that has the whole
message: the server does the rest of a message's work (its decoding, an
answer's serialization) there too.
"""

from __future__ import annotations

import zlib
from typing import Final

from prism.errors import PrismError, StatusCode

# Encoding name -> zlib's wbits for it: gzip's header and trailer, or zlib's.
_WBITS: Final = {b"gzip": 31, b"deflate": 15}
ENCODINGS: Final = frozenset(_WBITS)
IDENTITY: Final = b"identity"
# What every answer's headers advertise, and an unknown encoding's refusal names.
ACCEPT_ENCODING: Final = b"identity,deflate,gzip"
# Answers are deflated at zlib's fastest level: it kept most of level 6's
# saving at half its CPU or less (1 MiB of JSON: 151 KB in 3.1 ms, against
# 136 KB in 6.7 ms), and the server's CPU is what every other call shares.
_LEVEL: Final = 1
# How much of a large answer is deflated to see whether it compresses at all.
_PROBE: Final = 16 * 1024


class MessageError(PrismError):
    """A request message the server cannot take, with the status to answer."""

    def __init__(self, status: StatusCode, message: str) -> None:
        super().__init__(message)
        self.grpc_status = status


# grpc-accept-encoding values seen -> the encoding to answer with (``preferred``).
_PREFERRED: dict[bytes, bytes | None] = {}
_MAX_PREFERRED: Final = 64


def preferred(accept_encoding: bytes) -> bytes | None:
    """The encoding to answer a client with whose ``grpc-accept-encoding``
    is this: gzip, else deflate, else None. (One dict lookup per call: a
    client sends the same value on every call.)"""
    hit = _PREFERRED.get(accept_encoding, b"")
    if hit != b"":
        return hit
    if len(_PREFERRED) >= _MAX_PREFERRED:
        _PREFERRED.clear()
    choice = next((e for e in (b"gzip", b"deflate") if accepts(accept_encoding, e)), None)
    _PREFERRED[bytes(accept_encoding)] = choice
    return choice


def accepts(accept_encoding: bytes | None, encoding: bytes) -> bool:
    """Whether a ``grpc-accept-encoding`` value lists ``encoding``."""
    if accept_encoding is None:
        return False
    return any(e.strip() == encoding for e in bytes(accept_encoding).lower().split(b","))


def inflate(encoding: bytes, data: bytes | bytearray | memoryview, limit: int) -> bytes:
    """The message ``data`` compressed with ``encoding`` (one of ``ENCODINGS``),
    inflated; never more than ``limit`` bytes of output are made. Raises
    MessageError: RESOURCE_EXHAUSTED past ``limit``, INTERNAL for data that
    does not inflate (corrupt, cut short, or followed by more)."""
    inflater = zlib.decompressobj(_WBITS[encoding])
    try:
        # One more byte than allowed tells "over the limit" from "exactly it".
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise MessageError(
            StatusCode.INTERNAL, f"{encoding.decode()} message does not inflate ({exc})"
        ) from None
    if len(out) > limit:
        raise MessageError(
            StatusCode.RESOURCE_EXHAUSTED,
            f"{encoding.decode()} message inflates past the maximum of {limit} bytes",
        )
    if not inflater.eof:
        raise MessageError(StatusCode.INTERNAL, f"{encoding.decode()} message is cut short")
    if inflater.unused_data:
        raise MessageError(StatusCode.INTERNAL, f"{encoding.decode()} message has data after its end")
    return out


def frame(encoding: bytes | None, payload: bytes, min_bytes: int) -> tuple[bytes, bytes]:
    """An answer's 5-byte message prefix and its body: compressed with
    ``encoding`` when there is one, the payload is at least ``min_bytes``
    and compressing shrinks it; else as it is (flag 0).

    A payload larger than ``_PROBE`` is given up on after its first
    ``_PROBE`` bytes if they did not shrink by a tenth: deflating 1 MiB
    that does not compress (random, or compressed already) took ~20 ms, in
    the step every other call on the worker waits behind; the probe ~0.3 ms."""
    n = len(payload)
    if encoding is not None and n >= min_bytes:
        deflater = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS[encoding])
        if n > _PROBE:
            view = memoryview(payload)
            head = deflater.compress(view[:_PROBE]) + deflater.flush(zlib.Z_SYNC_FLUSH)
            if len(head) > _PROBE * 9 // 10:
                return n.to_bytes(5, "big"), payload
            packed = b"".join((head, deflater.compress(view[_PROBE:]), deflater.flush()))
        else:
            packed = deflater.compress(payload) + deflater.flush()
        if len(packed) < n:
            return b"\x01" + len(packed).to_bytes(4, "big"), packed
    return n.to_bytes(5, "big"), payload
