"""A worker's security state, rebuilt from the routing table's ``SecuritySection``,
and the access check every call path runs.

The worker calls ``Security.apply`` whenever it reads a new routing
generation; nothing is rebuilt unless the section's serial moved (a start or
an accepted reload). A file that does not load (a certificate or JWKS
replaced by a half-written one, say) keeps what was built before, with one
log line: the supervisor checked the files before it published the section,
so that is a file changed again in between. With no certificate built
before, TLS handshakes are refused: a port configured for TLS never serves
plaintext.

The check (``check_call`` for a call on a client connection,
``check_caller`` for one another worker forwarded here) runs only when
``secured``; the call paths test that one attribute and nothing else when
security is off. It comes before the namespace is looked up, so a call
learns nothing of namespaces it may not use: a forbidden unknown namespace
is PERMISSION_DENIED like a forbidden existing one. Its order:

1. the principal: the subject of the call's bearer token (when ``[auth]`` is
   configured and the call carries one), else the client certificate's
   identity, else none. No principal, or a token that does not verify, is
   UNAUTHENTICATED;
2. the rules: a principal no rule allows the method's action on the
   namespace is PERMISSION_DENIED;
3. the audit: every denial, and with ``audit_writes`` every allowed write
   (once, by the worker the client reached).

A forwarded call's token was verified by the worker the client reached;
the owner checks the rules for the principal that worker established.
"""

from __future__ import annotations

import logging
import ssl
from typing import Final

from prism.config.security import AuthConfig
from prism.errors import PermissionDenied, Unauthenticated
from prism.rpc.call import CallContext, Caller
from prism.rpc.methods import WRITE, Method
from prism.security.access import AccessRules
from prism.security.audit import Audit
from prism.security.identity import JwksError, PeerIdentity, TokenError, TokenVerifier, bearer, load_jwks
from prism.security.section import SecuritySection
from prism.security.tls import server_context

log = logging.getLogger("prism.security")

NO_CREDENTIALS: Final = "no credentials: send a bearer token (authorization metadata) or a client certificate"


class Security:
    """What connections and calls consult: the TLS context (None: plaintext),
    how long a TLS handshake may take, the token verifier (None: no
    ``[auth]``), the compiled access rules, the audit log, and the section
    they were built from.

    A connection takes ``tls`` and ``handshake_timeout_s`` when it is accepted
    and keeps them: a rotation changes new connections only.
    """

    def __init__(self) -> None:
        self.section = SecuritySection(serial=-1)
        self.tls: ssl.SSLContext | None = None
        self.handshake_timeout_s = 0.0  # no TLS: no handshake
        # Whether calls are checked at all: a plain attribute, the one thing
        # a call reads when security is off.
        self.secured = False
        self.verifier: TokenVerifier | None = None
        self.rules = AccessRules(())
        self.audit_writes = False
        self.audit = Audit()

    def apply(self, section: SecuritySection) -> None:
        if section.serial == self.section.serial:
            return
        tls = self.tls
        if section.tls is None:
            tls = None
        else:
            try:
                tls = server_context(section.tls)
            except (OSError, ssl.SSLError) as exc:
                if tls is None:
                    # Nothing to keep (a worker starting, or TLS just turned
                    # on): never fall back to plaintext on a port configured
                    # for TLS. A context without a certificate fails every
                    # handshake, until a reload brings files that load.
                    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                    log.error("tls: refusing TLS connections, no certificate loads: %s", _one_line(exc))
                else:
                    log.error("tls: keeping the previous certificate, key and client CA: %s", _one_line(exc))
        self.tls = tls
        self.handshake_timeout_s = section.tls.handshake_timeout_s if section.tls else 0.0
        self.verifier = self._verifier(section.auth)
        self.rules = AccessRules(section.access)
        self.audit_writes = section.audit_writes
        self.secured = section.secured
        self.section = section

    def _verifier(self, auth: AuthConfig | None) -> TokenVerifier | None:
        if auth is None:
            return None
        previous = self.verifier
        try:
            keys = load_jwks(auth.jwt.jwks_file)
        except JwksError as exc:
            keys = previous.keys if previous is not None else {}
            log.error("jwt: keeping the previous keys (%d): %s", len(keys), exc)
        # A new verifier (an empty cache) even with the same keys: a token is
        # remembered only under the section it was verified for.
        return TokenVerifier(auth.jwt, keys)

    def check_call(
        self, call: CallContext, method: Method, namespace: str, peer: PeerIdentity, certificate: str | None
    ) -> Caller:
        """The caller of a call on a client connection, if it may do ``method``'s
        action on ``namespace``; else raise Unauthenticated or PermissionDenied,
        audited. ``certificate``: the connection's client-certificate principal."""
        verifier = self.verifier
        try:
            # Without [auth] a bearer token is not Prism's to judge: the
            # certificate alone says who calls.
            header = bearer(call.metadata) if verifier is not None else None
            if header is not None:
                assert verifier is not None
                caller = peer.token_caller(header, verifier)
            elif certificate is not None:
                caller = peer.certificate_caller(certificate)
            else:
                caller = Caller(None, peer.address)
        except TokenError as exc:
            self.audit.denied(
                None, peer.address, namespace, method.name, "UNAUTHENTICATED", f"bearer token: {exc.reason}"
            )
            raise Unauthenticated(f"invalid bearer token: {exc.reason}") from None
        self.check_caller(caller, method, namespace)
        return caller

    def check_caller(
        self, caller: Caller | None, method: Method, namespace: str, *, forwarded: bool = False
    ) -> None:
        """Return if ``caller`` may do ``method``'s action on ``namespace``; else raise
        Unauthenticated (no principal) or PermissionDenied, audited. A forwarded
        call is checked with this alone, for the caller its sender established
        (which audited it already if it was an allowed write)."""
        action = method.action
        if action is None:
            return  # open to every caller (Health, reflection)
        principal = caller.principal if caller is not None else None
        if principal is None:
            address = caller.address if caller is not None else ""
            self.audit.denied(None, address, namespace, method.name, "UNAUTHENTICATED", "no credentials")
            raise Unauthenticated(NO_CREDENTIALS)
        assert caller is not None
        if not self.rules.allows(principal, namespace, action):
            self.audit.denied(
                principal,
                caller.address,
                namespace,
                method.name,
                "PERMISSION_DENIED",
                f"no rule allows {action}",
            )
            raise PermissionDenied(f"permission denied: {principal!r} may not {action} this namespace")
        if self.audit_writes and action == WRITE and not forwarded:
            self.audit.allowed_write(caller, namespace, method.name)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
