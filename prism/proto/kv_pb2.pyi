from prism.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Item(_message.Message):
    __slots__ = ("key", "value", "ttl_ms", "expires_at_ms")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    value: bytes
    ttl_ms: int
    expires_at_ms: int
    def __init__(self, key: _Optional[bytes] = ..., value: _Optional[bytes] = ..., ttl_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class MatchAll(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MatchKeys(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class MatchRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: bytes
    end: bytes
    def __init__(self, start: _Optional[bytes] = ..., end: _Optional[bytes] = ...) -> None: ...

class Predicate(_message.Message):
    __slots__ = ("match_all", "match_keys", "match_range")
    MATCH_ALL_FIELD_NUMBER: _ClassVar[int]
    MATCH_KEYS_FIELD_NUMBER: _ClassVar[int]
    MATCH_RANGE_FIELD_NUMBER: _ClassVar[int]
    match_all: MatchAll
    match_keys: MatchKeys
    match_range: MatchRange
    def __init__(self, match_all: _Optional[_Union[MatchAll, _Mapping]] = ..., match_keys: _Optional[_Union[MatchKeys, _Mapping]] = ..., match_range: _Optional[_Union[MatchRange, _Mapping]] = ...) -> None: ...

class Mutation(_message.Message):
    __slots__ = ("put", "delete")
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    put: Item
    delete: Predicate
    def __init__(self, put: _Optional[_Union[Item, _Mapping]] = ..., delete: _Optional[_Union[Predicate, _Mapping]] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("id", "items")
    ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

class PutItemsRequest(_message.Message):
    __slots__ = ("namespace", "id", "items", "idempotency_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    id: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    idempotency_token: _common_pb2.IdempotencyToken
    def __init__(self, namespace: _Optional[str] = ..., id: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., idempotency_token: _Optional[_Union[_common_pb2.IdempotencyToken, _Mapping]] = ...) -> None: ...

class PutItemsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetItemsRequest(_message.Message):
    __slots__ = ("namespace", "id", "predicate", "selection", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    id: str
    predicate: Predicate
    selection: _common_pb2.Selection
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., id: _Optional[str] = ..., predicate: _Optional[_Union[Predicate, _Mapping]] = ..., selection: _Optional[_Union[_common_pb2.Selection, _Mapping]] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetItemsResponse(_message.Message):
    __slots__ = ("items", "next_page_token")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    next_page_token: str
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteItemsRequest(_message.Message):
    __slots__ = ("namespace", "id", "predicate", "idempotency_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PREDICATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    id: str
    predicate: Predicate
    idempotency_token: _common_pb2.IdempotencyToken
    def __init__(self, namespace: _Optional[str] = ..., id: _Optional[str] = ..., predicate: _Optional[_Union[Predicate, _Mapping]] = ..., idempotency_token: _Optional[_Union[_common_pb2.IdempotencyToken, _Mapping]] = ...) -> None: ...

class DeleteItemsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MutateItemsRequest(_message.Message):
    __slots__ = ("namespace", "id", "mutations", "idempotency_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    id: str
    mutations: _containers.RepeatedCompositeFieldContainer[Mutation]
    idempotency_token: _common_pb2.IdempotencyToken
    def __init__(self, namespace: _Optional[str] = ..., id: _Optional[str] = ..., mutations: _Optional[_Iterable[_Union[Mutation, _Mapping]]] = ..., idempotency_token: _Optional[_Union[_common_pb2.IdempotencyToken, _Mapping]] = ...) -> None: ...

class MutateItemsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScanItemsRequest(_message.Message):
    __slots__ = ("namespace", "selection", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    selection: _common_pb2.Selection
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., selection: _Optional[_Union[_common_pb2.Selection, _Mapping]] = ..., page_token: _Optional[str] = ...) -> None: ...

class ScanItemsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[Record]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
