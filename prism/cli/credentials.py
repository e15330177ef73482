"""What a client command proves and trusts: TLS files and a bearer token, from flags or the environment.

- ``--tls-ca FILE`` (``$PRISM_TLS_CA``): the CAs the server's certificate
  must chain to. It turns TLS on.
- ``--cert FILE`` and ``--key FILE`` (``$PRISM_TLS_CERT``, ``$PRISM_TLS_KEY``):
  a client certificate and its key, for a server that asks for one (mTLS).
  They turn TLS on too (the server's certificate is then checked against
  the system's CAs unless ``--tls-ca`` is given).
- ``--token-file FILE`` (``$PRISM_TOKEN_FILE``): a bearer token (a JWT),
  sent as ``authorization: Bearer <token>`` metadata on every call. Only
  over TLS, or in plaintext to this machine: grpcio sends call credentials
  on secure or local channels only, and a token sent in plaintext across a
  network is a token given away.

A flag wins over its variable. Every file is read and checked before the
first call, so a missing, unreadable or malformed one is one line and exit
code 2 (a usage error), never a failed call.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prism.config.fields import parse_host_port
from prism.config.security import is_loopback

if TYPE_CHECKING:
    import grpc

# (argparse dest, flag, environment variable, help); the dests are not the
# flags' names, which commands' own arguments use (``kv put``'s KEY).
OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("tls_ca", "--tls-ca", "PRISM_TLS_CA", "CA certificates (PEM) the server's must chain to; turns TLS on"),
    ("tls_cert", "--cert", "PRISM_TLS_CERT", "client certificate (PEM) for mTLS; needs --key"),
    ("tls_key", "--key", "PRISM_TLS_KEY", "the client certificate's private key (PEM)"),
    ("token_file", "--token-file", "PRISM_TOKEN_FILE", "file holding a bearer token sent with every call"),
)
# ``prism ns list`` talks to the admin port: its own token and CA, so that
# the gRPC port's variables (a caller's JWT) are never sent there.
ADMIN_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "tls_ca",
        "--tls-ca",
        "PRISM_ADMIN_TLS_CA",
        "CA certificates (PEM) of the admin port's [admin.tls]; turns HTTPS on",
    ),
    (
        "token_file",
        "--token-file",
        "PRISM_ADMIN_TOKEN_FILE",
        "file holding the admin token (admin_token_file)",
    ),
)
Options = tuple[tuple[str, str, str, str], ...]
MAX_TOKEN_BYTES = 64 * 1024


class CredentialsError(Exception):
    """Credentials that cannot be used; ``str(exc)`` is the line to print (exit 2)."""


@dataclass(frozen=True)
class Credentials:
    """TLS material and a token, all optional; none of them: plaintext, no token."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        return any(x is not None for x in (self.root_certificates, self.private_key, self.certificate_chain))

    @property
    def identified(self) -> bool:
        """Whether the calls carry an identity (a token or a client certificate)."""
        return self.token is not None or self.certificate_chain is not None


def add_options(parser: argparse.ArgumentParser, options: Options = OPTIONS) -> None:
    for dest, flag, variable, text in options:
        parser.add_argument(flag, dest=dest, metavar="FILE", help=f"{text} (default: ${variable})")


def load(
    args: argparse.Namespace, env: Mapping[str, str], endpoint: str, options: Options = OPTIONS
) -> Credentials:
    """The credentials named by ``args`` (else ``env``), read and checked; CredentialsError if unusable."""
    named: dict[str, tuple[str, str]] = {}  # dest -> (path, how it was named)
    for dest, flag, variable, _ in options:
        path = getattr(args, dest, None)
        if path:
            named[dest] = (path, flag)
        elif env.get(variable):
            named[dest] = (env[variable], f"${variable}")
    if ("tls_cert" in named) != ("tls_key" in named):
        raise CredentialsError("prism: --cert and --key go together (a certificate and its private key)")
    root = _read(*named["tls_ca"]) if "tls_ca" in named else None
    if root is not None:
        _check_ca(*named["tls_ca"])
    key = chain = None
    if "tls_cert" in named:
        chain, key = _read(*named["tls_cert"]), _read(*named["tls_key"])
        _check_pair(named["tls_cert"], named["tls_key"])
    token = _token(*named["token_file"]) if "token_file" in named else None
    credentials = Credentials(root, key, chain, token)
    if token is not None and not credentials.tls and not _local(endpoint):
        raise CredentialsError(
            f"prism: {named['token_file'][1]}: a bearer token goes over TLS (--tls-ca) or to this "
            f"machine only, and {endpoint} is neither"
        )
    return credentials


def channel(endpoint: str, credentials: Credentials, options: list[tuple[str, object]]) -> grpc.Channel:
    """A grpcio channel to ``endpoint`` that uses ``credentials``."""
    import grpc

    if credentials.tls:
        secure = grpc.ssl_channel_credentials(
            credentials.root_certificates, credentials.private_key, credentials.certificate_chain
        )
    elif credentials.token is not None:
        # Plaintext, to this machine only (``load`` made sure): the one
        # insecure transport grpcio lets call credentials ride on.
        secure = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return grpc.insecure_channel(endpoint, options=options)
    if credentials.token is not None:
        secure = grpc.composite_channel_credentials(
            secure, grpc.access_token_call_credentials(credentials.token)
        )
    return grpc.secure_channel(endpoint, secure, options=options)


def _read(path: str, named: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CredentialsError(f"prism: cannot read {named} {path}: {exc.strerror or exc}") from None


def _check_ca(path: str, named: str) -> None:
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"prism: {named} {path}: not PEM CA certificates ({_reason(exc)})") from None


def _check_pair(cert: tuple[str, str], key: tuple[str, str]) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert[0], key[0])
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(
            f"prism: {cert[1]} {cert[0]} and {key[1]} {key[0]}: not a PEM certificate and its key "
            f"({_reason(exc)})"
        ) from None


def _token(path: str, named: str) -> str:
    raw = _read(path, named)
    token = raw.strip()
    if not token:
        raise CredentialsError(f"prism: {named} {path} is empty")
    if len(raw) > MAX_TOKEN_BYTES or not all(0x21 <= b <= 0x7E for b in token):
        # Never echoed: it is a secret, however malformed.
        raise CredentialsError(f"prism: {named} {path} does not hold one token on one line")
    return token.decode("ascii")


def _local(endpoint: str) -> bool:
    try:
        host, _ = parse_host_port(endpoint)
    except ValueError:
        return False  # a grpcio target (dns:///..., unix:...): not known to stay on this machine
    return is_loopback(host)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())
