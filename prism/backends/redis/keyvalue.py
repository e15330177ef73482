"""KeyValue on Redis, trio-native I/O (``prism.drivers.resp``: no threads, no asyncio).

Data model, under ``<key_prefix><namespace>:``:

- ``z:<id>``: sorted set of the record's item keys, all with score 0, so that
  ZRANGEBYLEX walks them in unsigned bytewise order;
- ``h:<id>``: hash item key -> ``b"<expires_at_ms> <stamp_us> <len(token)> "
  + token + value`` (a text header the Lua scripts can read: Redis's
  ``cmsgpack`` cannot decode msgpack's bin type, so msgpack would not do);
- ``m:<id>``: hash of bookkeeping: ``exp`` (a lower bound of the expiry
  times held; the first write at or after it purges expired items) and
  ``tp`` (when old tokens are next purged);
- ``t:<id>``: hash token -> applied_at_ms (idempotency);
- ``ids``: sorted set of the ids of non-empty records, for ScanItems.

Every write (put, delete, mutate) is ONE Lua script, hence atomic: the token
check, the stamp rule and every change happen together or not at all (input
is validated before Redis is called, so a script never fails half-way).
Reads run one Lua script per record that filters expired items and stops one
item past the page. Timestamps are Lua numbers (doubles): exact to 2^53.
"""

from __future__ import annotations

from collections.abc import Sequence

from prism.backends.coalesce import Coalescer
from prism.backends.keyvalue import (
    IDEMPOTENCY_WINDOW_MS,
    ItemPage,
    ItemWrite,
    MatchAll,
    MatchKeys,
    MatchRange,
    Mutation,
    Predicate,
    Put,
    RecordPage,
    Stamp,
    StoredItem,
)
from prism.backends.paging import RecordPager, check_items, check_mutations, page_items
from prism.backends.redis.errors import ERRORS
from prism.backends.redis.options import RedisOptions
from prism.drivers import resp
from prism.errors import Unavailable

SCAN_CHUNK = 64  # records read per round trip of a scan
BIG = 1 << 53

_LUA_COMMON = r"""
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function meta(v)
  local exp, us, tl, p = string.match(v, '^(%-?%d+) (%-?%d+) (%d+) ()')
  tl = tonumber(tl)
  return tonumber(exp), tonumber(us), string.sub(v, p, p + tl - 1), #v - (p + tl) + 1
end
local function stamp_gt(us1, tok1, us2, tok2)
  if us1 ~= us2 then return us1 > us2 end
  return bytes_lt(tok2, tok1)
end
"""

