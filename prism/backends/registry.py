"""Backend name -> factory, so that config can name a backend (ADR-005).

Built-ins are registered here; each built-in factory converts the
namespace's options table to its engine's struct (``prism.backends.catalog``
says which) and hands the backend that. A third-party package adds a
KeyValue backend with an entry point in the ``prism.backends`` group whose
object is a factory taking the plain table; entry points are only looked at
when config names a backend we do not know, so start-up never imports
plugins it does not use.

This module imports the memory backends (and trio); every other built-in
backend, its driver and its engine (sqlite3, psycopg, hiredis, the NATS
client) is imported by its factory, the first time a namespace uses it, so
that a worker loads only what its namespaces need. ``import_off_loop``
imports it in a thread first: the first namespace of its kind added to a
worker that serves (a reload, a migration's target) then does not stop the
event loop for the import (PostgreSQL's: ~85 ms here). Workers use this
module; config loading in the supervisor uses ``catalog`` instead.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Protocol, TypeVar

import trio

from prism.backends.catalog import ENTRY_POINT_GROUP, known_backends, plugins
from prism.backends.keyvalue import KeyValueBackend
from prism.backends.memory.keyvalue import MemoryBackend
from prism.backends.memory.options import (
    MemoryKeyValueOptions,
    MemoryPubSubOptions,
    MemoryTimeSeriesOptions,
)
from prism.backends.memory.pubsub import MemoryPubSubBackend
from prism.backends.memory.timeseries import MemoryTimeSeriesBackend
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.options import convert
from prism.backends.postgres.options import PostgresKeyValueOptions, PostgresTimeSeriesOptions
from prism.backends.pubsub import PubSubBackend
from prism.backends.redis.options import RedisOptions
from prism.backends.sqlite.options import SqliteOptions, SqliteTimeSeriesOptions
from prism.backends.timeseries import TimeSeriesBackend
from prism.errors import ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "AnyBackend",
    "BackendFactory",
    "Factory",
    "create",
    "create_any",
    "create_pubsub",
    "create_timeseries",
    "import_off_loop",
    "known_backends",
    "register",
]

B_co = TypeVar("B_co", covariant=True)
_F = TypeVar("_F")


class Factory(Protocol[B_co]):
    """Builds an unopened backend for one namespace from its options table;
    raises ConfigError for bad options. The caller then awaits its ``open()``."""

    def __call__(self, options: Mapping[str, object], *, data_dir: Path, namespace: str) -> B_co: ...


BackendFactory = Factory[KeyValueBackend]  # what a "prism.backends" plugin provides


def _memory(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    return MemoryBackend(convert(options, MemoryKeyValueOptions).tombstone_ttl_s)


def _sqlite(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    from prism.backends.sqlite.keyvalue import SqliteBackend  # lazy, as for "postgres"

    return SqliteBackend(convert(options, SqliteOptions), data_dir=data_dir, namespace=namespace)


def _postgres(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    # Imported on first use: psycopg (and libpq) are slow to import, which a
    # worker that serves no PostgreSQL namespace should not pay at start-up.
    from prism.backends.postgres.keyvalue import PostgresBackend

    return PostgresBackend(convert(options, PostgresKeyValueOptions), namespace=namespace)


def _redis(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    # Imported on first use, like PostgreSQL: hiredis is not needed otherwise.
    from prism.backends.redis.keyvalue import RedisBackend

    return RedisBackend(convert(options, RedisOptions), namespace=namespace)


_factories: dict[str, BackendFactory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
    "redis": _redis,
}


def register(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``name``. Refuses to shadow a registered
    name unless ``replace``: a plugin must not silently take over "sqlite"."""
    if name in _factories and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _factories[name] = factory


