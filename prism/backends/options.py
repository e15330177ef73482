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

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]  # a timeout: more than zero
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


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

    ack_wait_ms: PositiveInt = DEFAULT_ACK_WAIT_MS
    dedup_window_s: NonNegative = DEFAULT_DEDUP_WINDOW_S


OptionsT = TypeVar("OptionsT", bound=Options)


def convert(options: Mapping[str, Any], cls: type[OptionsT]) -> OptionsT:
    """``options`` (a config table) as ``cls``; OptionError naming the field if invalid."""
    try:
        return msgspec.convert(options, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise OptionError(*rephrase(str(exc))) from None
