"""Server configuration: frozen structs, loaded and validated once at start-up.

Values come from four layers, highest first: command-line flags, ``PRISM_*``
environment variables, a TOML file, and the defaults below. Layers are merged
as plain data before decoding, so a struct is built (and validated) exactly
once; an invalid ``ServerConfig`` cannot exist, which is why nothing past
start-up ever checks config again.

Every failure is a ``ConfigError`` whose text is one line that starts with the
field it is about (``namespaces[1].name: duplicate namespace "x"``), because
an operator reading a failed start-up wants to know which line to fix.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import msgspec

from prism.backends import catalog
from prism.backends.options import OptionError
from prism.errors import ConfigError
from prism.validation import join, one_line, rephrase

__all__ = [
    "ABSTRACTIONS",
    "DEFAULT_CONFIG_FILE",
    "ENV_VARS",
    "LOG_LEVELS",
    "CacheConfig",
    "CacheTableConfig",
    "NamespaceConfig",
    "ServerConfig",
    "TenantConfig",
    "load_config",
    "parse_host_port",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

MIN_MESSAGE_BYTES = 1 * KIB
MAX_MESSAGE_BYTES = 2 * GIB - 1  # gRPC frames a message length in 31 usable bits
MAX_STREAMS = 2**31 - 1  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS is 31-bit in practice

ABSTRACTIONS: frozenset[str] = frozenset({"keyvalue", "timeseries", "pubsub"})
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
DEFAULT_CONFIG_FILE = "prism.toml"
CONFIG_PATH_ENV = "PRISM_CONFIG"

_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


CACHE_TIERS: tuple[str, ...] = ("shared", "redis")


class CacheConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A namespace's look-aside cache for GetItems answers.

    ``tier = "shared"`` (the default) is the shared-memory table of this
    host's workers (used when ``enabled``); ``tier = "redis"`` keeps answers
    in the Redis at ``url`` under ``key_prefix``, shared by every Prism
    instance using it (see ``prism/cache/redis.py``), and implies
    ``enabled``.
    """

    enabled: bool = False
    ttl_s: float = 30.0
    max_value_bytes: int = 16 * KIB
    tier: str = "shared"
    url: str = ""
    key_prefix: str = "prism:cache:"

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


class TenantConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant: its namespaces are served by its own worker processes only.

    ``workers`` processes are pinned round robin over ``cpus`` (default: every
    CPU this process may use).
    """

    name: str
    workers: int = 1
    cpus: tuple[int, ...] = ()
    namespaces: tuple[NamespaceConfig, ...] = ()


class CacheTableConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The one shared-memory cache table all workers use (sized at start-up)."""

    total_bytes: int = 64 * MIB
    slot_bytes: int = 4 * KIB


DEFAULT_TENANT = "default"


class ServerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything ``prism serve`` needs; validated on construction.

    Top-level ``namespaces`` belong to the tenant ``default``, which runs
    ``workers`` processes (0: one per CPU). With neither ``namespaces`` nor
    ``tenants`` the server serves namespace ``default`` on SQLite.
    """

    listen: str = "127.0.0.1:8980"
    admin_listen: str = "127.0.0.1:8981"
    data_dir: str = ".prism"
    max_message_bytes: int = 4 * MIB
    max_concurrent_streams: int = 100
    namespaces: tuple[NamespaceConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    workers: int = 0
    cache: CacheTableConfig = CacheTableConfig()
    log_level: str = "info"
    graceful_timeout_s: float = 10.0
    heartbeat_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.namespaces and not self.tenants:
            msgspec.structs.force_setattr(self, "namespaces", (NamespaceConfig(name="default"),))
        # msgspec calls this for decoded structs too, so ``load_config`` and
        # code that builds a config by hand (tests) get the same checks.
        _validate(self)

    def listen_host_port(self) -> tuple[str, int]:
        """``listen`` split into the host to bind and the port number."""
        return parse_host_port(self.listen)

    def admin_host_port(self) -> tuple[str, int]:
        return parse_host_port(self.admin_listen)

    def effective_tenants(self, cpu_count: int) -> tuple[TenantConfig, ...]:
        """The configured tenants, plus ``default`` holding top-level namespaces."""
        if not self.namespaces:
            return self.tenants
        workers = self.workers or cpu_count
        if not self.workers and any(ns.backend == "memory" for ns in self.namespaces):
            workers = 1  # memory holds data inside one process: several would disagree
        default = TenantConfig(DEFAULT_TENANT, workers=workers, namespaces=self.namespaces)
        return (*self.tenants, default)

    def all_namespaces(self) -> tuple[NamespaceConfig, ...]:
        return (*self.namespaces, *(ns for t in self.tenants for ns in t.namespaces))


class _FieldError(ConfigError):
    """A ConfigError that remembers its field, so the loader can name its source."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


def parse_host_port(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPV6]:PORT``; raises ValueError saying what is wrong.

    Brackets are required around IPv6 hosts because ``::1:8980`` has no single
    reading. The returned host has its brackets removed, ready for ``bind``.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError(f"empty IPv6 address in {address!r}")
    elif ":" in host or "[" in host or "]" in host:
        raise ValueError(f"IPv6 hosts need brackets, e.g. [::1]:8980, got {address!r}")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range (1-65535)")
    return host, port


def _validate(cfg: ServerConfig) -> None:
    """Check what types alone cannot; raise ``_FieldError`` for the first problem."""
    try:
        parse_host_port(cfg.listen)
    except ValueError as exc:
        raise _FieldError("listen", str(exc)) from None
    if not cfg.data_dir:
        raise _FieldError("data_dir", "must not be empty")
    if not MIN_MESSAGE_BYTES <= cfg.max_message_bytes <= MAX_MESSAGE_BYTES:
        raise _FieldError(
            "max_message_bytes",
            f"{cfg.max_message_bytes} out of range ({MIN_MESSAGE_BYTES}-{MAX_MESSAGE_BYTES})",
        )
    if not 1 <= cfg.max_concurrent_streams <= MAX_STREAMS:
        raise _FieldError(
            "max_concurrent_streams",
            f"{cfg.max_concurrent_streams} out of range (1-{MAX_STREAMS})",
        )
    if cfg.log_level not in LOG_LEVELS:
        raise _FieldError("log_level", f"{cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if not (math.isfinite(cfg.graceful_timeout_s) and cfg.graceful_timeout_s >= 0):
        raise _FieldError(
            "graceful_timeout_s",
            f"{cfg.graceful_timeout_s} must be a finite number of seconds >= 0",
        )
    try:
        parse_host_port(cfg.admin_listen)
    except ValueError as exc:
        raise _FieldError("admin_listen", str(exc)) from None
    if cfg.workers < 0:
        raise _FieldError("workers", f"{cfg.workers} must be >= 0 (0: one per CPU)")
    if not 0 < cfg.heartbeat_timeout_s < math.inf:
        raise _FieldError("heartbeat_timeout_s", f"{cfg.heartbeat_timeout_s} must be > 0")
    if not 512 <= cfg.cache.slot_bytes <= 16 * MIB:
        raise _FieldError("cache.slot_bytes", f"{cfg.cache.slot_bytes} out of range (512-16777216)")
    if cfg.cache.total_bytes < 0:
        raise _FieldError("cache.total_bytes", "must be >= 0")
    seen: set[str] = set()
    _validate_namespaces(cfg.namespaces, "namespaces", seen)
    tenant_names: set[str] = set()
    for index, tenant in enumerate(cfg.tenants):
        where = f"tenants[{index}]"
        if not _NAMESPACE_NAME.fullmatch(tenant.name):
            raise _FieldError(
                f"{where}.name", f"{tenant.name!r} must be 1-128 characters of A-Z a-z 0-9 _ . -"
            )
        if tenant.name in tenant_names or (tenant.name == DEFAULT_TENANT and cfg.namespaces):
            raise _FieldError(f"{where}.name", f'duplicate tenant "{tenant.name}"')
        tenant_names.add(tenant.name)
        if tenant.workers < 1:
            raise _FieldError(f"{where}.workers", f"{tenant.workers} must be >= 1")
        if any(cpu < 0 for cpu in tenant.cpus):
            raise _FieldError(f"{where}.cpus", "CPU numbers must be >= 0")
        _validate_namespaces(tenant.namespaces, f"{where}.namespaces", seen)
        _check_memory_single_worker(tenant.namespaces, tenant.workers, where)
    _check_memory_single_worker(cfg.namespaces, cfg.workers, "workers")


def _check_memory_single_worker(namespaces: tuple[NamespaceConfig, ...], workers: int, where: str) -> None:
    # The memory backend keeps data inside one worker process; with several
    # workers each would hold a different copy, and answers would depend on
    # which worker a connection reached.
    if workers > 1:
        for ns in namespaces:
            if ns.backend == "memory":
                raise _FieldError(
                    f"{where}.workers" if where != "workers" else "workers",
                    f"namespace {ns.name!r} uses the memory backend, which needs exactly 1 worker",
                )


def _validate_namespaces(namespaces: tuple[NamespaceConfig, ...], field: str, seen: set[str]) -> None:
    for index, ns in enumerate(namespaces):
        where = f"{field}[{index}]"
        if not _NAMESPACE_NAME.fullmatch(ns.name):
            raise _FieldError(
                f"{where}.name",
                f"{ns.name!r} must be 1-128 characters of A-Z a-z 0-9 _ . -",
            )
        if ns.name in seen:
            raise _FieldError(f"{where}.name", f'duplicate namespace "{ns.name}"')
        seen.add(ns.name)
        if ns.abstraction not in ABSTRACTIONS:
            known = ", ".join(sorted(ABSTRACTIONS))
            raise _FieldError(
                f"{where}.abstraction", f"unknown abstraction {ns.abstraction!r} (known: {known})"
            )
        if not ns.backend:
            raise _FieldError(f"{where}.backend", "must not be empty")
        _check_backend(ns, where)
        if ns.cache.enabled and ns.abstraction != "keyvalue":
            raise _FieldError(f"{where}.cache.enabled", "the cache serves KeyValue GetItems only")
        if ns.cache.ttl_s <= 0 or not math.isfinite(ns.cache.ttl_s):
            raise _FieldError(f"{where}.cache.ttl_s", f"{ns.cache.ttl_s} must be > 0")
        if ns.cache.max_value_bytes < 1:
            raise _FieldError(f"{where}.cache.max_value_bytes", "must be >= 1")
        _validate_cache_tier(ns.cache, f"{where}.cache")


def _check_backend(ns: NamespaceConfig, where: str) -> None:
    """The backend exists for the abstraction and takes these options."""
    try:
        catalog.check(ns.abstraction, ns.backend, ns.options)
    except catalog.UnknownBackend as exc:
        raise _FieldError(f"{where}.backend", str(exc)) from None
    except OptionError as exc:
        raise _FieldError(f"{where}.{join('options', exc.field)}", exc.reason) from None


def _validate_cache_tier(cache: CacheConfig, where: str) -> None:
    if cache.tier not in CACHE_TIERS:
        known = ", ".join(CACHE_TIERS)
        raise _FieldError(f"{where}.tier", f"unknown cache tier {cache.tier!r} (known: {known})")
    if cache.tier != "redis":
        if cache.url:
            raise _FieldError(f"{where}.url", 'is only used with tier = "redis"')
        return
    if not cache.url:
        raise _FieldError(f"{where}.url", 'required with tier = "redis" (e.g. "redis://127.0.0.1:6379/0")')
    try:
        _check_redis_url(cache.url)
    except ValueError as exc:
        raise _FieldError(f"{where}.url", str(exc)) from None
    if not cache.key_prefix:
        raise _FieldError(f"{where}.key_prefix", "must not be empty")
    if cache.max_value_bytes > 512 * MIB:
        raise _FieldError(f"{where}.max_value_bytes", "must be <= 536870912 (a Redis string's limit)")


def _check_redis_url(url: str) -> None:
    """``redis://[[user]:password@]host[:port][/db]``, or ValueError saying what is wrong
    (never echoing the URL, which may hold a password)."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"expected a redis:// URL, got scheme {parts.scheme!r}")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number in 1-65535") from None
    if port == 0:
        raise ValueError("the port is not a number in 1-65535")
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ValueError(f"the database {db!r} is not a number")
    if parts.query or parts.fragment:
        raise ValueError("query strings and fragments are not supported")


# ---------------------------------------------------------------- loading


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f'expected an integer, got "{text}"') from None


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f'expected a number, got "{text}"') from None


# Environment variable -> (field, parser). Parsing happens here rather than in
# msgspec so that a bad value is reported under the variable's name.
ENV_VARS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "PRISM_LISTEN": ("listen", str),
    "PRISM_DATA_DIR": ("data_dir", str),
    "PRISM_MAX_MESSAGE_BYTES": ("max_message_bytes", _parse_int),
    "PRISM_MAX_CONCURRENT_STREAMS": ("max_concurrent_streams", _parse_int),
    "PRISM_LOG_LEVEL": ("log_level", str),
    "PRISM_GRACEFUL_TIMEOUT_S": ("graceful_timeout_s", _parse_float),
    "PRISM_ADMIN_LISTEN": ("admin_listen", str),
    "PRISM_WORKERS": ("workers", _parse_int),
}


def load_config(
    path: str | None,
    env: Mapping[str, str],
    overrides: Mapping[str, Any],
) -> ServerConfig:
    """Build the server config from flags > ``PRISM_*`` env > TOML file > defaults.

    ``path`` is the file the user named (``--config``); without it the file is
    ``$PRISM_CONFIG``, else ``./prism.toml`` when it exists, else none.
    ``overrides`` maps field names to flag values; ``None`` means "flag not
    given". Empty environment variables count as unset, as shells and
    container specs often leave them empty rather than absent.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_path = _config_path(path, env)
    if file_path is not None:
        for field, value in _read_toml(file_path).items():
            values[field] = value
            sources[field] = file_path
    for name, (field, value) in _env_values(env).items():
        values[field] = value
        sources[field] = name
    for field, value in overrides.items():
        if value is None:
            continue
        if field not in ServerConfig.__struct_fields__:
            raise ConfigError(f"{field}: unknown setting")
        values[field] = value
        sources[field] = "--" + field.replace("_", "-")
    if values.get("namespaces") == [] and not values.get("tenants"):
        raise ConfigError(
            _with_source("namespaces: at least one namespace is required", "namespaces", sources)
        )
    return _decode(values, sources)


def _config_path(path: str | None, env: Mapping[str, str]) -> str | None:
    if path:
        return path
    from_env = env.get(CONFIG_PATH_ENV)
    if from_env:
        return from_env
    return DEFAULT_CONFIG_FILE if os.path.isfile(DEFAULT_CONFIG_FILE) else None


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {one_line(str(exc))}") from None


def _env_values(env: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    """Parsed ``PRISM_*`` values, keyed by variable name: ``{name: (field, value)}``."""
    values: dict[str, tuple[str, Any]] = {}
    for name, (field, parse) in ENV_VARS.items():
        text = env.get(name)
        if not text:
            continue
        try:
            values[name] = (field, parse(text))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return values


def _decode(values: dict[str, Any], sources: Mapping[str, str]) -> ServerConfig:
    """Decode merged values strictly; rephrase every error as ``field: reason (from X)``."""
    try:
        return msgspec.convert(values, ServerConfig, strict=True)
    except _FieldError as exc:
        raise ConfigError(_with_source(str(exc), exc.field, sources)) from None
    except msgspec.ValidationError as exc:
        field, reason = rephrase(str(exc))
        field = field or "config"
        raise ConfigError(_with_source(f"{field}: {reason}", field, sources)) from None


def _with_source(line: str, field: str, sources: Mapping[str, str]) -> str:
    top = re.split(r"[.\[]", field, maxsplit=1)[0]
    source = sources.get(top)
    return f"{line} (from {source})" if source else line
