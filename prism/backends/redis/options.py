"""Options of the Redis backend (msgspec only: config loading imports this)."""

from __future__ import annotations

from prism.backends.options import (
    DEFAULT_TOMBSTONE_TTL_S,
    OptionError,
    Options,
    PoolSize,
    Seconds,
    TombstoneTtl,
)
from prism.drivers.addresses import RedisAddress

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisOptions(Options, frozen=True):
    """``url`` (``redis://[[user]:password@]host[:port][/db]``, or
    ``rediss://`` for TLS), ``ca_file`` (``rediss://`` only: a PEM bundle of
    the CAs the server's certificate must chain to; default: the system's),
    ``pool_size`` (connections), ``connect_timeout_s``, ``pool_timeout_s``
    (the longest wait for a free connection before RESOURCE_EXHAUSTED),
    ``key_prefix`` (every key of the namespace starts with it and the
    namespace's name), ``coalesce_reads`` (on by default: concurrent
    reads go out together, pipelined on one connection, and so do concurrent
    writes), and ``require_persistence`` (off by default: a Redis with
    neither AOF nor RDB snapshots is served with a warning; on: the
    namespace is not served on it, see ``persistence``), and
    ``tombstone_ttl_s`` (how long a delete's tombstones are kept)."""

    url: str = DEFAULT_URL
    ca_file: str = ""
    pool_size: PoolSize = 8
    connect_timeout_s: Seconds = 5.0
    pool_timeout_s: Seconds = 0.5
    key_prefix: str = "prism:"
    coalesce_reads: bool = True
    require_persistence: bool = False
    tombstone_ttl_s: TombstoneTtl = DEFAULT_TOMBSTONE_TTL_S

    def __post_init__(self) -> None:
        try:
            address = RedisAddress(self.url)
        except ValueError as exc:
            raise OptionError("url", str(exc)) from None
        if self.ca_file and not address.tls:
            raise OptionError("ca_file", "is only used with a rediss:// URL")

    def address(self) -> RedisAddress:
        return RedisAddress(self.url)
