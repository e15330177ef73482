"""The server's config: what ``prism serve`` runs, checked as it is built.

``ServerConfig`` validates itself on construction (msgspec calls
``__post_init__`` for decoded structs too), so an invalid one cannot exist and
nothing past start-up checks config again. Each check raises ``FieldError``
naming the field; ``prism.config.load`` adds where the value came from.
"""

from __future__ import annotations

import math

import msgspec

from prism.config.fields import GIB, KIB, MIB, FieldError, parse_host_port
from prism.config.limits import Http2Config, validate_limits
from prism.config.namespaces import NamespaceConfig, TenantConfig, check_name, validate_namespaces
from prism.config.quotas import OverloadConfig, validate_limits_table, validate_overload
from prism.config.security import (
    AccessRule,
    AdminConfig,
    AuthConfig,
    TlsConfig,
    security_on,
    validate_access,
    validate_admin,
    validate_auth,
    validate_tls,
)
from prism.config.tracing import TracingConfig, validate_tracing

MIN_MESSAGE_BYTES = 1 * KIB
MAX_MESSAGE_BYTES = 2 * GIB - 1  # gRPC frames a message length in 31 usable bits
MAX_STREAMS = 2**31 - 1  # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS is 31-bit in practice

LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
COMPRESS_ANSWERS: tuple[str, ...] = ("compressed_calls", "accepting_clients")
DEFAULT_TENANT = "default"


class CacheTableConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The one shared-memory cache table all workers use (sized at start-up)."""

    total_bytes: int = 64 * MIB
    slot_bytes: int = 4 * KIB


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
    # Answers this large or more, to a call whose request came compressed
    # (gzip or deflate) by a client that accepts it, are compressed the same
    # way; with compress_answers = "accepting_clients", to any call whose
    # client accepts gzip or deflate (stock clients all do).
    compression_min_bytes: int = 1 * KIB
    compress_answers: str = "compressed_calls"
    max_concurrent_streams: int = 100
    namespaces: tuple[NamespaceConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    workers: int = 0
    cache: CacheTableConfig = CacheTableConfig()
    log_level: str = "info"
    graceful_timeout_s: float = 10.0
    heartbeat_timeout_s: float = 5.0
    # Security (prism.config.security): TLS on the gRPC port, callers'
    # identities, who may do what; the admin port's token and TLS.
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    access: tuple[AccessRule, ...] = ()
    audit_writes: bool = False  # also one audit line per allowed write (denials always get one)
    admin_token_file: str = ""
    admin: AdminConfig = AdminConfig()
    # What one peer may take (prism.config.limits).
    max_inflight: int = 4096  # calls in flight per worker; beyond: RESOURCE_EXHAUSTED at once
    http2: Http2Config = Http2Config()
    overload: OverloadConfig = OverloadConfig()  # adaptive shedding (prism.config.quotas)
    tracing: TracingConfig = TracingConfig()  # spans over OTLP, the access log (prism.config.tracing)

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

    @property
    def streams_per_connection(self) -> int:
        """``http2.max_concurrent_streams``, else the top-level ``max_concurrent_streams``."""
        return self.http2.max_concurrent_streams or self.max_concurrent_streams

    @property
    def secured(self) -> bool:
        """Whether every data call needs a principal that an access rule allows."""
        return security_on(self.auth, self.tls, self.access)


def _validate(cfg: ServerConfig) -> None:
    """Check what types alone cannot; raise ``FieldError`` for the first problem."""
    try:
        parse_host_port(cfg.listen)
    except ValueError as exc:
        raise FieldError("listen", str(exc)) from None
    if not cfg.data_dir:
        raise FieldError("data_dir", "must not be empty")
    if not MIN_MESSAGE_BYTES <= cfg.max_message_bytes <= MAX_MESSAGE_BYTES:
        raise FieldError(
            "max_message_bytes",
            f"{cfg.max_message_bytes} out of range ({MIN_MESSAGE_BYTES}-{MAX_MESSAGE_BYTES})",
        )
    if not 0 <= cfg.compression_min_bytes <= MAX_MESSAGE_BYTES:
        raise FieldError(
            "compression_min_bytes",
            f"{cfg.compression_min_bytes} out of range (0-{MAX_MESSAGE_BYTES})",
        )
    if cfg.compress_answers not in COMPRESS_ANSWERS:
        raise FieldError(
            "compress_answers", f"{cfg.compress_answers!r} is not one of {', '.join(COMPRESS_ANSWERS)}"
        )
    if not 1 <= cfg.max_concurrent_streams <= MAX_STREAMS:
        raise FieldError(
            "max_concurrent_streams",
            f"{cfg.max_concurrent_streams} out of range (1-{MAX_STREAMS})",
        )
    if cfg.log_level not in LOG_LEVELS:
        raise FieldError("log_level", f"{cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if not (math.isfinite(cfg.graceful_timeout_s) and cfg.graceful_timeout_s >= 0):
        raise FieldError(
            "graceful_timeout_s",
            f"{cfg.graceful_timeout_s} must be a finite number of seconds >= 0",
        )
    try:
        parse_host_port(cfg.admin_listen)
    except ValueError as exc:
        raise FieldError("admin_listen", str(exc)) from None
    if cfg.workers < 0:
        raise FieldError("workers", f"{cfg.workers} must be >= 0 (0: one per CPU)")
    if not 0 < cfg.heartbeat_timeout_s < math.inf:
        raise FieldError("heartbeat_timeout_s", f"{cfg.heartbeat_timeout_s} must be > 0")
    if not 512 <= cfg.cache.slot_bytes <= 16 * MIB:
        raise FieldError("cache.slot_bytes", f"{cfg.cache.slot_bytes} out of range (512-16777216)")
    if cfg.cache.total_bytes < 0:
        raise FieldError("cache.total_bytes", "must be >= 0")
    validate_limits(cfg.http2, cfg.max_inflight, cfg.max_concurrent_streams, cfg.max_message_bytes)
    validate_overload(cfg.overload)
    validate_tracing(cfg.tracing)
    validate_tls(cfg.tls, "tls")
    validate_auth(cfg.auth)
    validate_access(cfg.access, cfg.auth, cfg.tls)
    validate_admin(cfg.admin, cfg.admin_host_port()[0], cfg.admin_token_file)
    seen: set[str] = set()
    validate_namespaces(cfg.namespaces, "namespaces", seen)
    tenant_names: set[str] = set()
    for index, tenant in enumerate(cfg.tenants):
        where = f"tenants[{index}]"
        check_name(tenant.name, f"{where}.name")
        if tenant.name in tenant_names or (tenant.name == DEFAULT_TENANT and cfg.namespaces):
            raise FieldError(f"{where}.name", f'duplicate tenant "{tenant.name}"')
        tenant_names.add(tenant.name)
        if tenant.workers < 1:
            raise FieldError(f"{where}.workers", f"{tenant.workers} must be >= 1")
        if any(cpu < 0 for cpu in tenant.cpus):
            raise FieldError(f"{where}.cpus", "CPU numbers must be >= 0")
        validate_namespaces(tenant.namespaces, f"{where}.namespaces", seen)
        validate_limits_table(tenant.limits, f"{where}.limits")
        _check_memory_single_worker(tenant.namespaces, tenant.workers, where)
    _check_memory_single_worker(cfg.namespaces, cfg.workers, "workers")


def _check_memory_single_worker(namespaces: tuple[NamespaceConfig, ...], workers: int, where: str) -> None:
    # The memory backend keeps data inside one worker process; with several
    # workers each would hold a different copy, and answers would depend on
    # which worker a connection reached.
    if workers > 1:
        for ns in namespaces:
            if ns.backend == "memory":
                raise FieldError(
                    f"{where}.workers" if where != "workers" else "workers",
                    f"namespace {ns.name!r} uses the memory backend, which needs exactly 1 worker",
                )
