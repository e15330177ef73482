"""Options of the NATS JetStream backend (msgspec only: config loading imports this)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from prism.backends.options import OptionError, PubSubOptions, Seconds
from prism.drivers.addresses import NatsAddress

DEFAULT_URL = "nats://127.0.0.1:4222"
StreamName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,200}$")]


class NatsPubSubOptions(PubSubOptions, frozen=True):
    """``ack_wait_ms`` and ``dedup_window_s`` (every PubSub backend's),
    ``url`` (``nats://[token@|user:password@]host[:port]``, or ``tls://`` to
    require TLS), ``ca_file`` (a PEM bundle of the CAs the server's
    certificate must chain to when TLS is used; default: the system's),
    ``stream`` (the JetStream stream of the namespace, 1-200 letters, digits,
    ``_`` or ``-``; default ``PRISM_<namespace>``), and ``connect_timeout_s``."""

    url: str = DEFAULT_URL
    ca_file: str = ""
    # "" (which config cannot give: the pattern wants a character) means the default.
    stream: StreamName = ""
    connect_timeout_s: Seconds = 2.0

    def __post_init__(self) -> None:
        try:
            NatsAddress(self.url)
        except ValueError as exc:
            raise OptionError("url", str(exc)) from None
