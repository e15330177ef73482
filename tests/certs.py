"""Certificates for the TLS tests, made by trustme: the server's files, clients' certificates and contexts."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import grpc
import trustme

from prism.config.security import TlsConfig

# What the test server's certificate covers: the address clients dial, and any
# tenant's name under prism.test (SNI hand-off: payments.prism.test).
SERVER_NAMES = ("prism.test", "*.prism.test", "127.0.0.1")


def server_files(
    directory: Path,
    ca: trustme.CA,
    *,
    client_ca: trustme.CA | None = None,
    handshake_timeout_s: float = 10.0,
) -> TlsConfig:
    """Write a certificate for SERVER_NAMES signed by ``ca`` (and ``client_ca``'s
    certificate, for mTLS) under ``directory``; the ``[tls]`` section naming them."""
    directory.mkdir(parents=True, exist_ok=True)
    write_server_cert(directory, ca)
    client_ca_file = ""
    if client_ca is not None:
        client_ca.cert_pem.write_to_path(str(directory / "clients.pem"))
        client_ca_file = str(directory / "clients.pem")
    return TlsConfig(
        str(directory / "server.pem"),
        str(directory / "server.key"),
        client_ca_file,
        handshake_timeout_s=handshake_timeout_s,
    )


def write_server_cert(directory: Path, ca: trustme.CA) -> trustme.LeafCert:
    """(Re)write server.pem and server.key, as a rotation does; the new certificate."""
    cert = ca.issue_cert(*SERVER_NAMES)
    for name, blob in (
        ("server.pem", cert.private_key_and_cert_chain_pem),
        ("server.key", cert.private_key_pem),
    ):
        tmp = directory / f"{name}.tmp"
        blob.write_to_path(str(tmp))
        tmp.replace(directory / name)  # atomic: a reload never reads half a file
    return cert


def tls_toml(tls: TlsConfig) -> str:
    """The ``[tls]`` section; with a client CA (which turns access control on,
    deny by default) also a rule that lets every verified client read and
    write everything: these tests are about the transport, not the rules."""
    toml = (
        "[tls]\n"
        f'cert_file = "{tls.cert_file}"\n'
        f'key_file = "{tls.key_file}"\n'
        f'client_ca_file = "{tls.client_ca_file}"\n'
        f"handshake_timeout_s = {tls.handshake_timeout_s}\n"
    )
    if tls.client_ca_file:
        toml += '[[access]]\nprincipals = ["*"]\nnamespaces = ["*"]\nallow = ["read", "write"]\n'
    return toml


def client_cert(ca: trustme.CA, name: str, *, expired: bool = False) -> trustme.LeafCert:
    """A client certificate whose subject CN is ``name`` (its principal)."""
    if not expired:
        return ca.issue_cert(f"{name}.clients.prism.test", common_name=name)
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_cert(
        f"{name}.clients.prism.test",
        common_name=name,
        not_before=now - datetime.timedelta(days=2),
        not_after=now - datetime.timedelta(days=1),
    )


def client_context(
    ca: trustme.CA, cert: trustme.LeafCert | None = None, *, alpn: tuple[str, ...] = ("h2",)
) -> ssl.SSLContext:
    """A Python ssl client context trusting ``ca``, presenting ``cert``, offering ``alpn``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if cert is not None:
        cert.configure_cert(context)
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


def grpc_credentials(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> grpc.ChannelCredentials:
    """grpcio credentials trusting ``ca``, presenting ``cert`` (mTLS) when given."""
    if cert is None:
        return grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem.bytes(),
        private_key=cert.private_key_pem.bytes(),
        certificate_chain=b"".join(pem.bytes() for pem in cert.cert_chain_pems),
    )
