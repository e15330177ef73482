"""What every KeyValue backend does the same way: input checks and paging.

Kept out of ``base`` so that the contract module stays declarative, and shared
so that the backends cannot drift apart on the rules that the API layer turns
into page tokens (where a page ends, when ``last_key`` is set).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prism.backends.base import (
    IDEMPOTENCY_WINDOW_MS,
    ItemPage,
    ItemWrite,
    Mutation,
    Put,
    StoredItem,
)
from prism.errors import InvalidArgument


def check_items(items: Iterable[ItemWrite]) -> None:
    """Reject writes no backend can store. Runs before anything is applied,
    so a bad item fails its whole write (and the write's token stays unused)."""
    for item in items:
        if not item.key:
            raise InvalidArgument("item key must not be empty")


def check_mutations(mutations: Sequence[Mutation]) -> None:
    check_items(m.item for m in mutations if isinstance(m, Put))


def is_replay(applied_at_ms: int | None, now_ms: int) -> bool:
    """Whether a token applied at ``applied_at_ms`` still blocks a write at ``now_ms``."""
    return applied_at_ms is not None and now_ms - applied_at_ms < IDEMPOTENCY_WINDOW_MS


def is_expired(expires_at_ms: int, now_ms: int) -> bool:
    return expires_at_ms != 0 and expires_at_ms <= now_ms


def page_items(items: Iterable[StoredItem], limit_items: int, limit_bytes: int) -> ItemPage:
    """The first page of ``items`` (live, already in travel order).

    Greedy: takes items until the next one would pass a limit, but always at
    least one. ``last_key`` is set only when an item was left over, which is
    why ``items`` must be able to yield one item past the page.
    """
    out: list[StoredItem] = []
    size = 0
    for item in items:
        n = len(item.key) + len(item.value)
        if out and (len(out) >= limit_items or size + n > limit_bytes):
            return ItemPage(out, out[-1].key)
        out.append(item)
        size += n
    return ItemPage(out, None)
