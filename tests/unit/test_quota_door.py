"""A call over its quota refused as its frames are read, without a Call
(``Calls._limit_new``, ``prism.rpc.peek``), as a client sees it: the same
status, message and pushback as through a Call, counted in ``/metrics`` by
namespace and reason, the calls within the quota of the same read served,
nothing the refused ones sent stored. And the namespace peek's own rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import REGISTRY

from prism.errors import StatusCode
from prism.proto import kv_pb2
from prism.rpc import peek
from prism.rpc.calls import Calls
from prism.rpc.h2read import DATA_READ, HEADERS_READ, WINDOW_READ

from .h2client import frame
from .test_quotas import GET, PUT, limited, put, refusal, served, table


def answered(status: str) -> float:
    value = REGISTRY.get_sample_value(
        "prism_requests_total", {"namespace": "profiles", "operation": "PutItems", "status": status}
    )
    return value or 0.0


async def test_a_read_s_calls_over_the_quota_are_refused_as_read_and_those_within_served(
    mock_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    through_a_call: list[int] = []
    answer_failure = Calls._answer_failure

    def spy(self: Calls, call: object, method: object, exc: Exception) -> None:
        through_a_call.append(1)
        answer_failure(self, call, method, exc)  # type: ignore[arg-type]

    monkeypatch.setattr(Calls, "_answer_failure", spy)
    async with served(tmp_path, table({"profiles": {"rps": 1, "burst": 3}})) as (_, client):
        for _ in range(3):  # (and the connection's HPACK cache warm: the next puts read plainly)
            assert (await put(client, "profiles")).status == StatusCode.OK
        # The connection's first refusal is made through its Call; the next ones as read.
        assert (await put(client, "profiles")).status == StatusCode.RESOURCE_EXHAUSTED
        assert through_a_call == [1]
        mock_clock.jump(2.0)  # two tokens (and the connection's rest over)
        before, before_answered = limited("profiles", "rps"), answered("RESOURCE_EXHAUSTED")
        sids = []
        for n in range(5):  # one write, one read
            request = kv_pb2.PutItemsRequest(
                namespace="profiles", id=f"r{n}", items=[kv_pb2.Item(key=b"k", value=b"v")]
            )
            sid = client.queue_call(PUT, frame(request.SerializeToString()))
            sids.append(sid)
        await client.flush()
        got = [await client.wait(sid) for sid in sids]
        assert [r.status for r in got] == [StatusCode.OK] * 2 + [StatusCode.RESOURCE_EXHAUSTED] * 3
        assert {refusal(r) for r in got[2:]} == {
            (StatusCode.RESOURCE_EXHAUSTED, 'namespace "profiles": rps limit 1 exceeded', "1000")
        }
        assert through_a_call == [1]
        assert limited("profiles", "rps") == before + 3
        assert answered("RESOURCE_EXHAUSTED") == before_answered + 3
        mock_clock.jump(10)  # the bucket full again: 3 tokens
        for n, stored in enumerate([1, 1, 0]):  # the refused sent nothing stored
            request = kv_pb2.GetItemsRequest(namespace="profiles", id=f"r{n}")
            r = await client.call(GET, frame(request.SerializeToString()))
            assert r.status == StatusCode.OK
            assert len(kv_pb2.GetItemsResponse.FromString(r.messages()[0]).items) == stored


def message(request: bytes, compressed: int = 0, length: int | None = None) -> bytes:
    size = len(request) if length is None else length
    return bytes([compressed]) + size.to_bytes(4, "big") + request


def test_the_namespace_is_read_from_a_whole_uncompressed_request_only() -> None:
    body = kv_pb2.GetItemsRequest(namespace="profiles", id="r").SerializeToString()
    plain = [
        [HEADERS_READ, 1, [], 0, False],
        [HEADERS_READ, 3, [], 0, False],
        [WINDOW_READ, 0, None, 0, False],
        [DATA_READ, 3, memoryview(message(body)), 1, True],
        [DATA_READ, 1, memoryview(message(body)), 1, False],
        [DATA_READ, 1, memoryview(message(body)), 1, True],  # (after a WINDOW_UPDATE: another entry)
    ]
    first = peek.first_data(plain)
    assert first == {3: plain[3], 1: plain[4]}
    assert peek.namespace(first[3]) == "profiles"
    assert peek.namespace(first[1]) is None  # its request goes on past its first DATA entry
    assert peek.namespace([DATA_READ, 5, [message(body)], 1, True]) is None  # several frames
    assert peek.namespace([DATA_READ, 5, message(body, compressed=1), 1, True]) is None
    assert peek.namespace([DATA_READ, 5, message(body, length=len(body) + 1), 1, True]) is None
    assert peek.namespace([DATA_READ, 5, message(body)[:4], 1, True]) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (kv_pb2.GetItemsRequest(namespace="a", id="r").SerializeToString(), "a"),
        # protobuf's "last one wins", as a full decode reads it:
        (b"\x0a\x01a\x12\x01r\x0a\x02bb", "bb"),
        (b"\x12\x01r", None),  # no namespace
        (b"\x08\x01", None),  # field 1 as a varint
        (b"\x0a\x05ab", None),  # longer than the message
        (b"\x0a\x02\xff\xfe", None),  # not UTF-8
        (b"\x0a\x01a\x10\xff", None),  # a varint cut short
        (b"\x0a\x01a\x1b\x1c", None),  # a group
        (b"\x0a\x01a\x19" + b"\x00" * 8 + b"\x25" + b"\x00" * 4, "a"),  # 64- and 32-bit fields skipped
        (b"\x0a\x01a\x19\x00", None),  # a 64-bit field cut short
    ],
)
def test_field_1_is_read_as_protobuf_reads_it_or_not_at_all(raw: bytes, expected: str | None) -> None:
    assert peek.field_1(raw, 0, len(raw)) == expected