# KEYS: z, h, m, t, ids. ARGV: id, now, us, token, window, then ops:
#   "p", key, packed, expires_at_ms
#   "d", "a" | "k" <n> keys... | "r" <min> <max>   (lex bounds)
_WRITE = resp.Script(
    _LUA_COMMON
    + r"""
local z, h, m, t, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, now, us, tok, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if tok ~= '' then
  local at = redis.call('HGET', t, tok)
  if at and now - tonumber(at) < window then return 0 end
  redis.call('HSET', t, tok, ARGV[2])
  local tp = tonumber(redis.call('HGET', m, 'tp') or '0')
  if now >= tp then
    local all = redis.call('HGETALL', t)
    for i = 1, #all, 2 do
      if now - tonumber(all[i + 1]) >= window then redis.call('HDEL', t, all[i]) end
    end
    redis.call('HSET', m, 'tp', string.format('%.0f', now + 60000))
  end
end
local bound = tonumber(redis.call('HGET', m, 'exp') or '-1')
if bound >= 0 and now >= bound then
  local all = redis.call('HGETALL', h)
  local nb = -1
  for i = 1, #all, 2 do
    local exp = meta(all[i + 1])
    if exp ~= 0 and exp <= now then
      redis.call('HDEL', h, all[i]); redis.call('ZREM', z, all[i])
    elseif exp ~= 0 and (nb < 0 or exp < nb) then nb = exp end
  end
  bound = nb
  if nb < 0 then redis.call('HDEL', m, 'exp') else redis.call('HSET', m, 'exp', string.format('%.0f', nb)) end
end
local function del(key)
  local old = redis.call('HGET', h, key)
  if old then
    local _, us2, tok2 = meta(old)
    if not stamp_gt(us2, tok2, us, tok) then
      redis.call('HDEL', h, key); redis.call('ZREM', z, key)
    end
  end
end
local i = 6
local n = #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'p' then
    local key, packed, exp = ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    i = i + 4
    local old = redis.call('HGET', h, key)
    local skip = false
    if old then
      local exp2, us2, tok2 = meta(old)
      if stamp_gt(us2, tok2, us, tok) and not (exp2 ~= 0 and exp2 <= now) then skip = true end
    end
    if not skip then
      redis.call('HSET', h, key, packed); redis.call('ZADD', z, 0, key)
      if exp ~= 0 and (bound < 0 or exp < bound) then
        bound = exp; redis.call('HSET', m, 'exp', ARGV[i - 1])
      end
    end
  else
    local kind = ARGV[i + 1]
    if kind == 'a' then
      i = i + 2
      for _, key in ipairs(redis.call('ZRANGE', z, 0, -1)) do del(key) end
    elseif kind == 'k' then
      local cnt = tonumber(ARGV[i + 2])
      for j = i + 3, i + 2 + cnt do del(ARGV[j]) end
      i = i + 3 + cnt
    else
      local lo, hi = ARGV[i + 2], ARGV[i + 3]
      i = i + 4
      for _, key in ipairs(redis.call('ZRANGEBYLEX', z, lo, hi)) do del(key) end
    end
  end
end
if redis.call('ZCARD', z) == 0 then
  redis.call('DEL', z, h); redis.call('HDEL', m, 'exp'); redis.call('ZREM', ids, id)
else
  redis.call('ZADD', ids, 0, id)
end
return 1
"""
)

# KEYS: z, h. ARGV: kind ("l" lex range | "k" keys), rev, now, limit_items,
# limit_bytes, then min max (lex, in forward order) or keys (travel order).
# Returns key, packed, key, packed, ...: the live items of the page and one past it.
_READ = resp.Script(
    _LUA_COMMON
    + r"""
local z, h = KEYS[1], KEYS[2]
local kind, rev = ARGV[1], ARGV[2] == '1'
local now, li, lb = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local out, n, size = {}, 0, 0
local function take(ks, vs)
  for i = 1, #ks do
    local v = vs[i]
    if v then
      local exp, _, _, vlen = meta(v)
      if exp == 0 or exp > now then
        out[#out + 1] = ks[i]; out[#out + 1] = v
        local s = #ks[i] + vlen
        if n > 0 and (n >= li or size + s > lb) then return true end
        n = n + 1; size = size + s
      end
    end
  end
  return false
end
if kind == 'k' then
  local i = 6
  while i <= #ARGV do  -- in chunks: unpack() is bounded by Lua's C stack
    local ks = {}
    for j = i, math.min(i + 255, #ARGV) do ks[#ks + 1] = ARGV[j] end
    i = i + 256
    if take(ks, redis.call('HMGET', h, unpack(ks))) then break end
  end
  return out
end
local lo, hi = ARGV[6], ARGV[7]
local off, chunk = 0, 256
while true do
  local ks
  if rev then ks = redis.call('ZREVRANGEBYLEX', z, hi, lo, 'LIMIT', off, chunk)
  else ks = redis.call('ZRANGEBYLEX', z, lo, hi, 'LIMIT', off, chunk) end
  if #ks == 0 then break end
  if take(ks, redis.call('HMGET', h, unpack(ks))) then break end
  if #ks < chunk then break end
  off = off + chunk
end
return out
"""
)


def _pack(item: ItemWrite, stamp: Stamp) -> bytes:
    token = stamp.token.encode()
    head = b"%d %d %d " % (item.expires_at_ms, stamp.generation_time_us, len(token))
    return head + token + item.value


def _unpack(key: bytes, packed: bytes) -> StoredItem:
    expires, _, token_len, rest = packed.split(b" ", 3)
    return StoredItem(key, rest[int(token_len) :], int(expires))


