"""The Redis cache tier: KeyValue GetItems answers kept in Redis, shared by
every worker and every Prism instance that uses the same Redis and prefix.

Configured per namespace with ``cache = { tier = "redis", url = "redis://...",
ttl_s = 30, key_prefix = "prism:cache:", max_value_bytes = 16384 }``
(``url = "rediss://..."`` for TLS, with ``ca_file`` naming the CAs its
certificate must chain to; default: the system's). It is
the same look-aside protocol as the shared-memory tier (``prism/cache/shared.py``),
with Redis keys in place of shared-memory words, under ``<key_prefix><namespace>:``:

- ``epoch``: 8 random bytes, one per namespace (no TTL);
- ``v:<id>``: 8 random bytes, the record's version (PX ``2 * ttl``, at least 10 s);
- ``e:<hex blake2b-128 of the GetItems request bytes>``: ``epoch + version +
  answer bytes`` (PX: ``ttl_s``, or sooner if an item in the answer expires sooner).

Guarantee: an answer served from the cache is never older than a write
acknowledged before the GetItems started (the acknowledged write's
invalidation reached Redis; see "Redis unreachable" for when it cannot).

- A GetItems makes one round trip, a Lua script that reads the epoch and the
  record version (creating either, with a fresh random value, if absent) and
  the entry. It is a hit only if the entry starts with the current
  ``epoch + version``. On a miss the backend is read AFTER that tag was
  taken, and the answer is stored under it (if it is at most
  ``max_value_bytes``).
- A write, AFTER its backend commit and BEFORE the client hears OK, sets the
  record's version to 8 fresh random bytes (``SET v:<id> <random> PX ...``).

An answer read before a write committed was stored under a tag that the
write's SET has since replaced, so it is never served again. Versions are
random, not INCRed: a version key that expired or was evicted comes back
with a value no entry carries, where a counter would restart at 1 and could
revive entries stored under the old 1. Two concurrent writers each store a
fresh value, and whichever lands last still differs from every tag a reader
took before it (but with probability 2**-64).

Redis unreachable (down, timing out, refusing)
----------------------------------------------
The tier is bypassed, never an error: GetItems answers from the backend
(counted as a miss) and stores nothing. After a failure this process does not
try Redis again for ``RETRY_AFTER_S`` (so a dead Redis costs at most one
timeout per second per namespace and process, not one per call). All
``POOL_SIZE`` connections busy is not a failure: that call bypasses the tier,
and the next one tries again.

A write whose invalidation cannot reach Redis (within ``OP_TIMEOUT_S``, or
while the tier is backed off) is still acknowledged: the backend committed
it, and failing the call would not remove the stale entry anyway. Instead the
id is remembered as *pending* (over ``MAX_PENDING`` ids, the whole namespace
is: the epoch is bumped instead, which invalidates every entry of the
namespace at once) and the tier is *suspect* in this process:

- this process bypasses the tier for reads until every pending invalidation
  has been delivered; delivery is retried first thing in the next operation
  of the tier after the back-off (in the same round trip as the lookup);
- a read that took its tag before an invalidation failed does not store its
  answer (it may predate the write);
- other processes and instances cannot hear of the failed invalidation: an
  entry they read may be older than that write until the pending
  invalidation is delivered or the entry expires. So ``ttl_s`` bounds how
  stale a cached answer can be when Redis is unreachable from some writers
  only (a partition); keep it as short as that tolerance.

Invalidations run shielded from the call's cancellation (bounded by
``OP_TIMEOUT_S``): a client that gives up right after its write committed
does not skip the invalidation.

Operational limits: every process that writes a namespace must have the same
Redis tier (writes from a process without it do not invalidate); the Redis
must not bring back old keys (restore from RDB/AOF, failover to a lagging
replica) while the backends moved on, so run it as a pure cache (``save ""``,
``appendonly no``) or flush it after such an event; Redis Cluster is not
supported (one script reads three keys without a hash tag).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from prism import metrics
from prism.config import CacheConfig
from prism.drivers import resp
from prism.proto import kv_pb2

__all__ = ["MAX_PENDING", "OP_TIMEOUT_S", "RETRY_AFTER_S", "RedisTier"]

log = logging.getLogger("prism.cache.redis")

OP_TIMEOUT_S = 0.5  # one Redis round trip of the tier, connecting included
RETRY_AFTER_S = 1.0  # after a failure, Redis is not tried again for this long
MAX_PENDING = 1024  # undelivered invalidations remembered by id; past that: the epoch
POOL_SIZE = 16
MIN_VERSION_TTL_MS = 10_000
_TAG_BYTES = 16  # epoch (8) + version (8)
# Epochs and versions need to be unique, not secret: ``random`` (seeded from
# the OS once per process) costs no system call per GetItems as os.urandom would.

# KEYS: epoch, version, entry. ARGV: a fresh epoch, a fresh version, the version's TTL (ms).
# Returns {epoch .. version, entry or false}.
_LOOKUP = resp.Script(
    r"""
