"""The forwarding policy (``prism.router.remote``), with real Apps on memory
backends, real ForwardBuses on ipc:// addresses and a real h2 client, all in
this process.

Each ``Node`` stands for one worker. It has its own routing table buffer,
so that one worker's table can be older than another's, as happens for a
moment after the supervisor republishes the shared table.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from prism.config import NamespaceConfig, ServerConfig
from prism.errors import DeadlineExceeded, FailedPrecondition, StatusCode, Unavailable
from prism.proto import kv_pb2, timeseries_pb2
from prism.router.messages import ForwardCall
from prism.router.remote import OPEN_WAIT_S, OWNER_WAIT_S, Forwarding
from prism.router.table import NamespaceEntry, Routes, RoutingTableReader, RoutingTableWriter, WorkerEntry
from prism.rpc.call import CallContext
from prism.rpc.methods import Method
from prism.rpc.server import Connection
from prism.workers.app import App

from .h2client import H2Client, Response, frame

PUT = "/prism.kv.v1.KeyValue/PutItems"
GET = "/prism.kv.v1.KeyValue/GetItems"
READ = "/prism.timeseries.v1.TimeSeries/ReadEvents"


class Node:
    """One worker: an App, its routing table, its Forwarding policy (whose
    Host it is) and the bus under it."""

    def __init__(self, wid: int, tenant: str, ipc_dir: Path, data_dir: Path) -> None:
        self.id = wid
        self.tenant = tenant
        self.address = f"ipc://{ipc_dir}/w{wid}"
        buffer = bytearray(64 * 1024)
        self.table = RoutingTableWriter(buffer)
        self.routes = RoutingTableReader(buffer)
        self.generation = -1  # the routing generation applied
        self.refreshes = 0  # apply_routes calls made by the policy
        self.published_meanwhile: Routes | None = None  # published when the policy refreshes
        self.remote = Forwarding(
            tenant=tenant, worker_id=wid, address=self.address, routes=self.routes, host=self
        )
        self.app = App(
            ServerConfig(data_dir=str(data_dir / f"w{wid}")), remote=self.remote, locator=self.remote
        )
        self.observed: list[tuple[str, StatusCode]] = []
        self.app.settings.observer = self._observe

    def _observe(self, call: CallContext, method: Method, status: StatusCode, seconds: float) -> None:
        self.observed.append((method.name, status))

    def entry(self, serving: bool = True) -> WorkerEntry:
        return WorkerEntry(
            id=self.id,
            tenant=self.tenant,
            pid=0,
            forward_address=self.address,
            handoff_address="",
            serving=serving,
        )

    async def install(self, routes: Routes) -> None:
        """The supervisor publishes ``routes`` and this worker applies them."""
        self.table.publish(routes)
        await self._apply()

    async def apply_routes(self) -> None:  # Host
        self.refreshes += 1
        if self.published_meanwhile is not None:
            self.table.publish(self.published_meanwhile)
            self.published_meanwhile = None
        await self._apply()

    async def _apply(self) -> None:
        routes = self.routes.current()
        if routes.generation != self.generation:
            await self.app.apply(
                NamespaceConfig(name=e.name, abstraction=e.abstraction, backend=e.backend)
                for e in routes.namespaces.values()
                if e.tenant == self.tenant
            )
            self.generation = routes.generation


def routes(generation: int, namespaces: dict[str, tuple[str, str]], *nodes: Node) -> Routes:
    """``namespaces``: name -> (tenant, abstraction), every one on the memory backend."""
    return Routes(
        generation=generation,
        namespaces={
            name: NamespaceEntry(name, tenant, abstraction, "memory")
            for name, (tenant, abstraction) in namespaces.items()
        },
        workers={n.id: n.entry() for n in nodes},
    )


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pfwp", dir="/tmp"))  # socket paths must stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def nodes(ipc_dir: Path, tmp_path: Path) -> tuple[Node, Node, Node]:
    return Node(1, "a", ipc_dir, tmp_path), Node(2, "b", ipc_dir, tmp_path), Node(3, "c", ipc_dir, tmp_path)


@asynccontextmanager
async def running(*nodes: Node) -> AsyncIterator[None]:
    try:
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.remote.bus.run)
            yield
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.remote.bus.close()
            await node.app.aclose()


@asynccontextmanager
async def client_of(node: Node) -> AsyncIterator[H2Client]:
    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(Connection(server_stream, node.app.settings).serve)
        client = H2Client(client_stream)
        await client.start()
        yield client
        nursery.cancel_scope.cancel()


async def put(client: H2Client, namespace: str) -> Response:
    request = kv_pb2.PutItemsRequest(namespace=namespace, id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    with trio.fail_after(5):
        return await client.call(PUT, frame(request.SerializeToString()))


async def get(client: H2Client, namespace: str) -> Response:
    request = kv_pb2.GetItemsRequest(namespace=namespace, id="r")
    with trio.fail_after(5):
        return await client.call(GET, frame(request.SerializeToString()))


async def test_a_call_naming_another_abstractions_namespace_fails_where_it_lands(
    nodes: tuple[Node, Node, Node],
) -> None:
    a, b, _ = nodes
    await a.install(routes(1, {"events": ("b", "timeseries"), "kv": ("b", "keyvalue")}, a, b))
    # b's bus is not running: a call forwarded there would hang, not fail.
    async with running(a), client_of(a) as client:
        r = await get(client, "events")
        assert (r.status, r.message) == (
            StatusCode.FAILED_PRECONDITION,
            "namespace 'events' is a timeseries namespace, not keyvalue",
        )
        request = timeseries_pb2.ReadEventsRequest(namespace="kv", series_id="s")
        with trio.fail_after(5):
            r = await client.call(READ, frame(request.SerializeToString()))
        assert (r.status, r.message) == (
            StatusCode.FAILED_PRECONDITION,
            "namespace 'kv' is a keyvalue namespace, not timeseries",
        )
        r = await get(client, "nope")
        assert (r.status, r.message) == (StatusCode.NOT_FOUND, "unknown namespace 'nope'")


async def test_a_call_for_another_tenants_namespace_is_answered_by_its_worker(
    nodes: tuple[Node, Node, Node],
) -> None:
    a, b, _ = nodes
    table = routes(1, {"kv": ("b", "keyvalue")}, a, b)
    await a.install(table)
    await b.install(table)
    async with running(a, b), client_of(a) as client:
        assert (await put(client, "kv")).status == 0
        r = await get(client, "kv")
        assert r.status == 0
        [item] = kv_pb2.GetItemsResponse.FromString(r.messages()[0]).items
        assert (item.key, item.value) == (b"k", b"v")
        assert "kv" in b.app.namespaces.keyvalue and "kv" not in a.app.namespaces.by_name
    assert b.observed == [("KeyValue/PutItems", StatusCode.OK), ("KeyValue/GetItems", StatusCode.OK)]


async def test_a_moved_answer_refreshes_the_table_and_the_call_is_tried_once_more(
    nodes: tuple[Node, Node, Node],
) -> None:
    a, b, _ = nodes
    # A's table still gives kv to tenant b; the supervisor has moved it to
    # tenant a (b's table says so) and publishes that to A meanwhile.
    await a.install(routes(1, {"kv": ("b", "keyvalue")}, a, b))
    await b.install(routes(2, {"kv": ("a", "keyvalue")}, a, b))
    a.published_meanwhile = routes(2, {"kv": ("a", "keyvalue")}, a, b)
    async with running(a, b), client_of(a) as client:
        assert (await put(client, "kv")).status == 0
        assert a.refreshes == 1
        assert b.observed == [("KeyValue/PutItems", StatusCode.UNAVAILABLE)]  # the moved answer
        # The retry ran here, on the namespace A has opened since.
        r = await get(client, "kv")
        assert r.status == 0 and len(kv_pb2.GetItemsResponse.FromString(r.messages()[0]).items) == 1
    assert b.observed == [("KeyValue/PutItems", StatusCode.UNAVAILABLE)]


async def test_a_second_moved_answer_reaches_the_client(nodes: tuple[Node, Node, Node]) -> None:
    a, b, _ = nodes
    await a.install(routes(1, {"kv": ("b", "keyvalue")}, a, b))  # and stays so
    await b.install(routes(2, {"kv": ("a", "keyvalue")}, a, b))
    async with running(a, b), client_of(a) as client:
        r = await put(client, "kv")
    assert (r.status, r.message) == (
        StatusCode.UNAVAILABLE,
        "namespace moved while the call was forwarded: 'kv'; retry",
    )
    assert a.refreshes == 1  # once, not in a loop
    assert b.observed == [("KeyValue/PutItems", StatusCode.UNAVAILABLE)] * 2


async def test_a_forwarded_call_is_never_forwarded_again(nodes: tuple[Node, Node, Node]) -> None:
    a, b, c = nodes
    await a.install(routes(1, {"kv": ("b", "keyvalue")}, a, b, c))
    await c.install(routes(2, {"kv": ("c", "keyvalue")}, a, b, c))
    # B has applied a table in which kv is nobody's it knows; its buffer
    # already holds a newer one that gives kv to tenant c.
    await b.install(routes(1, {"kv": ("x", "keyvalue")}, a, b, c))
    b.table.publish(routes(2, {"kv": ("c", "keyvalue")}, a, b, c))
    async with running(a, b, c), client_of(a) as client:
        r = await put(client, "kv")
    assert (r.status, r.message) == (
        StatusCode.UNAVAILABLE,
        "namespace moved while the call was forwarded: 'kv'; retry",
    )
    assert b.refreshes == 1  # B first made sure its own table was current
    assert b.observed == [("KeyValue/PutItems", StatusCode.UNAVAILABLE)] * 2
    assert c.observed == []  # B sent nothing on to C


def forwarded(path: str, request: bytes, timeout_s: float | None) -> ForwardCall:
    return ForwardCall(7, "ipc:///unused", path.encode(), request, [], timeout_s)


async def test_a_forwarded_call_is_served_with_the_same_error_boundary(
    nodes: tuple[Node, Node, Node],
) -> None:
    a, _, _ = nodes
    await a.install(routes(1, {"kv": ("a", "keyvalue")}, a))
    no_id = kv_pb2.PutItemsRequest(namespace="kv").SerializeToString()
    answer = await a.remote.serve(forwarded(PUT, no_id, None))
    assert (answer.id, answer.status, answer.message, answer.moved) == (
        7,
        StatusCode.INVALID_ARGUMENT,
        "id must not be empty",
        False,
    )
    answer = await a.remote.serve(forwarded(PUT, b"\xff\xff", None))
    assert answer.status == StatusCode.INVALID_ARGUMENT
    for path in ("/prism.pubsub.v1.PubSub/Subscribe", "/no.Such/Method"):
        answer = await a.remote.serve(forwarded(path, b"", None))
        assert (answer.status, answer.message) == (StatusCode.UNIMPLEMENTED, "method cannot be forwarded")
    assert a.observed == [("KeyValue/PutItems", StatusCode.INVALID_ARGUMENT)] * 2
    await a.app.aclose()


async def test_a_forwarded_call_waits_for_its_namespace_to_open_within_its_deadline(
    nodes: tuple[Node, Node, Node], autojump_clock: trio.testing.MockClock
) -> None:
    a, _, _ = nodes
    # The table gives kv to A, but its backend cannot open (yet).
    table = routes(1, {"kv": ("a", "keyvalue")}, a)
    broken = NamespaceEntry("kv", "a", "keyvalue", "no-such-backend")
    await a.install(Routes(generation=1, namespaces={"kv": broken}, workers=table.workers))
    request = kv_pb2.GetItemsRequest(namespace="kv", id="r").SerializeToString()

    start = trio.current_time()
    answer = await a.remote.serve(forwarded(GET, request, 1.0))
    assert (answer.status, answer.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    assert trio.current_time() - start == pytest.approx(1.0)

    start = trio.current_time()
    answer = await a.remote.serve(forwarded(GET, request, None))
    assert (answer.status, answer.message) == (
        StatusCode.UNAVAILABLE,
        "namespace 'kv' is being opened; retry",
    )
    assert trio.current_time() - start == pytest.approx(OPEN_WAIT_S, abs=0.01)
    assert a.observed == [
        ("KeyValue/GetItems", StatusCode.DEADLINE_EXCEEDED),
        ("KeyValue/GetItems", StatusCode.UNAVAILABLE),
    ]
    await a.app.aclose()


async def test_a_forwarded_call_whose_deadline_passed_is_not_run(nodes: tuple[Node, Node, Node]) -> None:
    a, _, _ = nodes
    await a.install(routes(1, {"kv": ("a", "keyvalue")}, a))
    put = kv_pb2.PutItemsRequest(namespace="kv", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
    # 0 s left (it was once read as "no deadline"), and a nanosecond.
    for timeout_s in (0.0, 1e-9):
        answer = await a.remote.serve(forwarded(PUT, put.SerializeToString(), timeout_s))
        assert (answer.status, answer.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    get = kv_pb2.GetItemsRequest(namespace="kv", id="r").SerializeToString()
    answer = await a.remote.serve(forwarded(GET, get, None))
    assert answer.status == 0
    assert not kv_pb2.GetItemsResponse.FromString(answer.payload).items  # nothing was written
    answer = await a.remote.serve(forwarded(GET, get, 1e-9))
    assert answer.status == StatusCode.DEADLINE_EXCEEDED
    await a.app.aclose()


async def test_tenant_of_names_the_tenant_a_subscriber_must_reach(nodes: tuple[Node, Node, Node]) -> None:
    a, b, _ = nodes
    table = routes(1, {"topics": ("b", "pubsub"), "kv": ("b", "keyvalue"), "mine": ("a", "pubsub")}, a, b)
    a.table.publish(table)  # published, not yet applied: "mine" is not open here
    forwarding: Forwarding = a.remote
    assert forwarding.tenant_of("topics") == "b"
    assert forwarding.tenant_of("nope") is None
    with pytest.raises(FailedPrecondition, match="'kv' is a keyvalue namespace, not pubsub"):
        forwarding.tenant_of("kv")
    with pytest.raises(Unavailable, match="'mine' is being opened"):
        forwarding.tenant_of("mine")


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_a_forwarded_call_runs_no_task_on_the_worker_it_reached(nodes: tuple[Node, Node, Node]) -> None:
    # The front worker sends the call from its reader's step and answers it
    # when the owner's answer comes (Calls._forward_now): the only task per
    # call is the owner's, which runs the handler. (Was two: a task on each side.)
    a, b, _ = nodes
    table = routes(1, {"kv": ("b", "keyvalue")}, a, b)
    await a.install(table)
    await b.install(table)
    async with running(a, b), client_of(a) as client:
        assert (await put(client, "kv")).status == 0  # the first call dials the owner
        spawns = _Spawns()
        trio.lowlevel.add_instrument(spawns)
        try:
            for _ in range(10):
                assert (await put(client, "kv")).status == 0
        finally:
            trio.lowlevel.remove_instrument(spawns)
    assert spawns.spawned == 10
    # Observed (metrics) where the client is, as before: the first call and the ten.
    assert a.observed == [("KeyValue/PutItems", StatusCode.OK)] * 11


async def test_a_forwarded_call_past_its_deadline_is_deadline_exceeded_where_it_landed(
    nodes: tuple[Node, Node, Node], autojump_clock: trio.testing.MockClock
) -> None:
    a, b, _ = nodes
    table = routes(1, {"kv": ("b", "keyvalue")}, a, b)
    await a.install(table)
    await b.install(table)

    async def hang(request: object) -> object:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    b.remote.bus._handle = hang  # type: ignore[assignment]
    async with running(a, b), client_of(a) as client:
        request = kv_pb2.PutItemsRequest(namespace="kv", id="r", items=[kv_pb2.Item(key=b"k", value=b"v")])
        start = trio.current_time()
        sid = await client.start_call(PUT, frame(request.SerializeToString()), extra=[("grpc-timeout", "2S")])
        r = await client.wait(sid)
        assert (r.status, r.message) == (StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        assert trio.current_time() - start == pytest.approx(2.0)


# -- a tenant whose workers are still starting --------------------------------------------------


class Caller:
    """A call that arrived on a connection of worker A (what ``forward`` reads)."""

    forwarded = False
    caller = None

    def __init__(self, deadline: float) -> None:
        self.metadata: list[tuple[str, str | bytes]] = []
        self.path = GET.encode()
        self.messages = [kv_pb2.GetItemsRequest(namespace="kv", id="r").SerializeToString()]
        self.deadline = deadline


def starting(nodes: tuple[Node, Node, Node], monkeypatch: pytest.MonkeyPatch) -> tuple[Node, list[object]]:
    """A holds nothing; kv belongs to B, whose worker is in the table but not
    serving yet. What A puts on its bus is recorded instead of sent."""
    a, b, _ = nodes
    sent: list[object] = []

    async def bus_forward(owners: list[WorkerEntry], *args: object) -> bytes:
        sent.append((trio.current_time(), [(w.id, w.serving) for w in owners]))
        return b"answer"

    monkeypatch.setattr(a.remote.bus, "forward", bus_forward)
    a.table.publish(
        Routes(
            1,
            {"kv": NamespaceEntry("kv", "b", "keyvalue", "memory")},
            {1: a.entry(), 2: b.entry(False)},
        )
    )
    return a, sent


async def test_a_call_for_a_tenant_still_starting_waits_for_its_worker(
    nodes: tuple[Node, Node, Node], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    a, sent = starting(nodes, monkeypatch)
    b = nodes[1]
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def b_serves_after_a_second() -> None:
            await trio.sleep(1.0)
            table = a.routes.current()
            a.table.publish(Routes(2, table.namespaces, {1: a.entry(), 2: b.entry(True)}))

        nursery.start_soon(b_serves_after_a_second)
        answer = await a.remote.forward("kv", Caller(math.inf))  # type: ignore[arg-type]

    assert answer == b"answer"
    [(when, owners)] = sent
    assert owners == [(2, True)]
    assert when - start == pytest.approx(1.0, abs=0.02)


async def test_the_wait_for_a_starting_tenant_is_bounded(
    nodes: tuple[Node, Node, Node], monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    a, sent = starting(nodes, monkeypatch)
    start = trio.current_time()
    with pytest.raises(Unavailable) as raised:
        await a.remote.forward("kv", Caller(math.inf))  # type: ignore[arg-type]
    assert str(raised.value) == "no worker of tenant 'b' is serving (waited 5 s); retry"
    assert trio.current_time() - start == pytest.approx(OWNER_WAIT_S)

    start = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await a.remote.forward("kv", Caller(start + 0.5))  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(0.5)
    assert sent == []