def _lex_range(predicate: Predicate, reverse: bool, after: bytes | None) -> tuple[bytes, bytes]:
    lo, hi = b"-", b"+"
    if isinstance(predicate, MatchRange):
        if predicate.start:
            lo = b"[" + predicate.start
        if predicate.end:
            hi = b"(" + predicate.end
    if after is not None:
        if reverse:
            if hi == b"+" or after <= hi[1:]:
                hi = b"(" + after
        elif lo == b"-" or after >= lo[1:]:
            lo = b"(" + after
    return lo, hi


class RedisBackend:
    """Options: ``RedisOptions`` (the server, the pool, the key prefix, and
    whether concurrent calls are pipelined together, see ``_coalescer``)."""

    def __init__(self, options: RedisOptions, *, namespace: str) -> None:
        self.key_prefix = options.key_prefix
        self._base = f"{options.key_prefix}{namespace}:".encode()
        self._ids_key = self._base + b"ids"
        self._pool = resp.Pool(
            options.address(),
            size=options.pool_size,
            connect_timeout_s=options.connect_timeout_s,
            acquire_timeout_s=options.pool_timeout_s,
        )
        self._reads: Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply] | None = None
        self._writes: Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply] | None = None
        if options.coalesce_reads:
            self._reads = self._coalescer(_READ, "reads", options.pool_size, options.pool_timeout_s)
            self._writes = self._coalescer(_WRITE, "writes", options.pool_size, options.pool_timeout_s)
        self._opened = False
        self._closed = False

    def _keys(self, id: str) -> list[resp.Arg]:
        b, i = self._base, id.encode()
        return [b + b"z:" + i, b + b"h:" + i, b + b"m:" + i, b + b"t:" + i, self._ids_key]

    async def open(self) -> None:
        """Connect once (so that a wrong URL shows at start-up). Idempotent."""
        if self._opened or self._closed:
            return
        with ERRORS:
            await self._pool.call("PING")
        self._opened = True

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._pool.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers PING (the namespace's health probe)."""
        self._check_open()
        with ERRORS:
            await self._pool.call("PING")

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("redis backend is closed")
        if not self._opened:
            raise RuntimeError("RedisBackend.open() was not awaited")

    async def _eval_many(
        self, script: resp.Script, calls: Sequence[tuple[Sequence[resp.Arg], Sequence[resp.Arg]]]
    ) -> list[resp.Reply]:
        with ERRORS:
            return await self._pool.eval_many(script, calls)

    def _read_call(
        self,
        id: str,
        predicate: Predicate,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> tuple[list[resp.Arg], list[resp.Arg]]:
        keys = self._keys(id)[:2]
        head: list[resp.Arg] = [
            b"1" if reverse else b"0",
            now_ms,
            min(limit_items, BIG),
            min(limit_bytes, BIG),
        ]
        if isinstance(predicate, MatchKeys):
            chosen = sorted(set(predicate.keys), reverse=reverse)
            if after is not None:
                chosen = [k for k in chosen if (k < after if reverse else k > after)]
            return keys, [b"k", *head, *chosen]
        lo, hi = _lex_range(predicate, reverse, after)
        return keys, [b"l", *head, lo, hi]

    @staticmethod
    def _items(reply: list[bytes]) -> list[StoredItem]:
        out = []
        for i in range(0, len(reply), 2):
            out.append(_unpack(reply[i], reply[i + 1]))
        return out

    async def get_items(
        self,
        id: str,
        predicate: Predicate,
        *,
        reverse: bool,
        after: bytes | None,
        limit_items: int,
        limit_bytes: int,
        now_ms: int,
    ) -> ItemPage:
        self._check_open()
        call = self._read_call(id, predicate, reverse, after, limit_items, limit_bytes, now_ms)
        if self._reads is None:
            (reply,) = await self._eval_many(_READ, [call])
        else:
            with ERRORS:
                reply = await self._reads.get(call)
                if isinstance(reply, resp.ReplyError):
                    raise reply
        return page_items(self._items(reply), limit_items, limit_bytes)

    def _coalescer(
        self, script: resp.Script, what: str, pool_size: int, pool_timeout_s: float
    ) -> Coalescer[tuple[list[resp.Arg], list[resp.Arg]], resp.Reply]:
        """Concurrent calls of ``script`` go out together: one pipelined round
        trip per batch, each call still its own atomic script run, and each
        caller gets its own reply (an error, too, stays its own). A write in a
        batch whose leader was cancelled mid-flight may run again when its
        caller retries the batch: with its token that is a replay (no effect),
        without one it is the same stamped write again."""

        async def run(calls: list[tuple[list[resp.Arg], list[resp.Arg]]]) -> list[resp.Reply]:
            return await self._pool.eval_many(script, calls, raise_errors=False)

        return Coalescer(
            run,
            slots=min(2, pool_size),
            wait_timeout_s=pool_timeout_s,
            timeout_error=lambda: resp.PoolTimeout(
                f"redis: {what} waited {pool_timeout_s:g} s behind busy connections"
            ),
        )

    async def scan_items(
        self, *, after: str | None, limit_items: int, limit_bytes: int, now_ms: int
    ) -> RecordPage:
        self._check_open()
        pager = RecordPager(limit_items, limit_bytes)
        cursor = b"-" if after is None else b"(" + after.encode()
        while True:
            with ERRORS:
                ids = await self._pool.call("ZRANGEBYLEX", self._ids_key, cursor, "+", "LIMIT", 0, SCAN_CHUNK)
            if not ids:
                break
            calls = [self._read_call(i.decode(), MatchAll(), False, None, BIG, BIG, now_ms) for i in ids]
            replies = await self._eval_many(_READ, calls)
            for raw_id, reply in zip(ids, replies, strict=True):
                items = self._items(reply)
                if not items:
                    continue
                size = sum(len(it.key) + len(it.value) for it in items)
                page = pager.add_record(raw_id.decode(), items, size)
                if page is not None:
                    return page
            if len(ids) < SCAN_CHUNK:
                break
            cursor = b"(" + ids[-1]
        return pager.last_page()

    def _put_args(self, item: ItemWrite, stamp: Stamp) -> list[resp.Arg]:
        return [b"p", item.key, _pack(item, stamp), item.expires_at_ms]

    @staticmethod
    def _delete_args(predicate: Predicate) -> list[resp.Arg]:
        if isinstance(predicate, MatchAll):
            return [b"d", b"a"]
        if isinstance(predicate, MatchKeys):
            return [b"d", b"k", len(predicate.keys), *predicate.keys]
        lo, hi = _lex_range(predicate, False, None)
        return [b"d", b"r", lo, hi]

    async def _write(self, id: str, stamp: Stamp, now_ms: int, ops: list[resp.Arg]) -> None:
        self._check_open()
        args: list[resp.Arg] = [
            id,
            now_ms,
            stamp.generation_time_us,
            stamp.token,
            IDEMPOTENCY_WINDOW_MS,
            *ops,
        ]
        if self._writes is None:
            await self._eval_many(_WRITE, [(self._keys(id), args)])
            return
        with ERRORS:
            reply = await self._writes.get((self._keys(id), args))
            if isinstance(reply, resp.ReplyError):
                raise reply

    async def put_items(self, id: str, items: Sequence[ItemWrite], stamp: Stamp, now_ms: int) -> None:
        check_items(items)
        ops: list[resp.Arg] = []
        for item in items:
            ops.extend(self._put_args(item, stamp))
        await self._write(id, stamp, now_ms, ops)

    async def delete_items(self, id: str, predicate: Predicate, stamp: Stamp, now_ms: int) -> None:
        await self._write(id, stamp, now_ms, self._delete_args(predicate))

    async def mutate_items(self, id: str, mutations: Sequence[Mutation], stamp: Stamp, now_ms: int) -> None:
        check_mutations(mutations)
        ops: list[resp.Arg] = []
        for m in mutations:
            ops.extend(
                self._put_args(m.item, stamp) if isinstance(m, Put) else self._delete_args(m.predicate)
            )
        await self._write(id, stamp, now_ms, ops)
