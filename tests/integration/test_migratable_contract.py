"""The ``Migratable`` contract (prism/backends/keyvalue.py): every KeyValue backend
exports its records with their stamps and imports them under the stamp rule."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from prism.backends import catalog
from prism.backends.keyvalue import (
    BatchWritable,
    Delete,
    ExportPage,
    MatchKeys,
    MatchRange,
    Migratable,
    Put,
    StampedItem,
)
from prism.backends.postgres.keyvalue import PostgresBackend
from prism.backends.redis.keyvalue import RedisBackend
from prism.errors import InvalidArgument
from tests.integration.test_backend_contract import BIG, NOW, Backend, open_backend, st, values, w
from tests.integration.test_backend_contract import kv as kv  # the fixture: every backend
from tests.pg import drop_tables
from tests.rd import delete_keys

pytestmark = pytest.mark.services("postgres", "redis")


async def export_all(kv: Backend, *, limit_items: int = BIG, now: int = NOW) -> list[ExportPage]:
    pages, after = [], None
    while True:
        page = await kv.export_records(after=after, limit_items=limit_items, limit_bytes=BIG, now_ms=now)
        pages.append(page)
        if page.last_id is None:
            return pages
        after = page.last_id


def flat(pages: list[ExportPage]) -> list[tuple[str, list[StampedItem]]]:
    return [record for page in pages for record in page.records]


async def test_every_keyvalue_backend_is_migratable(kv: Backend) -> None:
    assert isinstance(kv, Migratable)


async def test_export_pages_records_whole_in_id_order_with_their_stamps(kv: Backend) -> None:
    await kv.put_items("b", [w(b"k1", b"v1"), w(b"k2", b"v2", NOW + 60_000)], st(10, "t1"), NOW)
    await kv.put_items("a", [w(b"x", b"1")], st(20), NOW)
    await kv.put_items("b", [w(b"k2", b"v2b", NOW + 90_000)], st(30, "t2"), NOW)
    await kv.put_items("c", [w(b"gone", b"1", NOW - 1)], st(5), NOW - 10)  # expired at NOW
    await kv.put_items("d", [w(b"k", b"1")], st(5), NOW)
    await kv.delete_items("d", MatchKeys((b"k",)), st(6), NOW)  # only a tombstone left
    pages = await export_all(kv)
    assert flat(pages) == [
        ("a", [StampedItem(b"x", b"1", 0, 20, "")]),
        (
            "b",
            [StampedItem(b"k1", b"v1", 0, 10, "t1"), StampedItem(b"k2", b"v2b", NOW + 90_000, 30, "t2")],
        ),
    ]
    assert flat(pages)[1][1][0].stamp == st(10, "t1")
    # one record per page at limit_items=1 (a record is never split: "b" has two items)
    pages = await export_all(kv, limit_items=1)
    assert [[rid for rid, _ in p.records] for p in pages] == [["a"], ["b"]]
    assert pages[0].last_id == "a" and pages[1].last_id is None
    after_a = await kv.export_records(after="a", limit_items=BIG, limit_bytes=BIG, now_ms=NOW)
    assert [rid for rid, _ in after_a.records] == ["b"]
    empty = await kv.export_records(after="b", limit_items=BIG, limit_bytes=BIG, now_ms=NOW)
    assert empty == ExportPage([], None)


async def test_count_records_is_the_backfills_total(kv: Backend) -> None:
    """What ``prism migrate status`` shows the share copied and the time left by."""
    assert await kv.count_records(NOW) == 0
    await kv.put_items("b", [w(b"k1", b"v1"), w(b"k2", b"v2")], st(10), NOW)
    await kv.put_items("a", [w(b"x", b"1")], st(20), NOW)
    await kv.put_items("c", [w(b"y", b"1", NOW + 60_000)], st(20), NOW)
    assert await kv.count_records(NOW) == 3  # records, not items


async def test_import_applies_items_with_their_own_stamps(kv: Backend) -> None:
    await kv.import_records(
        [
            ("a", [StampedItem(b"k1", b"v1", 0, 10, "t1"), StampedItem(b"k2", b"v2", NOW + 5000, 12, "")]),
            ("b", [StampedItem(b"x", b"y", 0, 7, "z")]),
        ],
        NOW,
    )
    assert flat(await export_all(kv)) == [
        ("a", [StampedItem(b"k1", b"v1", 0, 10, "t1"), StampedItem(b"k2", b"v2", NOW + 5000, 12, "")]),
        ("b", [StampedItem(b"x", b"y", 0, 7, "z")]),
    ]
    # the stamps hold against later writes, as if the writes had been made here
    await kv.put_items("a", [w(b"k1", b"older")], st(9), NOW)
    await kv.put_items("a", [w(b"k2", b"newer")], st(13), NOW)
    assert await values(kv, "a") == {b"k1": b"v1", b"k2": b"newer"}


async def test_import_never_overwrites_a_newer_item(kv: Backend) -> None:
    await kv.put_items("a", [w(b"k", b"new")], st(100, "t"), NOW)
    await kv.import_records([("a", [StampedItem(b"k", b"old", 0, 50, "")])], NOW)
    assert await values(kv, "a") == {b"k": b"new"}
    # equal time, smaller token: older too
    await kv.import_records([("a", [StampedItem(b"k", b"old", 0, 100, "s")])], NOW)
    assert await values(kv, "a") == {b"k": b"new"}
    # newer: replaces
    await kv.import_records([("a", [StampedItem(b"k", b"newest", 0, 101, "")])], NOW)
    assert await values(kv, "a") == {b"k": b"newest"}


async def test_import_is_held_back_by_newer_tombstones(kv: Backend) -> None:
    await kv.put_items("a", [w(b"k", b"v"), w(b"r1", b"v"), w(b"r2", b"v"), w(b"z", b"v")], st(10), NOW)
    await kv.delete_items("a", MatchKeys((b"k",)), st(100), NOW)
    await kv.delete_items("a", MatchRange(b"r", b"s"), st(100), NOW)
    copy = [StampedItem(k, b"copy", 0, 50, "") for k in (b"k", b"r1", b"r2", b"z")]
    await kv.import_records([("a", copy)], NOW)
    assert await values(kv, "a") == {b"z": b"copy"}  # only z had no newer delete
    # a copy newer than the deletes goes in
    await kv.import_records([("a", [StampedItem(b"r1", b"later", 0, 200, "")])], NOW)
    assert await values(kv, "a") == {b"r1": b"later", b"z": b"copy"}


async def test_writes_delivered_out_of_order_end_as_in_stamp_order(kv: Backend) -> None:
    """A migration delivers a record's writes to the second backend late and perhaps
    out of order: the stamp rule must pick the same winner as in order."""
    await kv.put_items("a", [w(b"k", b"newer")], st(200, "b"), NOW)
    await kv.put_items("a", [w(b"k", b"older")], st(100, "a"), NOW)  # arrives second
    await kv.delete_items("b", MatchKeys((b"k",)), st(300), NOW)  # a delete before the put it follows
    await kv.put_items("b", [w(b"k", b"resurrected?")], st(250, "c"), NOW)
    await kv.delete_items("c", MatchRange(b"", b""), st(300), NOW)  # a whole-record delete, then an older put
    await kv.put_items("c", [w(b"k", b"old")], st(250, "d"), NOW)
    await kv.mutate_items("d", [Delete(MatchKeys((b"k",)))], st(300, "e"), NOW)
    await kv.mutate_items("d", [Put(w(b"k", b"old"))], st(250, "f"), NOW)
    await kv.put_items("d", [w(b"j", b"newest")], st(400, "g"), NOW)  # newer than the delete: stays
    assert await values(kv, "a") == {b"k": b"newer"}
    assert await values(kv, "b") == {} and await values(kv, "c") == {}
    assert await values(kv, "d") == {b"j": b"newest"}


async def test_import_records_no_token(kv: Backend) -> None:
    await kv.import_records([("a", [StampedItem(b"k", b"copy", 0, 10, "tok")])], NOW)
    # a client's write with the token of the copied item is not a replay
    await kv.put_items("a", [w(b"k2", b"client")], st(20, "tok"), NOW)
    assert await values(kv, "a") == {b"k": b"copy", b"k2": b"client"}


async def test_import_skips_expired_items_and_keeps_expiry_absolute(kv: Backend) -> None:
    await kv.import_records(
        [("a", [StampedItem(b"old", b"1", NOW - 1, 10, ""), StampedItem(b"live", b"1", NOW + 1000, 10, "")])],
        NOW,
    )
    await kv.import_records([("b", [StampedItem(b"old", b"1", NOW - 1, 10, "")])], NOW)
    assert flat(await export_all(kv, now=NOW - 10)) == [
        ("a", [StampedItem(b"live", b"1", NOW + 1000, 10, "")])
    ]
    assert await values(kv, "a", now=NOW + 1000) == {}


async def test_import_refuses_an_empty_key_and_applies_nothing(kv: Backend) -> None:
    with pytest.raises(InvalidArgument, match="item key must not be empty"):
        await kv.import_records(
            [("a", [StampedItem(b"k", b"v", 0, 1, "")]), ("b", [StampedItem(b"", b"v", 0, 1, "")])], NOW
        )
    assert flat(await export_all(kv)) == []


async def test_import_nothing(kv: Backend) -> None:
    await kv.import_records([], NOW)
    await kv.import_records([("a", [])], NOW)
    assert flat(await export_all(kv)) == []


async def test_a_batch_of_puts_is_each_put_as_put_items_would_apply_it(kv: Backend) -> None:
    """``BatchWritable`` (what a migration's second backend is sent in batches)."""
    if not isinstance(kv, BatchWritable):
        pytest.skip(f"{type(kv).__name__} takes puts one by one")
    await kv.put_items("a", [w(b"k", b"newer")], st(100), NOW)
    await kv.put_items("b", [w(b"k", b"first")], st(5, "tok"), NOW)
    await kv.delete_items("r", MatchRange(b"a", b"m"), st(50), NOW)
    for now in (NOW, NOW + 1):  # the first batch of a fresh backend carries its purge
        await kv.put_batch(
            [
                ("a", [w(b"k", b"older")], st(50)),  # older than what a holds: skipped
                ("b", [w(b"k", b"replay")], st(60, "tok")),  # b's token was applied: skipped
                ("c", [w(b"k1", b"1"), w(b"k2", b"2", NOW + 5000)], st(70, "tok")),  # another record's
                ("r", [w(b"c", b"covered"), w(b"x", b"free")], st(40)),  # c under a newer range delete
                ("e", [w(b"k", b"v1"), w(b"k", b"v2")], st(80)),  # a key twice: the last
            ],
            now,
        )
    assert {id: await values(kv, id) for id in "abcre"} == {
        "a": {b"k": b"newer"},
        "b": {b"k": b"first"},
        "c": {b"k1": b"1", b"k2": b"2"},
        "r": {b"x": b"free"},
        "e": {b"k": b"v2"},
    }
    await kv.put_items("c", [w(b"k1", b"again")], st(90, "tok"), NOW + 2)  # its token was claimed
    assert await values(kv, "c") == {b"k1": b"1", b"k2": b"2"}
    with pytest.raises(ValueError, match="one put per record"):
        await kv.put_batch([("f", [w(b"k", b"1")], st(1)), ("f", [w(b"j", b"2")], st(2))], NOW + 3)
    assert await values(kv, "f") == {}


ENGINES = catalog.builtin("keyvalue")


@pytest.fixture(
    params=[(a, b) for a in ENGINES for b in ENGINES if a != b], ids=lambda p: f"{p[0]}-to-{p[1]}"
)
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Backend, Backend]]:
    a, b = request.param
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    backends = [await open_backend(a, tmp_path / "a"), await open_backend(b, tmp_path / "b")]
    try:
        yield backends[0], backends[1]
    finally:
        for backend in backends:
            await backend.aclose()
            if isinstance(backend, PostgresBackend):
                drop_tables(backend)
            if isinstance(backend, RedisBackend):
                await delete_keys(backend.key_prefix)


async def test_a_copy_between_any_two_engines_is_exact(pair: tuple[Backend, Backend]) -> None:
    source, target = pair
    big = b"\x00\xff" * 40_000
    await source.put_items("r1", [w(b"a", b"1"), w(b"b", big, NOW + 7_000)], st(11, "tok-1"), NOW)
    await source.put_items("r2", [w(bytes([0, 255]), b"")], st(12), NOW)
    await source.put_items("r\u00e9", [w(b"k", b"v")], st(13, "t\u00e9"), NOW)
    for i in range(30):
        await source.put_items(f"n{i:03}", [w(b"k%d" % j, b"v%d" % i) for j in range(3)], st(100 + i), NOW)
    for page in await export_all(source, limit_items=7):
        await target.import_records(page.records, NOW)
    assert flat(await export_all(target)) == flat(await export_all(source))
