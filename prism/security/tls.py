"""The gRPC port's TLS context.

HTTP/2 over TLS needs ALPN ``h2`` (RFC 9113 section 3.2): it is the only
protocol offered. With a client CA, every client must present a certificate
that CA signed (mTLS); its identity becomes the call's principal when the
call carries no token (``peer_principal``).
"""

from __future__ import annotations

import ssl
from typing import Any

from prism.config.security import TlsConfig

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context from ``tls``'s files; OSError or ssl.SSLError naming the problem."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    # No session tickets to resume from: a resumed session would skip the
    # client certificate check against a client CA that a reload replaced.
    context.options |= ssl.OP_NO_TICKET
    return context


def peer_principal(cert: dict[str, Any] | None) -> str | None:
    """A verified client certificate's identity: its first URI SAN (a SPIFFE
    ID, say), else its subject CN; None without either."""
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            return str(value)
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
