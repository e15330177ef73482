"""Whether a Redis server keeps what it acknowledged across a restart.

A Redis with neither an append-only file nor RDB snapshots loses every
write on a restart, however acknowledged: a KeyValue namespace on one warns
when it opens, and with ``require_persistence = true`` refuses to open
(Unavailable). That is how a backend that is down fails, and why it was
chosen over a start-up failure: the condition is the Redis server's and can
change while Prism runs, so the namespace is NOT_SERVING (at boot too: a
remote backend's ``Unavailable`` does not halt, ``prism.workers.app``), its
calls UNAVAILABLE with this reason, retried on ``prism.workers.reopen``'s
backoff, and ``CONFIG SET appendonly yes`` brings it back without a restart
of Prism. The check runs when the namespace opens only: a Redis that stops
persisting later is seen at the next open.

``CONFIG GET appendonly`` and ``CONFIG GET save`` answer it. Managed Redis
services often disable CONFIG; then ``INFO persistence`` tells whether AOF
is on (``aof_enabled``) and whether a snapshot was ever taken
(``rdb_saves``), but not whether snapshots are scheduled: with neither, the
answer is "unknown", which ``require_persistence`` refuses too (it asks for
evidence, not hope).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from prism.drivers import resp


class Persistence(enum.Enum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"


async def check(pool: resp.Pool) -> tuple[Persistence, str]:
    """Whether the server behind ``pool`` persists writes, and in words how
    (or why not), to follow "redis at HOST:PORT" in a message."""
    try:
        appendonly = _config_value(await pool.call("CONFIG", "GET", "appendonly"))
        save = _config_value(await pool.call("CONFIG", "GET", "save"))
    except resp.ReplyError:  # CONFIG renamed, disabled or not allowed to this user
        appendonly = save = None
    if appendonly is not None and save is not None:
        if appendonly == "yes":
            return Persistence.ON, "has its append-only file on"
        if save.strip():
            return Persistence.ON, f"takes RDB snapshots (save {save.strip()!r})"
        return Persistence.OFF, "has neither AOF nor RDB persistence (appendonly no, save '')"
    try:
        info = _info_fields(await pool.call("INFO", "persistence"))
    except resp.ReplyError:
        return Persistence.UNKNOWN, "could not be checked for persistence (CONFIG GET and INFO refused)"
    if info.get("aof_enabled") == "1":
        return Persistence.ON, "has its append-only file on (INFO)"
    if info.get("rdb_saves", "0") not in ("", "0"):
        return Persistence.ON, "has taken RDB snapshots (INFO)"
    if "aof_enabled" not in info:
        return (
            Persistence.UNKNOWN,
            "could not be checked for persistence (CONFIG GET refused, INFO incomplete)",
        )
    return (
        Persistence.UNKNOWN,
        "could not be checked for persistence (CONFIG GET refused; INFO: no AOF, no RDB save yet)",
    )


def _config_value(reply: resp.Reply) -> str | None:
    """The value of a one-parameter ``CONFIG GET`` (a [name, value] array); None if absent."""
    if isinstance(reply, Sequence) and not isinstance(reply, (bytes, str)) and len(reply) == 2:
        value = reply[1]
        if isinstance(value, bytes):
            return value.decode(errors="replace")
    return None


def _info_fields(reply: resp.Reply) -> dict[str, str]:
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields
