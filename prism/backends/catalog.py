"""Which backends exist for each abstraction, and which options each takes.

Light on purpose (msgspec and the engines' options modules only): config
loading, in the supervisor process, checks every namespace against this
table, and that process must never import trio, a driver or a backend
(``prism.backends.registry`` builds the backends, in the workers).

A third-party KeyValue backend (an entry point in the ``prism.backends``
group, see ``registry``) is known here by its entry point's name only: its
options stay a plain table, checked by its own factory when a worker builds
it, since loading the plugin here would import whatever it imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prism.backends.memory.options import (
    MemoryKeyValueOptions,
    MemoryPubSubOptions,
    MemoryTimeSeriesOptions,
)
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.options import Options, convert
from prism.backends.postgres.options import PostgresKeyValueOptions, PostgresTimeSeriesOptions
from prism.backends.redis.options import RedisOptions
from prism.backends.sqlite.options import SqliteOptions, SqliteTimeSeriesOptions
from prism.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

ENTRY_POINT_GROUP = "prism.backends"

OPTIONS: Mapping[tuple[str, str], type[Options]] = {
    ("keyvalue", "memory"): MemoryKeyValueOptions,
    ("keyvalue", "sqlite"): SqliteOptions,
    ("keyvalue", "postgres"): PostgresKeyValueOptions,
    ("keyvalue", "redis"): RedisOptions,
    ("timeseries", "memory"): MemoryTimeSeriesOptions,
    ("timeseries", "sqlite"): SqliteTimeSeriesOptions,
    ("timeseries", "postgres"): PostgresTimeSeriesOptions,
    ("pubsub", "memory"): MemoryPubSubOptions,
    ("pubsub", "nats"): NatsPubSubOptions,
}


class UnknownBackend(ConfigError):
    """No built-in backend (and, for KeyValue, no installed plugin) of that name."""


def builtin(abstraction: str) -> list[str]:
    """The built-in backends of ``abstraction``, sorted."""
    return sorted(name for kind, name in OPTIONS if kind == abstraction)


def plugins(name: str | None = None) -> list[EntryPoint]:
    """Installed plugins' entry points (all, or those called ``name``), read
    from package metadata: nothing is loaded."""
    # Imported here: importlib.metadata costs more to import than the rest of
    # config loading, and only a namespace naming no built-in backend needs it.
    from importlib.metadata import entry_points

    found = (
        entry_points(group=ENTRY_POINT_GROUP)
        if name is None
        else entry_points(group=ENTRY_POINT_GROUP, name=name)
    )
    return list(found)


def plugin_names() -> set[str]:
    return {ep.name for ep in plugins()}


def known_backends() -> list[str]:
    """KeyValue backends config may name: the built-ins and installed plugins."""
    return sorted(set(builtin("keyvalue")) | plugin_names())


def check(abstraction: str, backend: str, options: Mapping[str, Any]) -> Options | None:
    """A namespace's options as its backend's struct (None for a plugin, whose
    factory checks its own); UnknownBackend or OptionError if they cannot serve."""
    cls = OPTIONS.get((abstraction, backend))
    if cls is not None:
        return convert(options, cls)
    if abstraction == "keyvalue" and plugins(backend):
        return None
    if abstraction == "keyvalue":
        known = ", ".join(known_backends())
        raise UnknownBackend(f"unknown backend {backend!r}; known backends: {known}")
    known = ", ".join(builtin(abstraction))
    raise UnknownBackend(f"unknown {abstraction} backend {backend!r}; known: {known}")
