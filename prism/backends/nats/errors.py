"""NATS's error table, and the JetStream API's own error.

A message over the server's ``max_payload`` is the client's to fix:
INVALID_ARGUMENT. An error answer of the JetStream API is INTERNAL (we asked
for something the server refused). Any other driver error (connection lost,
cannot connect, no reply, no responders) is UNAVAILABLE: the client may
retry, and a subscriber resubscribes. Each with the text it was raised with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prism.backends.errors import map_exceptions
from prism.drivers import nats as natsio
from prism.errors import Internal, InvalidArgument, Unavailable


class JetStreamError(Exception):
    """An error answer of the JetStream API; ``err_code`` tells which."""

    def __init__(self, subject: str, error: Mapping[str, Any]) -> None:
        self.err_code = int(error.get("err_code", 0))
        super().__init__(f"nats: {subject}: {error.get('description', 'error')} (err_code {self.err_code})")


ERRORS = map_exceptions(
    {natsio.PayloadTooLarge: InvalidArgument, JetStreamError: Internal, natsio.NatsError: Unavailable}
)
