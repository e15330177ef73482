"""Options of the memory backends (msgspec only: config loading imports this)."""

from __future__ import annotations

from prism.backends.options import NonNegative, Options, PositiveInt, PubSubOptions

DEFAULT_MAX_MESSAGES = 100_000


class MemoryKeyValueOptions(Options, frozen=True):
    """KeyValue in memory takes no options."""


class MemoryTimeSeriesOptions(Options, frozen=True):
    """``retention_days``: events older than this are never returned (0: keep forever)."""

    retention_days: NonNegative = 0.0


class MemoryPubSubOptions(PubSubOptions, frozen=True):
    """``ack_wait_ms``, ``dedup_window_s`` (every PubSub backend's) and
    ``max_messages``: messages kept per topic, the oldest dropped first."""

    max_messages: PositiveInt = DEFAULT_MAX_MESSAGES
