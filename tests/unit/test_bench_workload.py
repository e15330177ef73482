"""The workload's calls: the mix and key distribution drawn as the scenario says, requests
that decode as the API's messages, and answer checks that tell right from wrong."""

from __future__ import annotations

from collections import Counter

import pytest

from prism.benchmark.workload import EMPTY_ANSWER, Calls, Spec, grpc_frame, picks, value_of
from prism.proto import common_pb2, kv_pb2, pubsub_pb2, timeseries_pb2


def spec(distribution: str = "uniform", records: int = 1000, **weights: float) -> Spec:
    return Spec("ns", weights or {"get": 1}, records, 100, distribution, 1.1, 3, 5)


def test_the_mix_is_drawn_by_its_weights() -> None:
    ops = Counter(op for op, _ in picks(spec(get=80, put=15, scan=5), seed=1))
    total = sum(ops.values())
    assert abs(ops["get"] / total - 0.80) < 0.01
    assert abs(ops["put"] / total - 0.15) < 0.01
    assert abs(ops["scan"] / total - 0.05) < 0.01


def test_zipf_keys_favour_the_first_records_and_uniform_keys_do_not() -> None:
    zipf = Counter(key for _, key in picks(spec("zipf"), seed=2))
    uniform = Counter(key for _, key in picks(spec("uniform"), seed=2))
    total = sum(zipf.values())
    # P(record 0) = 1 / H(1000, 1.1) ~ 0.18 for skew 1.1; uniform: 0.001.
    assert 0.15 < zipf[0] / total < 0.22
    assert zipf[0] > zipf[1] > zipf[10] > zipf.get(500, 0)
    assert uniform[0] / total < 0.003 and max(uniform.values()) / total < 0.003
    assert set(zipf) | set(uniform) <= set(range(1000))


def test_the_same_seed_draws_the_same_sequence_and_another_does_not() -> None:
    assert picks(spec("zipf"), seed=3) == picks(spec("zipf"), seed=3)
    assert picks(spec("zipf"), seed=3) != picks(spec("zipf"), seed=4)


@pytest.mark.parametrize("size", [1, 3, 4, 5, 100, 4096, 5000, 60000])
def test_values_have_their_size_and_differ_between_records(size: int) -> None:
    values = [value_of(i, size) for i in range(300)]
    assert all(len(v) == size for v in values)
    if size >= 2:
        assert len(set(values)) == min(300, 256 ** min(size, 4))


def _message(frame: bytes) -> bytes:
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    return frame[5:]


def test_requests_decode_as_the_apis_messages() -> None:
    calls = Calls(spec(get=1))
    get = kv_pb2.GetItemsRequest.FromString(_message(calls.build["get"](7)))
    assert (get.namespace, get.id) == ("ns", "r7")
    put = kv_pb2.PutItemsRequest.FromString(_message(calls.build["put"](7)))
    assert (put.namespace, put.id, [(i.key, i.value) for i in put.items]) == (
        "ns",
        "r7",
        [(b"k", value_of(7, 100))],
    )
    scan = kv_pb2.ScanItemsRequest.FromString(_message(calls.build["scan"](0)))
    assert scan.selection == common_pb2.Selection(limit_items=5)
    write = timeseries_pb2.WriteEventsRequest.FromString(_message(calls.build["write_events"](2)))
    again = timeseries_pb2.WriteEventsRequest.FromString(_message(calls.build["write_events"](2)))
    assert write.events[0].series_id == "w2" and write.events[0].event_id != again.events[0].event_id
    read = timeseries_pb2.ReadEventsRequest.FromString(_message(calls.build["read_events"](4)))
    assert (read.series_id, read.selection.limit_items) == ("s4", 3)
    publish = pubsub_pb2.PublishRequest.FromString(_message(calls.build["publish"](9)))
    assert (publish.topic, publish.payload) == ("t9", value_of(9, 100))


def test_answer_checks_accept_the_right_answer_only() -> None:
    calls = Calls(spec(get=1))
    right = calls.expected_get(3)
    assert calls.check["get"](3, right)
    assert not calls.check["get"](4, right)
    assert not calls.check["get"](3, right[:-1])
    assert calls.check["put"](0, EMPTY_ANSWER) and not calls.check["put"](0, grpc_frame(b"\x08\x01"))
    assert calls.check["publish"](0, grpc_frame(pubsub_pb2.PublishResponse(sequence=5).SerializeToString()))
    assert not calls.check["publish"](0, EMPTY_ANSWER)  # sequence 0
    page = kv_pb2.ScanItemsResponse(
        records=[
            kv_pb2.Record(id=f"r{i}", items=[kv_pb2.Item(key=b"k", value=value_of(i, 100))]) for i in (0, 1)
        ]
    )
    assert calls.check["scan"](0, grpc_frame(page.SerializeToString()))
    page.records[1].items[0].value = b"nope"
    assert not calls.check["scan"](0, grpc_frame(page.SerializeToString()))
    events = timeseries_pb2.ReadEventsResponse(events=[])
    assert not calls.check["read_events"](0, grpc_frame(events.SerializeToString()))


def test_read_events_check_wants_exactly_the_seeded_events() -> None:
    from prism.benchmark.workload import seeded_event

    calls = Calls(spec(read_events=1))
    seeded = [seeded_event(2, n, 100) for n in range(3)]
    answer = timeseries_pb2.ReadEventsResponse(events=list(reversed(seeded)))  # any order
    assert calls.check["read_events"](2, grpc_frame(answer.SerializeToString()))
    assert not calls.check["read_events"](1, grpc_frame(answer.SerializeToString()))  # another series'
    answer.events.pop()
    assert not calls.check["read_events"](2, grpc_frame(answer.SerializeToString()))
