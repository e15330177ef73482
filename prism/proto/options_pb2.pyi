from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor
NAMESPACE_FIELD_NUMBER: _ClassVar[int]
namespace: _descriptor.FieldDescriptor
NAMESPACES_FIELD_NUMBER: _ClassVar[int]
namespaces: _descriptor.FieldDescriptor

class NamespaceNeeds(_message.Message):
    __slots__ = ("name", "abstraction", "read_rps", "write_rps", "item_bytes", "records", "p99_ms", "durability", "tenant", "backend")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ABSTRACTION_FIELD_NUMBER: _ClassVar[int]
    READ_RPS_FIELD_NUMBER: _ClassVar[int]
    WRITE_RPS_FIELD_NUMBER: _ClassVar[int]
    ITEM_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    name: str
    abstraction: str
    read_rps: float
    write_rps: float
    item_bytes: int
    records: int
    p99_ms: float
    durability: str
    tenant: str
    backend: str
    def __init__(self, name: _Optional[str] = ..., abstraction: _Optional[str] = ..., read_rps: _Optional[float] = ..., write_rps: _Optional[float] = ..., item_bytes: _Optional[int] = ..., records: _Optional[int] = ..., p99_ms: _Optional[float] = ..., durability: _Optional[str] = ..., tenant: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...
