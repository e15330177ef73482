"""``prism.kv.v1.KeyValue``: request checks and conversion, nothing stored here.

Each RPC validates its request (namespace known, id non-empty, predicate and
page token sound), turns protobuf into the backend's plain structs, and the
backend's answer back into protobuf. Semantics live in the backends (see
``prism/backends/keyvalue.py``), so every backend behaves the same.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Final, cast

from prism import metrics
from prism.backends import keyvalue as base
from prism.cache.redis import RedisTier
from prism.cache.shared import SharedCache
from prism.errors import InvalidArgument
from prism.proto import common_pb2, kv_pb2
from prism.rpc.call import CallContext
from prism.rpc.methods import READ, WRITE

from .kvwire import ItemIn, PutItemsIn, TokenIn, decode_put_items
from .namespaces import Held, Remote, elsewhere
from .pagetoken import PageTokens

SERVICE = kv_pb2.DESCRIPTOR.services_by_name["KeyValue"]

DEFAULT_LIMIT_ITEMS = 1000
MAX_LIMIT_ITEMS = 10000
DEFAULT_LIMIT_BYTES = 1024 * 1024

_Item = kv_pb2.Item
_MATCH_ALL = base.MatchAll()
_PUT_OK = kv_pb2.PutItemsResponse().SerializeToString()
_SMALL_VARINTS: Final = [bytes((n,)) for n in range(0x80)]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _stamp(token: common_pb2.IdempotencyToken | TokenIn) -> base.Stamp:
    if token.generation_time_us < 0:
        raise InvalidArgument("idempotency_token.generation_time_us must not be negative")
    t = token.generation_time_us or time.time_ns() // 1000
    return base.Stamp(t, token.token)


def _predicate(p: kv_pb2.Predicate) -> base.Predicate:
    which = p.WhichOneof("match")
    if which is None or which == "match_all":
        return _MATCH_ALL
    if which == "match_keys":
        if not p.match_keys.keys:
            raise InvalidArgument("predicate.match_keys.keys must not be empty")
        return base.MatchKeys(tuple(sorted(set(p.match_keys.keys))))
    r = p.match_range
    if r.end and r.start >= r.end:
        raise InvalidArgument("predicate.match_range: start must be before end")
    return base.MatchRange(r.start, r.end)


def _item_write(item: kv_pb2.Item | ItemIn, now_ms: int) -> base.ItemWrite:
    if not item.key:
        raise InvalidArgument("item key must not be empty")
    if item.ttl_ms < 0:
        raise InvalidArgument("item ttl_ms must not be negative")
    expires = now_ms + item.ttl_ms if item.ttl_ms else 0
    return base.ItemWrite(item.key, item.value, expires)


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL_VARINTS[n]
    if n < 0:
        n += 1 << 64  # int64 as protobuf writes it: ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode_get_items(items: Sequence[base.StoredItem], next_page_token: str) -> bytes:
    """``GetItemsResponse(items=..., next_page_token=...).SerializeToString()``,
    with each value copied once, into the answer itself.

    Building the message copies every value into protobuf's arena and
    serializing copies it again: two copies of a 1 MiB value, each in fresh
    memory, were a fifth of a 1 MiB GetItems' CPU. The fields are written as
    protobuf writes them: in field-number order, defaults (empty, 0) left out
    (``tests/unit/test_kv_wire.py`` holds this to protobuf's own output).
    """
    parts: list[bytes] = []
    add = parts.append
    for item in items:
        key, value, expires = item.key, item.value, item.expires_at_ms
        size = 0
        if key:
            size += 1 + len(_varint(len(key))) + len(key)
        if value:
            size += 1 + len(_varint(len(value))) + len(value)
        if expires:
            size += 1 + len(_varint(expires))
        add(b"\x0a")  # items = 1, length-delimited
        add(_varint(size))
        if key:
            add(b"\x0a")  # key = 1
            add(_varint(len(key)))
            add(key)
        if value:
            add(b"\x12")  # value = 2
            add(_varint(len(value)))
            add(value)
        if expires:
            add(b"\x20")  # expires_at_ms = 4, varint
            add(_varint(expires))
    if next_page_token:
        token = next_page_token.encode()
        add(b"\x12")  # next_page_token = 2
        add(_varint(len(token)))
        add(token)
    return b"".join(parts)


def _fingerprint(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"\x00".join(parts), digest_size=16).digest()


def _check_id(id: str) -> None:
    if not id:
        raise InvalidArgument("id must not be empty")


class KeyValue:
    """The KeyValue service over this process's KeyValue namespaces.

    ``namespaces`` is the table's KeyValue view; calls for any other
    namespace go to ``remote`` (raw request bytes in, raw answer bytes out).
    A namespace's GetItems answers are kept in its cache tier, if it has one
    (the shared table or Redis), and ``shared_cache`` (if any) is
    invalidated by every write, cached or not, so that turning a
    namespace's cache on never serves an answer older than a write made
    while it was off. A namespace's Redis tier is invalidated by the writes
    to it while it is configured.
    """

    # What the access rules must allow, per RPC (prism.rpc.methods).
    actions: Final = {
        "GetItems": READ,
        "ScanItems": READ,
        "PutItems": WRITE,
        "DeleteItems": WRITE,
        "MutateItems": WRITE,
    }
    # A large PutItems is read without protobuf copying its values (prism.api.kvwire).
    decoders: Final = {"PutItems": decode_put_items}

    def __init__(
        self,
        namespaces: Mapping[str, Held[base.KeyValueBackend]],
        tokens: PageTokens,
        *,
        max_limit_bytes: int,
        remote: Remote | None = None,
        shared_cache: SharedCache | None = None,
    ) -> None:
        self.namespaces = namespaces
        self._tokens = tokens
        self._max_limit_bytes = max_limit_bytes
        self._remote = remote
        self._shared_cache = shared_cache

    async def _elsewhere(self, namespace: str, call: CallContext) -> bytes:
        return await elsewhere(self._remote, namespace, call)

    async def _invalidate(self, held: Held[base.KeyValueBackend], id: str) -> None:
        # After the backend committed, before the client hears OK.
        if self._shared_cache is not None:
            self._shared_cache.invalidate(held.config.name, id)
        tier = held.cache
        if isinstance(tier, RedisTier):
            await tier.invalidate(id)

    def _limits(self, s: common_pb2.Selection) -> tuple[int, int]:
        items = min(s.limit_items or DEFAULT_LIMIT_ITEMS, MAX_LIMIT_ITEMS)
        nbytes = min(s.limit_bytes or DEFAULT_LIMIT_BYTES, self._max_limit_bytes)
        return items, nbytes

    async def PutItems(
        self, request: kv_pb2.PutItemsRequest | PutItemsIn, call: CallContext
    ) -> kv_pb2.PutItemsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        _check_id(request.id)
        now = _now_ms()
        items = [_item_write(i, now) for i in request.items]
        await held.backend.put_items(request.id, items, _stamp(request.idempotency_token), now)
        await self._invalidate(held, request.id)
        return _PUT_OK

    def GetItemsNow(self, request: kv_pb2.GetItemsRequest, call: CallContext) -> bytes | None:
        """A shared-cache hit, or a read of a backend with nothing to wait for
        (memory's), answered without a task (``Method.now``); None otherwise."""
        ns = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return None
        cached = held.cache
        if cached is None:
            if not hasattr(held.backend, "get_items_now"):  # (an isinstance of a Protocol is ~30x slower)
                return None
            try:
                answer = encode_get_items(*self._read_items_now(cast(base.ReadsNow, held.backend), request))
            except Exception:
                return None  # GetItems answers it: its error, or INTERNAL (logged) for a bug
            call.namespace = ns
            return answer
        if isinstance(cached, RedisTier):
            return None
        key = bytes(call.messages[0])
        hit = cached.cache.get(key, cached.cache.record_version(ns, request.id), _now_ms())
        if hit is None:
            return None  # GetItems counts the miss
        call.namespace = ns
        metrics.cache_hit(ns)
        return hit

    async def GetItems(
        self, request: kv_pb2.GetItemsRequest, call: CallContext
    ) -> kv_pb2.GetItemsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        backend = held.backend
        cached = held.cache
        if cached is None:
            return encode_get_items(*await self._read_items(backend, request))
        if isinstance(cached, RedisTier):
            _check_id(request.id)  # a bad request costs no round trip
            return await cached.get_items(
                request.id, bytes(call.messages[0]), lambda: self._get_items(backend, request)
            )
        # A miss: hits were answered by GetItemsNow, which the server tries
        # first (Method.now). The request bytes are the cache key: the same
        # bytes ask the same question. The record's version is read before
        # the backend is.
        key = bytes(call.messages[0])  # (a large request's is a bytearray: prism.rpc.inbound)
        version = cached.cache.record_version(ns, request.id)
        now = _now_ms()
        metrics.cache_miss(ns)
        response = await self._get_items(backend, request)
        payload: bytes = response.SerializeToString()
        if len(payload) <= cached.max_value_bytes:
            expires = now + cached.ttl_ms
            for item in response.items:
                if item.expires_at_ms:
                    expires = min(expires, item.expires_at_ms)
            cached.cache.put(key, version, payload, expires)
        return payload

    async def _get_items(
        self, backend: base.KeyValueBackend, request: kv_pb2.GetItemsRequest
    ) -> kv_pb2.GetItemsResponse:
        """The answer as a message, for the cache tiers (which read its items' expiry)."""
        items, token = await self._read_items(backend, request)
        return kv_pb2.GetItemsResponse(
            items=[_Item(key=i.key, value=i.value, expires_at_ms=i.expires_at_ms) for i in items],
            next_page_token=token,
        )

    async def _read_items(
        self, backend: base.KeyValueBackend, request: kv_pb2.GetItemsRequest
    ) -> tuple[list[base.StoredItem], str]:
        """The page of items the request asks for, and the token of the next page ("" if none)."""
        predicate, limit_items, limit_bytes, after, fingerprint = self._page_asked(request)
        page = await backend.get_items(
            request.id,
            predicate,
            reverse=request.selection.reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=_now_ms(),
        )
        return page.items, self._next_token(request, page, fingerprint)

    def _read_items_now(
        self, backend: base.ReadsNow, request: kv_pb2.GetItemsRequest
    ) -> tuple[list[base.StoredItem], str]:
        """``_read_items`` from a backend that has nothing to wait for."""
        predicate, limit_items, limit_bytes, after, fingerprint = self._page_asked(request)
        page = backend.get_items_now(
            request.id,
            predicate,
            reverse=request.selection.reverse,
            after=after,
            limit_items=limit_items,
            limit_bytes=limit_bytes,
            now_ms=_now_ms(),
        )
        return page.items, self._next_token(request, page, fingerprint)

    def _page_asked(
        self, request: kv_pb2.GetItemsRequest
    ) -> tuple[base.Predicate, int, int, bytes | None, bytes]:
        """What a GetItems asks a backend: predicate, limits, the key to start
        after (from its page token), and the request's fingerprint if it had to
        be computed (b"" if not)."""
        _check_id(request.id)
        predicate = _predicate(request.predicate) if request.HasField("predicate") else _MATCH_ALL
        limit_items, limit_bytes = self._limits(request.selection)
        after: bytes | None = None
        fingerprint = b""
        if request.page_token:
            fingerprint = self._get_fingerprint(request)
            cursor = self._tokens.open(request.page_token, fingerprint)
            if not isinstance(cursor, bytes):
                raise InvalidArgument("page_token was issued for another request")
            after = cursor
        return predicate, limit_items, limit_bytes, after, fingerprint

    def _next_token(self, request: kv_pb2.GetItemsRequest, page: base.ItemPage, fingerprint: bytes) -> str:
        if page.last_key is None:
            return ""
        return self._tokens.seal(fingerprint or self._get_fingerprint(request), page.last_key)

    @staticmethod
    def _get_fingerprint(request: kv_pb2.GetItemsRequest) -> bytes:
        return _fingerprint(
            b"get",
            request.namespace.encode(),
            request.id.encode(),
            request.predicate.SerializeToString(deterministic=True),
            b"r" if request.selection.reverse else b"f",
        )

    async def DeleteItems(
        self, request: kv_pb2.DeleteItemsRequest, call: CallContext
    ) -> kv_pb2.DeleteItemsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        _check_id(request.id)
        predicate = _predicate(request.predicate) if request.HasField("predicate") else _MATCH_ALL
        await held.backend.delete_items(request.id, predicate, _stamp(request.idempotency_token), _now_ms())
        await self._invalidate(held, request.id)
        return kv_pb2.DeleteItemsResponse()

    async def MutateItems(
        self, request: kv_pb2.MutateItemsRequest, call: CallContext
    ) -> kv_pb2.MutateItemsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        _check_id(request.id)
        now = _now_ms()
        mutations: list[base.Mutation] = []
        for n, m in enumerate(request.mutations):
            which = m.WhichOneof("op")
            if which == "put":
                mutations.append(base.Put(_item_write(m.put, now)))
            elif which == "delete":
                mutations.append(base.Delete(_predicate(m.delete)))
            else:
                raise InvalidArgument(f"mutations[{n}]: neither put nor delete is set")
        await held.backend.mutate_items(request.id, mutations, _stamp(request.idempotency_token), now)
        await self._invalidate(held, request.id)
        return kv_pb2.MutateItemsResponse()

    async def ScanItems(
        self, request: kv_pb2.ScanItemsRequest, call: CallContext
    ) -> kv_pb2.ScanItemsResponse | bytes:
        ns = call.namespace = request.namespace
        held = self.namespaces.get(ns)
        if held is None:
            return await self._elsewhere(ns, call)
        limit_items, limit_bytes = self._limits(request.selection)
        fingerprint = _fingerprint(b"scan", request.namespace.encode())
        after: str | None = None
        if request.page_token:
            cursor = self._tokens.open(request.page_token, fingerprint)
            if not isinstance(cursor, str):
                raise InvalidArgument("page_token was issued for another request")
            after = cursor
        page = await held.backend.scan_items(
            after=after, limit_items=limit_items, limit_bytes=limit_bytes, now_ms=_now_ms()
        )
        response = kv_pb2.ScanItemsResponse(
            records=[
                kv_pb2.Record(
                    id=rid,
                    items=[_Item(key=i.key, value=i.value, expires_at_ms=i.expires_at_ms) for i in items],
                )
                for rid, items in page.records
            ]
        )
        if page.last_id is not None:
            response.next_page_token = self._tokens.seal(fingerprint, page.last_id)
        return response
