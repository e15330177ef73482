"""A worker's security state, rebuilt from the routing table's ``SecuritySection``.

The worker calls ``Security.apply`` whenever it reads a new routing
generation; nothing is rebuilt unless the section's serial moved (a start or
an accepted reload). A file that does not load (a certificate replaced by a
half-written one, say) keeps what was built before, with one log line: the
supervisor checked the files before it published the section, so that is a
file changed again in between.
"""

from __future__ import annotations

import logging
import ssl

from prism.security.section import SecuritySection
from prism.security.tls import server_context

log = logging.getLogger("prism.security")


class Security:
    """What connections and calls consult: the TLS context (None: plaintext)
    and the section it was built from."""

    def __init__(self) -> None:
        self.section = SecuritySection(serial=-1)
        self.tls: ssl.SSLContext | None = None

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
                log.error("tls: keeping the previous certificate, key and client CA: %s", _one_line(exc))
        self.tls = tls
        self.section = section


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
