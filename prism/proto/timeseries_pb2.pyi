from prism.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Event(_message.Message):
    __slots__ = ("series_id", "event_time_us", "event_id", "payload", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_US_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    series_id: str
    event_time_us: int
    event_id: str
    payload: bytes
    tags: _containers.ScalarMap[str, str]
    def __init__(self, series_id: _Optional[str] = ..., event_time_us: _Optional[int] = ..., event_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WriteEventsRequest(_message.Message):
    __slots__ = ("namespace", "events")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, namespace: _Optional[str] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class WriteEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadEventsRequest(_message.Message):
    __slots__ = ("namespace", "series_id", "start_time_us", "end_time_us", "selection", "page_token")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    SERIES_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_US_FIELD_NUMBER: _ClassVar[int]
    END_TIME_US_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    series_id: str
    start_time_us: int
    end_time_us: int
    selection: _common_pb2.Selection
    page_token: str
    def __init__(self, namespace: _Optional[str] = ..., series_id: _Optional[str] = ..., start_time_us: _Optional[int] = ..., end_time_us: _Optional[int] = ..., selection: _Optional[_Union[_common_pb2.Selection, _Mapping]] = ..., page_token: _Optional[str] = ...) -> None: ...

class ReadEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
