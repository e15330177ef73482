"""Backend name -> factory, so that config can name a backend (ADR-005).

Built-ins are registered here. A third-party package adds one with an entry
point in the ``prism.backends`` group whose object is a factory; entry points
are only looked at when config names a backend we do not know, so start-up
never imports plugins it does not use.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar

from prism.backends.keyvalue import KeyValueBackend
from prism.backends.memory.keyvalue import MemoryBackend
from prism.backends.memory.pubsub import MemoryPubSubBackend
from prism.backends.memory.timeseries import MemoryTimeSeriesBackend
from prism.backends.pubsub import PubSubBackend
from prism.backends.sqlite.keyvalue import SqliteBackend
from prism.backends.sqlite.timeseries import SqliteTimeSeriesBackend
from prism.backends.timeseries import TimeSeriesBackend
from prism.errors import ConfigError

ENTRY_POINT_GROUP = "prism.backends"


B_co = TypeVar("B_co", covariant=True)
_F = TypeVar("_F")


class Factory(Protocol[B_co]):
    """Builds an unopened backend for one namespace; raises ConfigError for
    bad options. The caller then awaits its ``open()``."""

    def __call__(self, options: Mapping[str, object], *, data_dir: Path, namespace: str) -> B_co: ...


BackendFactory = Factory[KeyValueBackend]  # what a "prism.backends" plugin provides


def _memory(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    return MemoryBackend(options)


def _postgres(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    # Imported on first use: psycopg takes ~0.1 s to import, which a worker
    # that serves no PostgreSQL namespace should not pay at start-up.
    from prism.backends.postgres.keyvalue import PostgresBackend

    return PostgresBackend(options, data_dir=data_dir, namespace=namespace)


def _redis(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    # Imported on first use, like PostgreSQL: hiredis is not needed otherwise.
    from prism.backends.redis.keyvalue import RedisBackend

    return RedisBackend(options, data_dir=data_dir, namespace=namespace)


_factories: dict[str, BackendFactory] = {
    "memory": _memory,
    "sqlite": SqliteBackend,
    "postgres": _postgres,
    "redis": _redis,
}


def register(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available as ``name``. Refuses to shadow a registered
    name unless ``replace``: a plugin must not silently take over "sqlite"."""
    if name in _factories and not replace:
        raise ValueError(f"backend {name!r} is already registered")
    _factories[name] = factory


def known_backends() -> list[str]:
    """Registered names and installed plugins' names (without loading them)."""
    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(_factories) | plugins)


def create(name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    """A new, unopened backend named ``name`` for ``namespace``."""
    factory = _factories.get(name) or _load_plugin(name)
    return factory(options, data_dir=data_dir, namespace=namespace)


def _load_plugin(name: str) -> BackendFactory:
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        known = ", ".join(known_backends())
        raise ConfigError(f"unknown backend {name!r}; known backends: {known}")
    ep = next(iter(found))
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


def _postgres_timeseries(
    options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> TimeSeriesBackend:
    from prism.backends.postgres.timeseries import PostgresTimeSeriesBackend  # lazy, as for "postgres"

    return PostgresTimeSeriesBackend(options, data_dir=data_dir, namespace=namespace)


_timeseries: dict[str, Factory[TimeSeriesBackend]] = {
    "memory": MemoryTimeSeriesBackend,
    "sqlite": SqliteTimeSeriesBackend,
    "postgres": _postgres_timeseries,
}


def create_timeseries(
    name: str, options: Mapping[str, object], *, data_dir: Path, namespace: str
) -> TimeSeriesBackend:
    """A new, unopened TimeSeries backend named ``name`` for ``namespace``."""
    return _factory(_timeseries, "timeseries", name)(options, data_dir=data_dir, namespace=namespace)


def _nats_pubsub(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> PubSubBackend:
    from prism.backends.nats.pubsub import NatsPubSubBackend  # lazy: only NATS namespaces need it

    return NatsPubSubBackend(options, data_dir=data_dir, namespace=namespace)


_pubsub: dict[str, Factory[PubSubBackend]] = {
    "memory": MemoryPubSubBackend,
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
    """The backend for a namespace of ``abstraction``."""
    if abstraction == "timeseries":
        return create_timeseries(name, options, data_dir=data_dir, namespace=namespace)
    if abstraction == "pubsub":
        return create_pubsub(name, options, data_dir=data_dir, namespace=namespace)
    return create(name, options, data_dir=data_dir, namespace=namespace)
