"""The Redis KeyValue data model and the Lua scripts that keep it.

No I/O here: ``keyvalue.RedisBackend`` runs these scripts (pipelined, with
EVALSHA) and pages their answers.

Data model, under ``<key_prefix><namespace>:``:

- ``z:<id>``: sorted set of the record's item keys, all with score 0, so that
  ZRANGEBYLEX walks them in unsigned bytewise order;
- ``h:<id>``: hash item key -> ``b"<expires_at_ms> <stamp_us> <len(token)> "
  + token + value`` (a text header the Lua scripts can read: Redis's
  ``cmsgpack`` cannot decode msgpack's bin type, so msgpack would not do);
- ``m:<id>``: hash of bookkeeping: ``exp`` (a lower bound of the expiry
  times held; the first write at or after it purges expired items), ``tp``
  (when old tokens are next purged) and ``tx`` (until when the record may
  hold tombstones: a put looks at ``x:`` and ``r:`` only before then);
- ``t:<id>``: hash token -> applied_at_ms (idempotency);
- ``x:<id>``: hash item key -> the key's tombstone, packed as an item with
  no value whose expiry is when it is forgotten (a key has an item in
  ``h:<id>`` or a tombstone here, never both), and field ``""`` (no item
  key is empty): when gone tombstones are next pruned;
- ``r:<id>``: hash ``b"<len(start)> " + start + end`` -> the range's
  tombstone, packed the same way (``MatchAll`` is the range "", "");
- ``ids``: sorted set of the ids of non-empty records, for ScanItems.

``x:`` and ``r:`` are what deletes leave (``prism.backends.keyvalue``):
reads never look at them, and a put looks its key up in ``x:`` and reads
``r:`` only while ``tx`` says there may be tombstones (it reads ``tx`` with
``exp``, in the one call every write made before: a record that saw no
delete costs its puts nothing more). Each expires as a whole
``tombstone_ttl_s`` (and a minute, for clocks apart) after its last
tombstone was written, and so does ``m:`` while the record is empty, so a
deleted record leaves nothing behind for good (but ``t:``, its tokens).

Every write (put, delete, mutate) is ONE run of ``WRITE``, hence atomic: the
token check, the stamp rule and every change happen together or not at all
(input is validated before Redis is called, so a script never fails
half-way). Reads run ``READ`` once per record: it filters expired items and
stops one item past the page. Timestamps are Lua numbers (doubles): exact to
2^53.
"""

from __future__ import annotations

from prism.backends.keyvalue import ItemWrite, MatchRange, Predicate, Stamp, StampedItem, StoredItem
from prism.drivers import resp

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

