"""The NATS PubSub backend against the real server: unreachable server,
a publish/subscribe/ack round trip, and acks that reach the member holding
the delivery from another process (another backend instance here).

Each test has a stream of its own (a uuid) and deletes it at the end. The
redelivery timing is the server's (``ack_wait``), so these use real time."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from prism.backends import registry
from prism.backends.nats.options import NatsPubSubOptions
from prism.backends.nats.pubsub import NatsPubSubBackend
from prism.backends.pubsub import Start, StartKind, Subscription
from prism.drivers import nats as natsio
from prism.errors import ConfigError, FailedPrecondition, InvalidArgument, Unavailable

pytestmark = pytest.mark.services("nats")

URL = os.environ.get("PRISM_TEST_NATS_URL", "nats://127.0.0.1:4222")
ACK_WAIT_MS = 300
EARLIEST = Start(StartKind.EARLIEST)

Factory = Callable[..., Awaitable[NatsPubSubBackend]]


async def delete_stream(name: str) -> None:
    nc = await natsio.connect(URL, timeout_s=5)
    try:
        reply = await nc.request(f"$JS.API.STREAM.DELETE.{name}", timeout_s=5)
        assert b"error" not in reply.data or b"10059" in reply.data, reply.data  # deleted or never made
    finally:
        nc.close()


@pytest.fixture
async def new_backend(tmp_path: Path) -> AsyncIterator[Factory]:
    """Opened backends on one stream of this test's own (several = several workers)."""
    stream = f"prism_test_{uuid.uuid4().hex}"
    opened: list[NatsPubSubBackend] = []

    async def make(**options: object) -> NatsPubSubBackend:
        backend = registry.create_pubsub(
            "nats",
            {"url": URL, "stream": stream, "ack_wait_ms": ACK_WAIT_MS, **options},
            data_dir=tmp_path,
            namespace="ns",
        )
        assert isinstance(backend, NatsPubSubBackend)
        await backend.open()
        opened.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in opened:
            await backend.aclose()
        await delete_stream(stream)


async def nothing_within(sub: Subscription, seconds: float) -> None:
    with trio.move_on_after(seconds):
        msg = await sub.receive()
        pytest.fail(f"unexpected delivery: {msg}")


def test_options_are_checked(tmp_path: Path) -> None:
    def create(options: dict[str, object], namespace: str = "ns") -> object:
        return registry.create_pubsub("nats", options, data_dir=tmp_path, namespace=namespace)

    with pytest.raises(ConfigError, match=r"^options\.bogus: unknown field$"):
        create({"bogus": 1})
    with pytest.raises(ConfigError, match=r"^options\.stream: expected str matching regex"):
        create({"stream": "a.b"})
    with pytest.raises(
        ConfigError, match=r"^options\.url: expected a nats:// or tls:// URL, got scheme 'http'$"
    ):
        create({"url": "http://127.0.0.1:4222"})
    backend = create({}, namespace="my.ns")
    assert isinstance(backend, NatsPubSubBackend) and backend.stream == "PRISM_my_ns"


@pytest.mark.parametrize("url", ["nats://127.0.0.1:1", "nats://192.0.2.1:4222"])  # refused; blackholed
async def test_unreachable_server_is_unavailable_within_connect_timeout(tmp_path: Path, url: str) -> None:
    backend = NatsPubSubBackend(NatsPubSubOptions(url=url, connect_timeout_s=0.3), namespace="ns")
    with trio.fail_after(1.0):
        with pytest.raises(Unavailable, match="nats: cannot connect"):
            await backend.open()
        with pytest.raises(Unavailable):
            await backend.ping()
        with pytest.raises(Unavailable):
            await backend.publish("t", b"x", {}, "")
    await backend.aclose()


async def test_ping_answers_while_up_and_fails_once_closed(new_backend: Factory) -> None:
    backend = await new_backend()
    await backend.ping()
    await backend.aclose()
    with pytest.raises(Unavailable):
        await backend.ping()


