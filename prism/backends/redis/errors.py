"""Redis's error table: what each driver error tells the client.

Error replies that mean "the server cannot serve now" (still loading its
data, busy with a script, a replica without its primary, read-only, a
cluster resharding, out of memory) are UNAVAILABLE with the reply's code;
any other error reply is a fault in our commands or scripts: INTERNAL with
the reply. Connection failures are UNAVAILABLE and a pool with every
connection busy is RESOURCE_EXHAUSTED, with the driver's text.
"""

from __future__ import annotations

from prism.backends.errors import map_exceptions
from prism.drivers import resp
from prism.errors import Internal, PrismError, ResourceExhausted, Unavailable

UNAVAILABLE_REPLIES = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "OOM")


def reply_error(exc: resp.ReplyError) -> PrismError:
    """The gateway error for an error reply (``-ERR ...``)."""
    text = str(exc)
    if text.startswith(UNAVAILABLE_REPLIES):
        return Unavailable(f"redis: server unavailable ({text.split(' ', 1)[0]})")
    return Internal(f"redis: server error: {text}")


ERRORS = map_exceptions(
    {resp.PoolTimeout: ResourceExhausted, resp.ReplyError: reply_error, resp.RedisError: Unavailable}
)
