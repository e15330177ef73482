"""What the built-in backends' options structs share.

Each engine package declares its options as a frozen msgspec struct in its
own light module (``prism/backends/<engine>/options.py``: msgspec only, no
trio, no driver), and ``prism.backends.catalog`` maps (abstraction, backend)
to the struct. Config loading converts every namespace's ``options`` table
with it, so a mistake stops ``prism serve`` (or a reload) with one line
naming ``namespaces[N].options.FIELD``; the worker's registry converts the
same table again and hands the backend its typed struct.

Rules every struct follows: unknown options are errors
(``forbid_unknown_fields``); units are in the names (``pool_timeout_s``);
ranges are ``msgspec.Meta`` constraints, checked on conversion; anything
types cannot say (a URL's syntax) is checked in ``__post_init__``, which
raises ``OptionError`` naming the field. Building a struct by hand (tests)
skips the ``Meta`` ranges, as msgspec does for every struct.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec

from prism.errors import ConfigError
from prism.validation import one_line, rephrase

DEFAULT_ACK_WAIT_MS = 30_000
DEFAULT_DEDUP_WINDOW_S = 120.0
DEFAULT_TOMBSTONE_TTL_S = 86_400.0  # as long as idempotency tokens are remembered

# Every number has both bounds: a typo of a few zeros (or TOML's inf) is
# refused at load instead of becoming a pool of a million connections or a
# timeout that never fires.
PoolSize = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]  # a timeout: more than zero, at most an hour
Days = Annotated[float, msgspec.Meta(ge=0, le=36_500)]  # retention: 0 keeps forever
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# How long a KeyValue delete's tombstones are kept: more than zero, at most a year.
TombstoneTtl = Annotated[float, msgspec.Meta(gt=0, le=365 * 86_400)]


class OptionError(ConfigError):
    """A bad backend option: ``field`` is its name ("" for the whole table).

    Not a ValueError: msgspec would turn one raised in ``__post_init__``
    into a ValidationError that no longer names the field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason = one_line(reason)  # a driver's text may end in a newline (libpq's do)
        super().__init__(f"options.{field}: {reason}" if field else f"options: {reason}")


class Options(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every built-in backend's options (a backend without options uses it as is)."""


class PubSubOptions(Options, frozen=True):
    """What every PubSub backend takes: how long a delivery may stay unacked
    before it is redelivered, and how long a message id is remembered."""

    ack_wait_ms: Annotated[int, msgspec.Meta(ge=1, le=86_400_000)] = DEFAULT_ACK_WAIT_MS  # up to a day
    dedup_window_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = DEFAULT_DEDUP_WINDOW_S


def tombstone_ttl_ms(ttl_s: float) -> int:
    """A ``tombstone_ttl_s`` in whole milliseconds (at least one)."""
    return max(1, round(ttl_s * 1000))


OptionsT = TypeVar("OptionsT", bound=Options)


def convert(options: Mapping[str, Any], cls: type[OptionsT]) -> OptionsT:
    """``options`` (a config table) as ``cls``; OptionError naming the field if invalid."""
    try:
        return msgspec.convert(options, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise OptionError(*rephrase(str(exc))) from None