local e = redis.call('GET', KEYS[1])
if not e then
  e = ARGV[1]
  redis.call('SET', KEYS[1], e)
end
local v = redis.call('GET', KEYS[2])
if not v then
  v = ARGV[2]
  redis.call('SET', KEYS[2], v, 'PX', ARGV[3])
end
return {e .. v, redis.call('GET', KEYS[3])}
"""
)

_Read = Callable[[], Awaitable[kv_pb2.GetItemsResponse]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Unusable(Exception):
    """A reply that is not what the tier wrote or expects: treated as a Redis failure."""


class RedisTier:
    """One namespace's Redis cache tier in one process; see the module docstring.

    Connections are opened on first use, so a Redis that is down when the
    namespace opens only means misses until it is up.
    """

    def __init__(
        self,
        namespace: str,
        *,
        url: str,
        key_prefix: str,
        ttl_ms: int,
        max_value_bytes: int,
        op_timeout_s: float = OP_TIMEOUT_S,
        retry_after_s: float = RETRY_AFTER_S,
        max_pending: int = MAX_PENDING,
        pool_size: int = POOL_SIZE,
        ca_file: str = "",
    ) -> None:
        self.namespace = namespace
        self.ttl_ms = max(1, ttl_ms)
        self.max_value_bytes = max_value_bytes
        self.op_timeout_s = op_timeout_s
        self.retry_after_s = retry_after_s
        self.max_pending = max_pending
        # A pool busy for half the time budget is a busy pool, not a Redis that is down.
        self._pool = resp.Pool(
            resp.Address(url),
            size=pool_size,
            connect_timeout_s=op_timeout_s,
            acquire_timeout_s=op_timeout_s / 2,
            ca_file=ca_file,
        )
        base = f"{key_prefix}{namespace}:".encode()
        self.epoch_key = base + b"epoch"
        self._version_prefix = base + b"v:"
        self._entry_prefix = base + b"e:"
        self._version_ttl_ms = max(2 * self.ttl_ms, MIN_VERSION_TTL_MS)
        # Undelivered invalidations: id -> the trouble count when it failed.
        self._pending: dict[str, int] = {}
        self._epoch_pending = 0  # trouble count of an undelivered epoch bump; 0: none
        self._troubles = 0  # failed invalidations so far (never decreases)
        self._retry_at = -1.0  # trio clock: Redis is not tried before this
        self._down = False

    @classmethod
    def from_config(cls, namespace: str, cache: CacheConfig) -> RedisTier:
        return cls(
            namespace,
            url=cache.url,
            key_prefix=cache.key_prefix,
            ttl_ms=int(cache.ttl_s * 1000),
            max_value_bytes=cache.max_value_bytes,
            ca_file=cache.ca_file,
        )

    # -- keys ---------------------------------------------------------------

    def version_key(self, id: str) -> bytes:
        return self._version_prefix + id.encode()

    def entry_key(self, request: bytes) -> bytes:
        return self._entry_prefix + hashlib.blake2b(request, digest_size=16).hexdigest().encode()

    @property
    def suspect(self) -> bool:
        """Whether reads in this process bypass the tier (backed off, or invalidations pending)."""
        return bool(self._pending or self._epoch_pending) or trio.current_time() < self._retry_at

    # -- the two operations ---------------------------------------------------

    async def get_items(self, id: str, request: bytes, read: _Read) -> bytes:
        """The answer to the GetItems whose serialized request is ``request``:
        from Redis if a current entry is there, else ``read()`` from the backend
        (and stored for the next caller)."""
        troubles = self._troubles
        tag: bytes | None = None
        entry_key = self.entry_key(request)
        if trio.current_time() >= self._retry_at:
            fresh = random.randbytes(_TAG_BYTES)
            lookup = _LOOKUP.command(
                [self.epoch_key, self.version_key(id), entry_key],
                [fresh[:8], fresh[8:], self._version_ttl_ms],
            )
            replies = await self._run([lookup])
            if replies is not None:
                reply = replies[-1]
                if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[0], bytes):
                    tag = reply[0]
                    entry = reply[1]
                    if isinstance(entry, bytes) and entry.startswith(tag) and len(tag) == _TAG_BYTES:
                        metrics.cache_hit(self.namespace)
                        return entry[_TAG_BYTES:]
                else:
                    self._fail(_Unusable(f"unexpected lookup reply {reply!r:.100}"))
        metrics.cache_miss(self.namespace)
        response = await read()
        payload: bytes = response.SerializeToString()
        # Store only under a tag taken before the backend read, and only if no
        # invalidation failed meanwhile (its write may be newer than our read).
        if tag is None or len(payload) > self.max_value_bytes or troubles != self._troubles:
            return payload
        now = _now_ms()
        expires = now + self.ttl_ms
        for item in response.items:
            if item.expires_at_ms:
                expires = min(expires, item.expires_at_ms)
        if expires > now:
            await self._run([[b"SET", entry_key, tag + payload, b"PX", expires - now]])
        return payload

    async def invalidate(self, id: str) -> None:
        """Give record ``id`` a new version: call AFTER the backend committed a
        write to it, BEFORE the client hears OK. Never raises: if Redis cannot
        be reached the id is remembered and delivered later (module docstring)."""
        if trio.current_time() < self._retry_at:
            self._remember(id)
            return
        with trio.CancelScope(shield=True):
            if await self._run([self._new_version(id)]) is None:
                self._remember(id)

    def close(self) -> None:
        """Stop using Redis: idle connections close now, busy ones when released."""
        self._pool.close_nowait()

    async def aclose(self) -> None:
        await self._pool.aclose()

    # -- plumbing -----------------------------------------------------------

    def _new_version(self, id: str) -> list[resp.Arg]:
        return [b"SET", self.version_key(id), random.randbytes(8), b"PX", self._version_ttl_ms]

    def _remember(self, id: str) -> None:
        self._troubles += 1
        if self._epoch_pending:
            self._epoch_pending = self._troubles
        elif len(self._pending) >= self.max_pending:
            self._pending.clear()
            self._epoch_pending = self._troubles
        else:
            self._pending[id] = self._troubles

    def _flush_commands(self) -> tuple[list[list[resp.Arg]], dict[str, int], int]:
        """Commands delivering the pending invalidations, and what they cover."""
        pending = dict(self._pending)
        epoch = self._epoch_pending
        commands = [self._new_version(id) for id in pending]
        if epoch:
            commands.append([b"SET", self.epoch_key, random.randbytes(8)])
        return commands, pending, epoch

    async def _run(self, commands: Sequence[Sequence[resp.Arg]]) -> list[resp.Reply] | None:
        """Deliver pending invalidations, then ``commands``, in one round trip
        (``_LOOKUP``'s EVALSHA among them runs again after loading it if the
        server lost the script); their replies, or None if Redis failed (then
        the tier backs off)."""
        flush, pending, epoch = (
            self._flush_commands() if self._pending or self._epoch_pending else ([], {}, 0)
        )
        batch = [*flush, *commands]
        replies: list[resp.Reply] = []
        with trio.move_on_after(self.op_timeout_s) as scope:
            try:
                conn = await self._pool.acquire()
                try:
                    replies = await conn.pipeline_scripts(batch, _LOOKUP)
                finally:
                    self._pool.put_back(conn)
                for reply in replies:
                    if isinstance(reply, resp.ReplyError):
                        raise reply
            except resp.PoolTimeout:
                return None  # busy, not down: no back-off, and pending stays pending
            except (resp.RedisError, OSError) as exc:
                self._fail(exc)
                return None
        if scope.cancelled_caught:
            self._fail(TimeoutError(f"no answer within {self.op_timeout_s:g} s"))
            return None
        # Delivered: forget what the flush covered unless it failed again since.
        for id, count in pending.items():
            if self._pending.get(id) == count:
                del self._pending[id]
        if epoch and self._epoch_pending == epoch:
            self._epoch_pending = 0
        if self._down:
            self._down = False
            log.info("namespace %s: the Redis cache tier answers again", self.namespace)
        return replies

    def _fail(self, exc: Exception) -> None:
        self._retry_at = trio.current_time() + self.retry_after_s
        if not self._down:
            self._down = True
            log.warning(
                "namespace %s: Redis cache tier unusable (%s): bypassing it, retrying every %g s",
                self.namespace,
                exc,
                self.retry_after_s,
            )
