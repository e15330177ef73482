"""How a namespace is laid out in JetStream: subjects, tokens, names, and the
timings every part of the NATS backend shares (see ``pubsub`` for the design).
"""

from __future__ import annotations

import base64
import hashlib

from prism.backends.nats.errors import JetStreamError
from prism.drivers import nats as natsio
from prism.errors import PrismError

API_TIMEOUT_S = 5.0  # a JetStream API request, a publish's ack, acks' confirmations
FETCH_EXPIRES_S = 30.0  # a pull of one message waits this long on the server
CLOSE_TIMEOUT_S = 2.0  # leaving a subscription (NAKs, UNSUB) is bounded by this
NS_PER_S = 1_000_000_000  # JetStream durations are nanoseconds

# What a background step (forwarded acks, release) may meet when NATS goes
# away; the calls a client is waiting on report it instead.
FAILURES = (natsio.NatsError, JetStreamError, PrismError)


def b64(s: str) -> str:
    """``s`` as unpadded base64url: any string becomes one valid subject token or header value."""
    return base64.urlsafe_b64encode(s.encode()).rstrip(b"=").decode()


def unb64(s: str) -> str:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)).decode()


def topic_token(topic: str) -> str:
    return "t" + b64(topic)


def consumer_name(topic: str, group: str) -> str:
    return "g_" + hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:32]


def ack_sequence(reply: str) -> int:
    """The stream sequence in a ``$JS.ACK`` subject (old 9-token and new 12-token forms)."""
    tokens = reply.split(".")
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def forward_subject(stream: str, consumer: str) -> str:
    """Where the live members of a group listen for acks of deliveries they hold."""
    return f"_PRISM.ack.{stream}.{consumer}"
