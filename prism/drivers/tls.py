"""TLS to a backend, shared by the drivers that speak it themselves (``resp``, ``nats``).

Both verify the server as a browser would: its certificate chains to
``ca_file`` (a PEM bundle; the system's CAs when empty) and names the host
of the URL, which is also sent as SNI. There is no switch to skip the check:
a certificate that does not verify is a connection that fails.

PostgreSQL needs none of this: libpq negotiates TLS itself (``sslmode``,
``sslrootcert`` in the DSN) inside the connection generator ``pg`` drives.
"""

from __future__ import annotations

import ssl

import trio

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class ClientContexts:
    """One client context per CA file, made on first use (loading a CA bundle
    costs more than a connection's handshake) and reused by every connection."""

    def __init__(self, ca_file: str = "") -> None:
        self.ca_file = ca_file
        self._context: ssl.SSLContext | None = None

    def get(self) -> ssl.SSLContext:
        """The context; OSError or ssl.SSLError if ``ca_file`` does not load."""
        if self._context is None:
            self._context = ssl.create_default_context(cafile=self.ca_file or None)
        return self._context


async def start_tls(stream: trio.SocketStream, context: ssl.SSLContext, host: str) -> Stream:
    """``stream`` after a TLS handshake with ``host``: trio.BrokenResourceError
    (its cause the ``ssl.SSLError``) if the server or its certificate fails."""
    tls = trio.SSLStream(stream, context, server_hostname=host)
    await tls.do_handshake()
    return tls


def raw_socket(stream: Stream) -> trio.socket.SocketType:
    """The TCP socket under ``stream``: closing it ends the connection at once,
    without the TLS goodbye an ``aclose`` would wait for."""
    if isinstance(stream, trio.SSLStream):
        return stream.transport_stream.socket
    return stream.socket


def reason(exc: BaseException) -> str:
    """What went wrong, in one line: the ``ssl`` error behind trio's
    ``BrokenResourceError`` when there is one (a certificate that does not
    verify says so)."""
    cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ else exc
    if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
        return f"TLS: certificate verify failed: {cause.verify_message}"
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {cause.reason or cause}"
    return " ".join(str(cause).split()) or type(cause).__name__