def create(name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    """A new, unopened KeyValue backend named ``name`` for ``namespace``."""
    factory = _factories.get(name) or _load_plugin(name)
    return factory(options, data_dir=data_dir, namespace=namespace)


def _load_plugin(name: str) -> BackendFactory:
    found = plugins(name)
    if not found:
        known = ", ".join(known_backends())
        raise ConfigError(f"unknown backend {name!r}; known backends: {known}")
    ep = found[0]
    try:
        factory = ep.load()
    except Exception as exc:
        raise ConfigError(f"backend {name!r}: cannot load plugin {ep.value}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"backend {name!r}: plugin {ep.value} is not a factory")
    register(name, factory)
    return factory  # type: ignore[no-any-return]


def _factory(table: Mapping[str, _F], abstraction: str, name: str) -> _F:
    factory = table.get(name)
    if factory is None:
        raise ConfigError(f"unknown {abstraction} backend {name!r}; known: {', '.join(sorted(table))}")
    return factory


def _memory_timeseries(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> TimeSeriesBackend:
    return MemoryTimeSeriesBackend(convert(options, MemoryTimeSeriesOptions))


def _sqlite_timeseries(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> TimeSeriesBackend:
    from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend  # lazy, as for "postgres"

    return SqliteTimeSeriesBackend(
        convert(options, SqliteTimeSeriesOptions), data_dir=data_dir, namespace=namespace
    )


def _postgres_timeseries(
    options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> TimeSeriesBackend:
    from prism.backends.postgres.timeseries import PostgresTimeSeriesBackend  # lazy, as for "postgres"

    return PostgresTimeSeriesBackend(convert(options, PostgresTimeSeriesOptions), namespace=namespace)


_timeseries: dict[str, Factory[TimeSeriesBackend]] = {
    "memory": _memory_timeseries,
    "sqlite": _sqlite_timeseries,
    "postgres": _postgres_timeseries,
}


def create_timeseries(
    name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> TimeSeriesBackend:
    """A new, unopened TimeSeries backend named ``name`` for ``namespace``."""
    return _factory(_timeseries, "timeseries", name)(options, data_dir=data_dir, namespace=namespace)


def _memory_pubsub(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> PubSubBackend:
    return MemoryPubSubBackend(convert(options, MemoryPubSubOptions))


def _nats_pubsub(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> PubSubBackend:
    from prism.backends.nats.pubsub import NatsPubSubBackend  # lazy: only NATS namespaces need it

    return NatsPubSubBackend(convert(options, NatsPubSubOptions), namespace=namespace)


_pubsub: dict[str, Factory[PubSubBackend]] = {
    "memory": _memory_pubsub,
    "nats": _nats_pubsub,
}


def create_pubsub(
    name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> PubSubBackend:
    """A new, unopened PubSub backend named ``name`` for ``namespace``."""
    return _factory(_pubsub, "pubsub", name)(options, data_dir=data_dir, namespace=namespace)


AnyBackend = KeyValueBackend | TimeSeriesBackend | PubSubBackend


def create_any(
    abstraction: str, name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> AnyBackend:
    """The backend for a namespace of ``abstraction``, from its config's
    options table (the routing table's plain dict)."""
    if abstraction == "timeseries":
        return create_timeseries(name, options, data_dir=data_dir, namespace=namespace)
    if abstraction == "pubsub":
        return create_pubsub(name, options, data_dir=data_dir, namespace=namespace)
    return create(name, options, data_dir=data_dir, namespace=namespace)


# The module each lazily imported built-in backend's factory imports.
LAZY_MODULES: Final[Mapping[tuple[str, str], str]] = {
    ("keyvalue", "sqlite"): "prism.backends.sqlite.keyvalue",
    ("keyvalue", "postgres"): "prism.backends.postgres.keyvalue",
    ("keyvalue", "redis"): "prism.backends.redis.keyvalue",
    ("timeseries", "sqlite"): "prism.backends.sqlite.timeseries",
    ("timeseries", "postgres"): "prism.backends.postgres.timeseries",
    ("pubsub", "nats"): "prism.backends.nats.pubsub",
}


async def import_off_loop(abstraction: str, name: str) -> None:
    """Import what the factory of ``name`` (of ``abstraction``) imports, in a
    thread, unless it is imported already: the event loop goes on meanwhile
    (the importing thread gives it the GIL every switch interval)."""
    module = LAZY_MODULES.get((abstraction, name))
    if module is not None and module not in sys.modules:
        await trio.to_thread.run_sync(importlib.import_module, module)
