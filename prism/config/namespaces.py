"""A namespace's config: its backend, its options and its cache, and the
checks that need nothing but the namespace itself.

A namespace's ``options`` stay a plain table (the routing table hands it to
the workers as is) and are checked here against the backend's options struct
(``prism.backends.catalog``, which imports no trio and no driver: this runs
in the supervisor process).
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from prism.backends import catalog
from prism.backends.options import OptionError
from prism.config.fields import KIB, MIB, FieldError, check_redis_url
from prism.config.quotas import LimitsConfig, validate_limits_table
from prism.validation import join

ABSTRACTIONS: frozenset[str] = frozenset({"keyvalue", "timeseries", "pubsub"})
_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def check_name(name: str, field: str) -> None:
    """Namespace and tenant names: what routing, metrics labels and file names accept."""
    if not _NAMESPACE_NAME.fullmatch(name):
        raise FieldError(field, f"{name!r} must be 1-128 characters of A-Z a-z 0-9 _ . -")


CACHE_TIERS: tuple[str, ...] = ("shared", "redis")


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A namespace's look-aside cache for GetItems answers.

    ``tier = "shared"`` (the default) is the shared-memory table of this
    host's workers (used when ``enabled``); ``tier = "redis"`` keeps answers
    in the Redis at ``url`` under ``key_prefix``, shared by every Prism
    instance using it (see ``prism/cache/redis.py``), and implies
    ``enabled``. A ``rediss://`` url is TLS, checked against ``ca_file``
    (default: the system's CAs).
    """

    enabled: bool = False
    ttl_s: float = 30.0
    max_value_bytes: int = 16 * KIB
    tier: str = "shared"
    url: str = ""
    key_prefix: str = "prism:cache:"
    ca_file: str = ""

    def __post_init__(self) -> None:
        if self.tier == "redis" and not self.enabled:
            msgspec.structs.force_setattr(self, "enabled", True)


class NamespaceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One namespace: the unit of routing, and which backend holds its data.

    ``options`` are backend- and abstraction-specific (``retention_days``,
    ``dedup_window_s``...). They stay a plain table here (the routing table
    hands it to the workers as is), checked at load against the backend's
    options struct (``prism.backends.catalog``), so a mistake stops start-up
    with a line naming ``namespaces[N].options.FIELD``.
    """

    name: str
    abstraction: str = "keyvalue"
    backend: str = "sqlite"
    options: dict[str, Any] = {}
    cache: CacheConfig = CacheConfig()
    limits: LimitsConfig | None = None  # per worker (prism.config.quotas)


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant: its namespaces are served by its own worker processes only.

    ``workers`` processes are pinned round robin over ``cpus`` (default: every
    CPU this process may use).
    """

    name: str
    workers: int = 1
    cpus: tuple[int, ...] = ()
    namespaces: tuple[NamespaceConfig, ...] = ()
    limits: LimitsConfig | None = None  # shared by its namespaces, per worker (prism.config.quotas)


def validate_namespaces(namespaces: tuple[NamespaceConfig, ...], field: str, seen: set[str]) -> None:
    """Check ``namespaces`` (at ``field``); ``seen`` collects names across tenants."""
    for index, ns in enumerate(namespaces):
        where = f"{field}[{index}]"
        check_name(ns.name, f"{where}.name")
        if ns.name in seen:
            raise FieldError(f"{where}.name", f'duplicate namespace "{ns.name}"')
        seen.add(ns.name)
        if ns.abstraction not in ABSTRACTIONS:
            known = ", ".join(sorted(ABSTRACTIONS))
            raise FieldError(
                f"{where}.abstraction", f"unknown abstraction {ns.abstraction!r} (known: {known})"
            )
        if not ns.backend:
            raise FieldError(f"{where}.backend", "must not be empty")
        _check_backend(ns, where)
        if ns.cache.enabled and ns.abstraction != "keyvalue":
            raise FieldError(f"{where}.cache.enabled", "the cache serves KeyValue GetItems only")
        if ns.cache.ttl_s <= 0 or not math.isfinite(ns.cache.ttl_s):
            raise FieldError(f"{where}.cache.ttl_s", f"{ns.cache.ttl_s} must be > 0")
        if ns.cache.max_value_bytes < 1:
            raise FieldError(f"{where}.cache.max_value_bytes", "must be >= 1")
        _validate_cache_tier(ns.cache, f"{where}.cache")
        validate_limits_table(ns.limits, f"{where}.limits")


def _check_backend(ns: NamespaceConfig, where: str) -> None:
    """The backend exists for the abstraction and takes these options."""
    try:
        catalog.check(ns.abstraction, ns.backend, ns.options)
    except catalog.UnknownBackend as exc:
        raise FieldError(f"{where}.backend", str(exc)) from None
    except OptionError as exc:
        raise FieldError(f"{where}.{join('options', exc.field)}", exc.reason) from None


def _validate_cache_tier(cache: CacheConfig, where: str) -> None:
    if cache.tier not in CACHE_TIERS:
        known = ", ".join(CACHE_TIERS)
        raise FieldError(f"{where}.tier", f"unknown cache tier {cache.tier!r} (known: {known})")
    if cache.tier != "redis":
        for name in ("url", "ca_file"):
            if getattr(cache, name):
                raise FieldError(f"{where}.{name}", 'is only used with tier = "redis"')
        return
    if not cache.url:
        raise FieldError(f"{where}.url", 'required with tier = "redis" (e.g. "redis://127.0.0.1:6379/0")')
    try:
        check_redis_url(cache.url)
    except ValueError as exc:
        raise FieldError(f"{where}.url", str(exc)) from None
    if cache.ca_file and not cache.url.startswith("rediss://"):
        raise FieldError(f"{where}.ca_file", "is only used with a rediss:// url")
    if not cache.key_prefix:
        raise FieldError(f"{where}.key_prefix", "must not be empty")
    if cache.max_value_bytes > 512 * MIB:
        raise FieldError(f"{where}.max_value_bytes", "must be <= 536870912 (a Redis string's limit)")
