"""The PubSubBackend contract (prism/backends/pubsub.py), checked
against every backend.

Clocks: each test is written once, waiting real durations (``ACK_WAIT``,
``WINDOW``), and runs on two clocks. pytest-trio runs an async test with the
``run`` of the first ``pytest.mark.trio(run=...)`` marker on the item, called
as ``run(fn, clock=..., instruments=...)``. The marks of a fixture param are
the item's own and come before the marker that trio mode appends, so the
"memory" param of ``kind`` carries a marker whose runner is ``trio.run`` with
``MockClock(autojump_threshold=0)``: whenever every task waits, time jumps to
the next deadline, so ack_wait and dedup waits cost nothing and a backend that
never delivers trips the ``fail_after`` guard at once (one that busy-loops
still hangs: fake time only moves when everything waits). For "nats" the
server times redelivery and dedup, so the same waits are real (kept short).
``test_clock`` checks the mechanism. As the marker makes every test that uses
``kind`` a trio test, those tests are async even where they need not be.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from prism.backends import registry
from prism.backends.pubsub import Message, PubSubBackend, Start, StartKind, Subscription
from prism.errors import ConfigError, Unavailable

pytestmark = pytest.mark.services("nats")

ACK_WAIT = 0.3  # seconds
WINDOW = 1.0  # dedup window, seconds
GUARD = 5.0  # the longest any one receive may take
T = "topic"
LATEST = Start(StartKind.LATEST)
EARLIEST = Start(StartKind.EARLIEST)


def at(sequence: int) -> Start:
    return Start(StartKind.SEQUENCE, sequence)


def _autojump_run(fn: Callable[[], Any], *, clock: object, instruments: Any) -> Any:
    return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0), instruments=instruments)


def make(kind: str, data_dir: Path, **options: object) -> Any:
    opts = {"ack_wait_ms": int(ACK_WAIT * 1000), "dedup_window_s": WINDOW, **options}
    namespace = f"ns_{uuid.uuid4().hex[:12]}"
    if kind == "nats":
        opts = {"stream": f"T{uuid.uuid4().hex}", **opts}
    # Through the registry, from a plain table: as a worker builds them.
    return registry.create_pubsub(kind, opts, data_dir=data_dir, namespace=namespace)


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.trio(run=_autojump_run)), "nats"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def pubsub(kind: str, tmp_path: Path) -> AsyncIterator[PubSubBackend]:
    backend = make(kind, tmp_path)
    await backend.open()
    try:
        yield backend
    finally:
        if hasattr(backend, "drop"):  # tests may delete what they made; the product never does
            await backend.drop()
        await backend.aclose()


async def pub(ps: PubSubBackend, payload: bytes = b"", message_id: str = "", topic: str = T) -> int:
    return await ps.publish(topic, payload, {}, message_id)


async def take(sub: Subscription, n: int = 1) -> list[Message]:
    out = []
    for _ in range(n):
        with trio.fail_after(GUARD):
            out.append(await sub.receive())
    return out


async def nothing(sub: Subscription, seconds: float = 2 * ACK_WAIT) -> None:
    """Nothing arrives for ``seconds``."""
    with trio.move_on_after(seconds):
        msg = await sub.receive()
        pytest.fail(f"unexpected delivery {msg!r}")


def seqs(messages: list[Message]) -> list[int]:
    return [m.sequence for m in messages]


async def test_clock(pubsub: PubSubBackend, kind: str) -> None:
    assert isinstance(pubsub, PubSubBackend)
    fake = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
    assert fake == (kind == "memory")


async def test_sequences_increase_per_topic_and_match_delivery(pubsub: PubSubBackend) -> None:
    published: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(6):
        topic = "ab"[i % 3 == 0]
        published[topic].append(await pub(pubsub, b"%d" % i, topic=topic))
    for topic, sent in published.items():
        assert sent == sorted(set(sent))
        async with pubsub.subscribe(topic, "", EARLIEST) as sub:
            got = await take(sub, len(sent))
            await nothing(sub, 0.1)
        assert seqs(got) == sent and {m.topic for m in got} == {topic}


async def test_round_trip(pubsub: PubSubBackend) -> None:
    sent = [
        (b"", {}, ""),
        (b"\x00\xff\x80\r\n binary", {"Mixed-Case": "V", "lower": "x: y, z", "ünï": "çödé ✓"}, "id-1"),
        (bytes(range(256)) * 64, {"empty": ""}, "ïd 2/with spaces.and*dots>"),
    ]
    numbers = [await pubsub.publish(T, p, h, i) for p, h, i in sent]
    async with pubsub.subscribe(T, "g", EARLIEST) as sub:
        got = await take(sub, 3)
    assert got == [Message(T, s, p, h, i) for s, (p, h, i) in zip(numbers, sent, strict=True)]


async def test_headers_are_any_strings(pubsub: PubSubBackend) -> None:
    headers = {"with space": "a\r\nb", "colon:key": "\x00", "": "empty key", "k" * 200: "v" * 2000}
    seq = await pubsub.publish(T, b"x", headers, "")
    async with pubsub.subscribe(T, "", EARLIEST) as sub:
        assert await take(sub) == [Message(T, seq, b"x", headers, "")]


async def test_topics_are_literal(pubsub: PubSubBackend) -> None:
    topics = ["a.b", "a.*", "a.>", "a", ">", "*", "a b", "ünï.cödé ✓", "a..b", ".lead", "tail.", "a/b\\c"]
    for topic in topics:
        await pub(pubsub, topic.encode(), topic=topic)
    for topic in topics:
        async with pubsub.subscribe(topic, "g", EARLIEST) as sub:
            got = await take(sub)
            await nothing(sub, 0.1)
        assert (got[0].topic, got[0].payload) == (topic, topic.encode())


async def test_dedup_within_window(pubsub: PubSubBackend) -> None:
    first = await pub(pubsub, b"one", "id")
    assert await pub(pubsub, b"two", "id") == first  # the second payload is not stored
    other = await pub(pubsub, b"three", "other")
    blank = [await pub(pubsub, b"", ""), await pub(pubsub, b"", "")]  # no id: never a duplicate
    assert first < other < blank[0] < blank[1]
    assert await pub(pubsub, b"one", "id") == first
    await pub(pubsub, b"elsewhere", "id", topic="u")  # ids are per topic
    async with pubsub.subscribe(T, "", EARLIEST) as sub:
        got = await take(sub, 4)
        await nothing(sub, 0.1)
    assert [(m.sequence, m.payload) for m in got] == [(first, b"one"), (other, b"three")] + [
        (s, b"") for s in blank
    ]
    async with pubsub.subscribe("u", "", EARLIEST) as sub:
        assert [m.payload for m in await take(sub)] == [b"elsewhere"]


async def test_dedup_window_passes(pubsub: PubSubBackend) -> None:
    first = await pub(pubsub, b"one", "id")
    await trio.sleep(WINDOW + 0.5)
    again = await pub(pubsub, b"again", "id")
    assert again > first
    assert await pub(pubsub, b"thrice", "id") == again  # a new window from the new message
    async with pubsub.subscribe(T, "", EARLIEST) as sub:
        assert [m.payload for m in await take(sub, 2)] == [b"one", b"again"]


async def test_fan_out_to_groups(pubsub: PubSubBackend) -> None:
    async with pubsub.subscribe(T, "g1", LATEST) as s1, pubsub.subscribe(T, "g2", LATEST) as s2:
        sent = [await pub(pubsub, b"%d" % i) for i in range(3)]
        for sub, group in ((s1, "g1"), (s2, "g2")):
            got = await take(sub, 3)
            assert seqs(got) == sent
            await pubsub.ack(T, group, sent)


async def test_members_of_a_group_share(pubsub: PubSubBackend) -> None:
    n_members, n_publishers, per_publisher = 3, 3, 10
    received: list[int] = []
    sent: list[int] = []
    all_in = trio.Event()

    async def member(task_status: trio.TaskStatus[None]) -> None:
        async with pubsub.subscribe(T, "g", EARLIEST) as sub:
            task_status.started()
            while True:
                msg = await sub.receive()
                received.append(msg.sequence)
                await pubsub.ack(T, "g", [msg.sequence])
                if len(received) >= n_publishers * per_publisher:
                    all_in.set()

    async def publisher(p: int) -> None:
        for i in range(per_publisher):
            sent.append(await pub(pubsub, b"%d-%d" % (p, i)))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            for _ in range(n_members):
                await nursery.start(member)
            for p in range(n_publishers):
                nursery.start_soon(publisher, p)
            await all_in.wait()
            await trio.sleep(2 * ACK_WAIT)  # acknowledged: nothing comes again
            nursery.cancel_scope.cancel()
    assert sorted(received) == sorted(sent) and len(set(sent)) == len(sent)


async def test_unacked_redelivered_after_ack_wait(pubsub: PubSubBackend) -> None:
    seq = await pub(pubsub, b"x")
    async with pubsub.subscribe(T, "g", EARLIEST) as sub:
        await take(sub)
        await nothing(sub, ACK_WAIT - 0.1)  # not before ack_wait (minus a margin for a real clock)
        again = await take(sub)
        assert seqs(again) == [seq] and again[0].payload == b"x"
        await pubsub.ack(T, "g", [seq])
        await nothing(sub, 3 * ACK_WAIT)


async def test_acked_never_redelivered(pubsub: PubSubBackend) -> None:
    sent = [await pub(pubsub, b"%d" % i) for i in range(3)]
    async with pubsub.subscribe(T, "g", EARLIEST) as sub:
        assert seqs(await take(sub, 3)) == sent
        await pubsub.ack(T, "g", sent[::-1])
        await pubsub.ack(T, "g", sent)  # again: nothing happens
        await nothing(sub, 3 * ACK_WAIT)
        later = await pub(pubsub, b"later")
        assert seqs(await take(sub)) == [later]


async def test_leaving_releases_unacked_at_once(pubsub: PubSubBackend) -> None:
    acked, unacked = await pub(pubsub, b"1"), await pub(pubsub, b"2")
    async with pubsub.subscribe(T, "g", EARLIEST) as b:
        async with pubsub.subscribe(T, "g", EARLIEST) as a:
            assert seqs(await take(a, 2)) == [acked, unacked]
            await pubsub.ack(T, "g", [acked])
            left = trio.current_time()
        assert seqs(await take(b)) == [unacked]
        assert trio.current_time() - left < ACK_WAIT / 2
        # also a redelivery, when its member leaves
        async with pubsub.subscribe(T, "g", EARLIEST) as c:
            assert seqs(await take(c)) == [unacked]
            left = trio.current_time()
        assert seqs(await take(b)) == [unacked]
        assert trio.current_time() - left < ACK_WAIT / 2
        await pubsub.ack(T, "g", [unacked])
        await nothing(b, 3 * ACK_WAIT)


async def test_group_resumes_where_it_left_off(pubsub: PubSubBackend) -> None:
    m1, m2 = await pub(pubsub, b"1"), await pub(pubsub, b"2")
    async with pubsub.subscribe(T, "g", EARLIEST) as sub:
        assert seqs(await take(sub, 2)) == [m1, m2]
        await pubsub.ack(T, "g", [m1])  # m2 stays unacknowledged
    m3 = await pub(pubsub, b"3")  # while nobody is subscribed
    async with pubsub.subscribe(T, "g", LATEST) as sub:  # start is ignored
        got = await take(sub, 2)
        assert sorted(seqs(got)) == [m2, m3]
        await pubsub.ack(T, "g", seqs(got))
        await nothing(sub, 0.1)
    for start in (EARLIEST, at(m1), LATEST):
        async with pubsub.subscribe(T, "g", start) as sub:
            await nothing(sub, 2 * ACK_WAIT)
    m4 = await pub(pubsub, b"4")
    async with pubsub.subscribe(T, "g", at(m4 + 100)) as sub:
        assert seqs(await take(sub)) == [m4]


@pytest.mark.parametrize("group", ["g", ""], ids=["durable", "ephemeral"])
async def test_start_positions(pubsub: PubSubBackend, group: str) -> None:
    def name(start: str) -> str:
        return f"{group}-{start}" if group else ""

    async def received(sub: Subscription, n: int) -> list[int]:
        got = seqs(await take(sub, n))
        if group:
            await pubsub.ack(T, group, got)
        return got

    a, b = await pub(pubsub, b"a"), await pub(pubsub, b"b")
    async with pubsub.subscribe(T, name("latest"), LATEST) as latest:
        await nothing(latest, 0.1)
        c = await pub(pubsub, b"c")
        assert await received(latest, 1) == [c]
    async with pubsub.subscribe(T, name("earliest"), EARLIEST) as earliest:
        assert await received(earliest, 3) == [a, b, c]
    async with pubsub.subscribe(T, name("at-b"), at(b)) as at_b:
        assert await received(at_b, 2) == [b, c]
    async with pubsub.subscribe(T, name("beyond"), at(c + 1)) as beyond:
        await nothing(beyond, 0.1)
        d = await pub(pubsub, b"d")
        assert await received(beyond, 1) == [d]


async def test_ephemeral_needs_no_ack_and_is_forgotten(pubsub: PubSubBackend) -> None:
    sent = [await pub(pubsub, b"%d" % i) for i in range(3)]
    async with pubsub.subscribe(T, "", EARLIEST) as one, pubsub.subscribe(T, "", EARLIEST) as two:
        assert seqs(await take(one, 3)) == sent
        assert seqs(await take(two, 3)) == sent  # not a group: each sees everything
        await nothing(one, 3 * ACK_WAIT)
        await pubsub.ack(T, "", sent)  # nothing to acknowledge: no error
    async with pubsub.subscribe(T, "", EARLIEST) as again:
        assert seqs(await take(again, 3)) == sent


async def test_ack_of_what_is_not_pending_does_nothing(pubsub: PubSubBackend) -> None:
    m1, m2 = await pub(pubsub, b"1"), await pub(pubsub, b"2")
    await pubsub.ack("no such topic", "g", [1, 2])
    await pubsub.ack(T, "no such group", [m1, m2])
    await pubsub.ack(T, "g", [m1, m2])  # "g" does not exist yet
    await pubsub.ack(T, "g", [])
    async with pubsub.subscribe(T, "g", EARLIEST) as sub:
        assert seqs(await take(sub)) == [m1]
        await pubsub.ack(T, "g", [m2, m2 + 1000])  # m2 was never delivered
        assert seqs(await take(sub)) == [m2]
        await pubsub.ack(T, "g", [m1, m2])
        await nothing(sub, 3 * ACK_WAIT)


@pytest.mark.parametrize(
    "options",
    [
        {"ack_wait_ms": 0},
        {"ack_wait_ms": "300"},
        {"ack_wait_ms": True},
        {"ack_wait_ms": 1.5},
        {"dedup_window_s": -1},
        {"dedup_window_s": "1"},
        {"bogus": 1},
    ],
)
async def test_bad_options(kind: str, tmp_path: Path, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        make(kind, tmp_path, **options)


@pytest.mark.parametrize("group", ["g", ""])
async def test_an_error_inside_a_subscription_comes_out_as_raised(pubsub: PubSubBackend, group: str) -> None:
    # Not wrapped in an ExceptionGroup by a backend's own nursery: the API
    # maps errors raised there (Unavailable when a stream is ended) to statuses.
    with pytest.raises(Unavailable, match="ended"):
        async with pubsub.subscribe(T, group, Start()) as sub:
            assert isinstance(sub, Subscription)
            raise Unavailable("ended by the caller")


async def test_nats_group_follows_a_changed_ack_wait(tmp_path: Path) -> None:
    # API.md: an unacknowledged delivery comes again after the namespace's
    # ack_wait_ms. A group made while it was 60 s must follow it once Prism
    # serves the namespace with 0.3 s (JetStream keeps a durable consumer's
    # own ack_wait until it is updated).
    opts = {"stream": f"T{uuid.uuid4().hex}", "dedup_window_s": WINDOW}
    namespace = f"ns_{uuid.uuid4().hex[:12]}"
    before = registry.create_pubsub(
        "nats", {**opts, "ack_wait_ms": 60_000}, data_dir=tmp_path, namespace=namespace
    )
    await before.open()
    try:
        async with before.subscribe(T, "g", EARLIEST):
            pass  # the group now exists
    finally:
        await before.aclose()
    after = registry.create_pubsub(
        "nats", {**opts, "ack_wait_ms": int(ACK_WAIT * 1000)}, data_dir=tmp_path, namespace=namespace
    )
    await after.open()
    try:
        seq = await pub(after, b"x")
        async with after.subscribe(T, "g", EARLIEST) as sub:
            assert seqs(await take(sub)) == [seq]
            assert seqs(await take(sub)) == [seq]  # again within GUARD, not after 60 s
    finally:
        await after.drop()
        await after.aclose()