# KEYS: z, h, m, t, ids, x, r. ARGV: id, now, us, token, window (0: the token
# is neither checked nor recorded: a migration's copy), tombstone
# ttl, "1" if the ops delete (else "0"), then ops:
#   "p", key, packed, expires_at_ms
#   "d", "a" | "k" <n> keys... | "r" <min> <max> <start> <end>   (lex bounds, then raw)
WRITE = resp.Script(
    _LUA_COMMON
    + r"""
local z, h, m, t, ids, x, r = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local id, now, us, tok, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local wrote_x, wrote_r = false, false
if tok ~= '' and window > 0 then  -- window 0: a copy (import), no token to check or record
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
local mv = redis.call('HMGET', m, 'exp', 'tx')
local bound = tonumber(mv[1] or '-1')
local tx = tonumber(mv[2] or '0')  -- 0: no tombstone since m was made
local tombs = tx > now  -- the record may hold tombstones
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
-- What tombstones take, defined only for a write that deletes or a record
-- that may hold tombstones: closures cost a put that needs none (about 2 us
-- of Redis's time for these, more than the rest of the tombstone work).
local holds, in_range, covered, del, tpack, tomb, tomb_range
local ranges  -- r's fields and values, read once (by the first put that needs them)
if tombs or ARGV[7] == '1' then
  -- Whether a tombstone (packed) holds back a write of this stamp.
  holds = function(packed)
    if not packed then return false end
    local gone, us2, tok2 = meta(packed)
    return gone > now and stamp_gt(us2, tok2, us, tok)
  end
  in_range = function(key, lo, hi)
    return not bytes_lt(key, lo) and (hi == '' or bytes_lt(key, hi))
  end
  covered = function(key)
    if not ranges then ranges = redis.call('HGETALL', r) end
    for j = 1, #ranges, 2 do
      local f = ranges[j]
      local cnt, p = string.match(f, '^(%d+) ()')
      cnt = tonumber(cnt)
      if holds(ranges[j + 1]) and in_range(key, string.sub(f, p, p + cnt - 1), string.sub(f, p + cnt)) then
        return true
      end
    end
    return false
  end
  del = function(key)
    local old = redis.call('HGET', h, key)
    if old then
      local _, us2, tok2 = meta(old)
      if not stamp_gt(us2, tok2, us, tok) then
        redis.call('HDEL', h, key); redis.call('ZREM', z, key)
      end
    end
  end
  -- A tombstone of this write, packed as an item with no value.
  tpack = function()
    tombs = true
    return string.format('%.0f %.0f %d ', now + ttl, us, #tok) .. tok
  end
  -- A delete by key: the key's tombstone takes the place of what it holds,
  -- unless that (item or tombstone) is newer and current.
  tomb = function(key)
    local old = redis.call('HGET', h, key)
    if old then
      local exp2, us2, tok2 = meta(old)
      if stamp_gt(us2, tok2, us, tok) and not (exp2 ~= 0 and exp2 <= now) then return end
      redis.call('HDEL', h, key); redis.call('ZREM', z, key)
    elseif holds(redis.call('HGET', x, key)) then
      return
    end
    redis.call('HSET', x, key, tpack()); wrote_x = true
  end
  -- A delete by range (lo, hi: raw bounds): its tombstone replaces the
  -- range's older one, and the key tombstones in it that are not newer go.
  tomb_range = function(lo, hi)
    local all = redis.call('HGETALL', x)
    for j = 1, #all, 2 do
      local key = all[j]
      if key ~= '' and in_range(key, lo, hi) then
        local _, us2, tok2 = meta(all[j + 1])
        if not stamp_gt(us2, tok2, us, tok) then redis.call('HDEL', x, key) end
      end
    end
    local f = #lo .. ' ' .. lo .. hi
    if not holds(redis.call('HGET', r, f)) then
      redis.call('HSET', r, f, tpack()); wrote_r = true; ranges = nil
    end
  end
end
local i = 8
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
    elseif tombs and holds(redis.call('HGET', x, key)) then
      skip = true
    end
    if not skip and tombs and covered(key) then skip = true end
    if not skip then
      if tombs and not old then redis.call('HDEL', x, key) end  -- the put takes the tombstone's place
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
      tomb_range('', '')
    elseif kind == 'k' then
      local cnt = tonumber(ARGV[i + 2])
      for j = i + 3, i + 2 + cnt do tomb(ARGV[j]) end
      i = i + 3 + cnt
    else
      local lo, hi = ARGV[i + 2], ARGV[i + 3]
      for _, key in ipairs(redis.call('ZRANGEBYLEX', z, lo, hi)) do del(key) end
      tomb_range(ARGV[i + 4], ARGV[i + 5])
      i = i + 6
    end
  end
end
local keep
if wrote_x or wrote_r or tx > 0 then
  -- Tombstones: gone ones are pruned (in x at most once a minute), and each
  -- hash lives on for the ttl (and a minute) after its last write.
  local function prune(k)
    local all = redis.call('HGETALL', k)
    for j = 1, #all, 2 do
      if all[j] ~= '' and meta(all[j + 1]) <= now then redis.call('HDEL', k, all[j]) end
    end
  end
  keep = function(k)
    local left = redis.call('PTTL', k)
    if left == -1 or left < ttl + 60000 then redis.call('PEXPIRE', k, ttl + 60000) end
  end
  if wrote_x then
    if now >= tonumber(redis.call('HGET', x, '') or '0') then
      prune(x); redis.call('HSET', x, '', string.format('%.0f', now + 60000))
    end
    keep(x)
  end
  if wrote_r then prune(r); keep(r) end
  if wrote_x or wrote_r then
    if now + ttl > tx then tx = now + ttl; redis.call('HSET', m, 'tx', string.format('%.0f', tx)) end
  elseif tx > 0 and not tombs then  -- every tombstone is forgotten: m has a ttl only while it has tx
    redis.call('HDEL', m, 'tx'); redis.call('PERSIST', m); tx = 0
  end
end
if redis.call('ZCARD', z) == 0 then
  redis.call('DEL', z, h); redis.call('HDEL', m, 'exp'); redis.call('ZREM', ids, id)
  if tx > 0 then keep(m) end  -- nothing but tombstones: m goes with them
else
  redis.call('ZADD', ids, 0, id)
  if tx > 0 then redis.call('PERSIST', m) end  -- m keeps 'exp' for the items
end
return 1
"""
)

# KEYS: z, h. ARGV: kind ("l" lex range | "k" keys), rev, now, limit_items,
# limit_bytes, then min max (lex, in forward order) or keys (travel order).
# Returns key, packed, key, packed, ...: the live items of the page and one past it.
READ = resp.Script(
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


def pack(item: ItemWrite, stamp: Stamp) -> bytes:
    """An item as stored in ``h:<id>``: its expiry, stamp and token as text, then the value."""
    token = stamp.token.encode()
    head = b"%d %d %d " % (item.expires_at_ms, stamp.generation_time_us, len(token))
    return head + token + item.value


def unpack(key: bytes, packed: bytes) -> StoredItem:
    expires, _, token_len, rest = packed.split(b" ", 3)
    return StoredItem(key, rest[int(token_len) :], int(expires))


def unpack_stamped(key: bytes, packed: bytes) -> StampedItem:
    """``unpack`` with the stamp the item was written with (``Migratable``)."""
    expires, stamp_us, token_len, rest = packed.split(b" ", 3)
    n = int(token_len)
    return StampedItem(key, rest[n:], int(expires), int(stamp_us), rest[:n].decode())


def lex_range(predicate: Predicate, reverse: bool, after: bytes | None) -> tuple[bytes, bytes]:
    """ZRANGEBYLEX bounds (in forward order) for ``predicate``, past ``after``
    in the direction of travel."""
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