async def test_publish_subscribe_ack_round_trip(new_backend: Factory) -> None:
    backend = await new_backend()
    topic = "orders.eu *>\u00e9"  # not a valid NATS subject token as it is
    seq = await backend.publish(topic, b"payload", {"Content-Type": "a\r\nb", "x": ""}, "m-1")
    assert await backend.publish(topic, b"again", {}, "m-1") == seq  # dedup
    other = await backend.publish("orders", b"elsewhere", {}, "m-1")  # same id, other topic: stored
    assert other > seq
    async with backend.subscribe(topic, "g", EARLIEST) as sub:
        with trio.fail_after(5):
            msg = await sub.receive()
        assert (msg.topic, msg.sequence, msg.payload, msg.message_id) == (topic, seq, b"payload", "m-1")
        assert msg.headers == {"Content-Type": "a\r\nb", "x": ""}
        await backend.ack(topic, "g", [msg.sequence])
        await nothing_within(sub, 3 * ACK_WAIT_MS / 1000)  # acked: not redelivered after ack_wait
        await backend.ack(topic, "g", [msg.sequence, 12345])  # not pending: no-op


async def test_unacked_delivery_comes_back_at_once_when_the_member_leaves(new_backend: Factory) -> None:
    backend = await new_backend(ack_wait_ms=60_000)  # only the NAK on exit can bring it back in time
    seq = await backend.publish("t", b"x", {}, "")
    async with backend.subscribe("t", "g", EARLIEST) as sub:
        with trio.fail_after(5):
            assert (await sub.receive()).sequence == seq
    async with backend.subscribe("t", "g", EARLIEST) as sub:
        with trio.fail_after(5):
            assert (await sub.receive()).sequence == seq


async def test_delivery_to_a_pull_left_open_by_a_leaving_member_comes_back_at_once(
    new_backend: Factory,
) -> None:
    backend = await new_backend(ack_wait_ms=60_000)
    async with backend.subscribe("t", "g", EARLIEST) as stays:
        async with backend.subscribe("t", "g", EARLIEST) as leaves:
            await nothing_within(leaves, 0.1)  # its pull stays open on the server
        seq = await backend.publish("t", b"x", {}, "")  # goes to that pull first (FIFO)
        with trio.fail_after(5):
            assert (await stays.receive()).sequence == seq


async def test_ack_from_another_worker_is_honoured(new_backend: Factory) -> None:
    holder, other = await new_backend(), await new_backend()
    seq = await holder.publish("t", b"x", {}, "")
    async with holder.subscribe("t", "g", EARLIEST) as sub:
        with trio.fail_after(5):
            assert (await sub.receive()).sequence == seq
        with trio.fail_after(2):
            await other.ack("t", "g", [seq])  # forwarded to the holder
        await nothing_within(sub, 3 * ACK_WAIT_MS / 1000)
    async with other.subscribe("t", "g", EARLIEST) as sub2:  # nothing left for the group
        await nothing_within(sub2, 3 * ACK_WAIT_MS / 1000)


async def test_ack_with_no_member_anywhere_is_a_quick_no_op(new_backend: Factory) -> None:
    backend = await new_backend()
    with trio.fail_after(0.2):  # no listener: NATS answers "no responders" at once
        await backend.ack("t", "g", [1, 2, 3])


async def test_stream_is_reused_and_its_dedup_window_updated(new_backend: Factory) -> None:
    first = await new_backend(dedup_window_s=10)
    seq = await first.publish("t", b"x", {}, "")
    second = await new_backend(dedup_window_s=20)  # opens the same stream: kept, window updated
    nc = await natsio.connect(URL, timeout_s=5)
    try:
        info = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{second.stream}", timeout_s=5)).data)
    finally:
        nc.close()
    assert info["config"]["duplicate_window"] == 20 * 10**9
    assert info["state"]["last_seq"] == seq


async def test_large_payload_round_trip(new_backend: Factory) -> None:
    backend = await new_backend()
    payload = bytes(range(256)) * 3000  # several socket reads
    seq = await backend.publish("t", payload, {}, "")
    async with backend.subscribe("t", "", EARLIEST) as sub:
        with trio.fail_after(5):
            msg = await sub.receive()
    assert (msg.sequence, msg.payload) == (seq, payload)


