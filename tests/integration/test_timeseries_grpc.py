"""TimeSeries through grpcio stubs against a real ``prism serve``."""

from __future__ import annotations

import grpc
import pytest

from prism.proto import common_pb2, kv_pb2, kv_pb2_grpc, timeseries_pb2, timeseries_pb2_grpc


def event(series: str, t: int, eid: str, payload: bytes) -> timeseries_pb2.Event:
    return timeseries_pb2.Event(
        series_id=series, event_time_us=t, event_id=eid, payload=payload, tags={"k": "v"}
    )


def test_write_read_page_and_immutability(channel: grpc.Channel) -> None:
    ts = timeseries_pb2_grpc.TimeSeriesStub(channel)
    ts.WriteEvents(
        timeseries_pb2.WriteEventsRequest(
            namespace="events",
            events=[event("s", 30, "a", b"3"), event("s", 10, "b", b"1"), event("s", 10, "a", b"0")],
        ),
        timeout=5,
    )
    # Writing an identity again changes nothing: the first write stays.
    ts.WriteEvents(timeseries_pb2.WriteEventsRequest(namespace="events", events=[event("s", 30, "a", b"X")]))
    seen, token = [], ""
    while True:
        r = ts.ReadEvents(
            timeseries_pb2.ReadEventsRequest(
                namespace="events",
                series_id="s",
                selection=common_pb2.Selection(limit_items=2),
                page_token=token,
            ),
            timeout=5,
        )
        seen += [(e.event_time_us, e.event_id, e.payload, dict(e.tags)) for e in r.events]
        token = r.next_page_token
        if not token:
            break
    assert seen == [(10, "a", b"0", {"k": "v"}), (10, "b", b"1", {"k": "v"}), (30, "a", b"3", {"k": "v"})]
    rev = ts.ReadEvents(
        timeseries_pb2.ReadEventsRequest(
            namespace="events",
            series_id="s",
            start_time_us=10,
            end_time_us=30,
            selection=common_pb2.Selection(reverse=True),
        )
    )
    assert [(e.event_time_us, e.event_id) for e in rev.events] == [(10, "b"), (10, "a")]


def test_timeseries_errors(channel: grpc.Channel) -> None:
    ts = timeseries_pb2_grpc.TimeSeriesStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        ts.WriteEvents(timeseries_pb2.WriteEventsRequest(namespace="events", events=[event("", 1, "a", b"")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        ts.ReadEvents(
            timeseries_pb2.ReadEventsRequest(
                namespace="events", series_id="s", start_time_us=5, end_time_us=2
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        ts.ReadEvents(timeseries_pb2.ReadEventsRequest(namespace="default", series_id="s"))
    # "default" is a KeyValue namespace: the wrong abstraction, said clearly.
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "keyvalue" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        kv_pb2_grpc.KeyValueStub(channel).GetItems(kv_pb2.GetItemsRequest(namespace="events", id="x"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "timeseries" in info.value.details()
