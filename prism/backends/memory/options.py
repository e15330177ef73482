"""Options of the memory backends (msgspec only: config loading imports this)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from prism.backends.options import DEFAULT_TOMBSTONE_TTL_S, Days, Options, PubSubOptions, TombstoneTtl

DEFAULT_MAX_MESSAGES = 100_000


class MemoryKeyValueOptions(Options, frozen=True):
    """``tombstone_ttl_s``: how long a delete's tombstones are kept (every
    KeyValue backend takes it; see ``prism.backends.keyvalue``)."""

    tombstone_ttl_s: TombstoneTtl = DEFAULT_TOMBSTONE_TTL_S


class MemoryTimeSeriesOptions(Options, frozen=True):
    """``retention_days``: events older than this are never returned (0: keep forever)."""

    retention_days: Days = 0.0


class MemoryPubSubOptions(PubSubOptions, frozen=True):
    """``ack_wait_ms``, ``dedup_window_s`` (every PubSub backend's) and
    ``max_messages``: messages kept per topic, the oldest dropped first."""

    max_messages: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = DEFAULT_MAX_MESSAGES