class Proxy:
    """A TCP relay to the NATS server that the test can cut and restart (the
    server itself stays up for the other tests)."""

    def __init__(self) -> None:
        self.port = 0
        self._scope = trio.CancelScope()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        target = urlsplit(URL)
        with trio.CancelScope() as self._scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

            async def relay(client: trio.SocketStream) -> None:
                up = await trio.open_tcp_stream(target.hostname or "127.0.0.1", target.port or 4222)
                async with client, up, trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, up)
                    nursery.start_soon(pump, up, client)

            await trio.serve_listeners(relay, listeners)

    async def cut_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self._scope.cancel()


async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
    while data := await a.receive_some(65536):
        await b.send_all(data)


async def test_lost_connection_fails_waiting_calls_and_comes_back(new_backend: Factory) -> None:
    async with trio.open_nursery() as nursery:
        proxy = Proxy()
        await nursery.start(proxy.serve)
        backend = await new_backend(url=f"nats://127.0.0.1:{proxy.port}", connect_timeout_s=0.5)
        async with backend.subscribe("t", "g", EARLIEST) as sub:
            nursery.start_soon(proxy.cut_after, 0.2)
            with trio.fail_after(2), pytest.raises(Unavailable, match="connection lost"):
                await sub.receive()  # waiting for its pull when the connection drops
        with trio.fail_after(2), pytest.raises(Unavailable, match="cannot connect"):
            await backend.publish("t", b"lost", {}, "")
        await nursery.start(proxy.serve)  # back: the backend reconnects on next use
        with trio.fail_after(2):
            seq = await backend.publish("t", b"kept", {}, "")
            async with backend.subscribe("t", "g", EARLIEST) as sub:
                msg = await sub.receive()
        assert (msg.sequence, msg.payload) == (seq, b"kept")
        nursery.cancel_scope.cancel()


async def test_message_over_the_server_limit_is_refused_and_the_connection_kept(new_backend: Factory) -> None:
    backend = await new_backend()
    with pytest.raises(InvalidArgument):
        await backend.publish("t", b"x" * (8 << 20), {}, "")  # the server's max_payload is lower
    seq = await backend.publish("t", b"x", {}, "")
    async with backend.subscribe("t", "", EARLIEST) as sub:
        with trio.fail_after(5):
            assert (await sub.receive()).sequence == seq


async def test_concurrent_requests_share_one_connection_through_cancellations() -> None:
    """Whoever waits reads the socket: replies reach their own callers while
    some callers (the reader among them, at times) are cancelled mid-wait."""
    nc = await natsio.connect(URL, timeout_s=5)
    subject = f"prism_test.echo.{uuid.uuid4().hex}"
    got: dict[int, bytes] = {}
    try:
        async with trio.open_nursery() as nursery:
            requests = await nc.subscribe(subject)

            async def echo() -> None:
                while True:
                    msg = await nc.next_msg(requests)
                    await trio.sleep(0.001 * (len(msg.data) % 3))
                    await nc.publish(msg.reply, msg.data)

            async def call(i: int) -> None:
                with trio.move_on_after(0.002 if i % 3 == 0 else 10):
                    reply = await nc.request(subject, b"%d" % i, timeout_s=10)
                    got[i] = reply.data

            nursery.start_soon(echo)
            with trio.fail_after(10):
                async with trio.open_nursery() as callers:
                    for i in range(300):
                        callers.start_soon(call, i)
            assert all(got[i] == b"%d" % i for i in range(300) if i % 3)
            assert all(data == b"%d" % i for i, data in got.items())
            assert (await nc.request(subject, b"after", timeout_s=5)).data == b"after"
            nursery.cancel_scope.cancel()
    finally:
        nc.close()


async def test_a_foreign_stream_of_the_same_name_is_not_used(tmp_path: Path) -> None:
    stream = f"prism_test_{uuid.uuid4().hex}"
    nc = await natsio.connect(URL, timeout_s=5)
    try:
        config = {"name": stream, "subjects": [f"elsewhere.{stream}.>"]}
        await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode(), timeout_s=5)
        backend = NatsPubSubBackend(NatsPubSubOptions(url=URL, stream=stream), namespace="ns")
        with pytest.raises(FailedPrecondition, match="does not take subjects"):
            await backend.open()
        await backend.aclose()
    finally:
        nc.close()
        await delete_stream(stream)
