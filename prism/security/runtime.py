"""A worker's security state, rebuilt from the routing table's ``SecuritySection``.

The worker calls ``Security.apply`` whenever it reads a new routing
generation; nothing is rebuilt unless the section's serial moved (a start or
an accepted reload). A file that does not load (a certificate replaced by a
half-written one, say) keeps what was built before, with one log line: the
supervisor checked the files before it published the section, so that is a
file changed again in between. With nothing built before, TLS handshakes are
refused: a port configured for TLS never serves plaintext.
"""

from __future__ import annotations

import logging
import ssl

from prism.security.section import SecuritySection
from prism.security.tls import server_context

log = logging.getLogger("prism.security")


class Security:
    """What connections and calls consult: the TLS context (None: plaintext),
    how long a TLS handshake may take, and the section they were built from.

    A connection takes ``tls`` and ``handshake_timeout_s`` when it is accepted
    and keeps them: a rotation changes new connections only.
    """

    def __init__(self) -> None:
        self.section = SecuritySection(serial=-1)
        self.tls: ssl.SSLContext | None = None
        self.handshake_timeout_s = 0.0  # no TLS: no handshake

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
        self.section = section


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
