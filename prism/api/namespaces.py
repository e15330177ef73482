"""The namespaces one process holds, as the services see them.

``App`` (``prism.workers.app``) opens and retires namespaces in one
``NamespaceTable``: name -> ``Held`` (its config, backend and cache tier).
Each service reads the view of its own abstraction, where one dict lookup
gives a call's backend (typed for that abstraction) and cache tier. A call
for a namespace that is not held here goes to the ``Remote``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from prism.backends.keyvalue import KeyValueBackend
from prism.backends.pubsub import PubSubBackend
from prism.backends.timeseries import TimeSeriesBackend
from prism.cache.redis import RedisTier
from prism.cache.shared import SharedCache
from prism.config import NamespaceConfig
from prism.errors import NotFound
from prism.rpc.call import Call, CallContext
from prism.rpc.settings import Answered

B = TypeVar("B")


class Cached(NamedTuple):
    """A namespace's GetItems answers kept in the shared-memory cache table."""

    cache: SharedCache
    ttl_ms: int
    max_value_bytes: int


# A namespace's GetItems cache: the shared-memory table, or Redis.
CacheTier = Cached | RedisTier


@dataclass(frozen=True, slots=True)
class Held(Generic[B]):
    """A namespace this process has open."""

    config: NamespaceConfig
    backend: B
    cache: CacheTier | None = None  # KeyValue only (config validation sees to that)


class NamespaceTable:
    """name -> held namespace, one entry per name whatever its abstraction,
    with a view per abstraction for its service.

    ``by_name`` and the views are read-only to their readers: ``hold`` and
    ``release`` keep them in step.
    """

    def __init__(self) -> None:
        self._held: dict[str, Held[Any]] = {}
        self._views: dict[str, dict[str, Held[Any]]] = {"keyvalue": {}, "timeseries": {}, "pubsub": {}}
        self.by_name: Mapping[str, Held[Any]] = self._held
        self.keyvalue: Mapping[str, Held[KeyValueBackend]] = self._views["keyvalue"]
        self.timeseries: Mapping[str, Held[TimeSeriesBackend]] = self._views["timeseries"]
        self.pubsub: Mapping[str, Held[PubSubBackend]] = self._views["pubsub"]

    def held(self) -> list[Held[Any]]:
        """Every held namespace (a copy: the caller may hold and release meanwhile)."""
        return list(self._held.values())

    def hold(self, held: Held[Any]) -> Held[Any] | None:
        """Serve ``held`` from now on; the namespace of the same name it
        replaces (for the caller to close), if any."""
        name = held.config.name
        replaced = self.release(name)
        self._held[name] = held
        self._views[held.config.abstraction][name] = held
        return replaced

    def release(self, name: str) -> Held[Any] | None:
        """Stop serving ``name``; what was held (for the caller to close), if anything."""
        held = self._held.pop(name, None)
        if held is not None:
            del self._views[held.config.abstraction][name]
        return held


class Remote(Protocol):
    """Where calls for namespaces this process does not hold go (another tenant's worker)."""

    async def forward(self, namespace: str, call: CallContext) -> bytes | None:
        """The owner's answer bytes; None if no tenant owns ``namespace``.

        Also called for a call that was itself forwarded here (``call.forwarded``):
        the remote must then not forward it again."""
        ...

    def forward_now(self, call: Call, request: Any, answered: Answered) -> bool:
        """Send a unary call on without waiting, if it goes elsewhere (``prism.rpc.settings.ForwardNow``)."""
        ...


async def elsewhere(remote: Remote | None, namespace: str, call: CallContext) -> bytes:
    """A call for a namespace this process does not hold: the remote
    (another tenant's worker) answers it, or the namespace is unknown.
    Every service's unary calls go this way."""
    if remote is not None:
        answer = await remote.forward(namespace, call)
        if answer is not None:
            return answer
    raise NotFound(f"unknown namespace {namespace!r}")
