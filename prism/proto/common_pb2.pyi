from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class IdempotencyToken(_message.Message):
    __slots__ = ("generation_time_us", "token")
    GENERATION_TIME_US_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    generation_time_us: int
    token: str
    def __init__(self, generation_time_us: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("limit_items", "limit_bytes", "reverse")
    LIMIT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVERSE_FIELD_NUMBER: _ClassVar[int]
    limit_items: int
    limit_bytes: int
    reverse: bool
    def __init__(self, limit_items: _Optional[int] = ..., limit_bytes: _Optional[int] = ..., reverse: _Optional[bool] = ...) -> None: ...
