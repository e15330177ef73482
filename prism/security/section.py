"""The security settings every worker applies, as published in the routing table."""

from __future__ import annotations

import msgspec

from prism.config import ServerConfig
from prism.config.security import AccessRule, AuthConfig, TlsConfig, security_on


class SecuritySection(msgspec.Struct, frozen=True):
    """TLS, authentication and access rules of one config generation.

    ``serial`` moves on every start and every accepted reload, even when the
    config names the same files: a SIGHUP after a certificate, key, client CA
    or JWKS file was replaced makes every worker read them again, and new
    connections use them (existing ones keep theirs).
    """

    serial: int = 0
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    access: tuple[AccessRule, ...] = ()
    audit_writes: bool = False

    @property
    def secured(self) -> bool:
        """Whether every data call needs a principal that a rule allows."""
        return security_on(self.auth, self.tls, self.access)


def section_of(config: ServerConfig, serial: int) -> SecuritySection:
    return SecuritySection(serial, config.tls, config.auth, config.access, config.audit_writes)
