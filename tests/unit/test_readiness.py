"""Readiness (``prism.router.readiness``) and how ``Check("")`` follows it:
NOT_SERVING until every namespace has a serving worker of its tenant, and
Watch("") hears the flip."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing
from grpc_health.v1 import health_pb2

from prism.api import health
from prism.errors import Unavailable
from prism.router.readiness import Readiness, not_ready_reason
from prism.router.table import NamespaceEntry, Routes, WorkerEntry


def worker(wid: int, tenant: str, serving: bool = True) -> WorkerEntry:
    return WorkerEntry(wid, tenant, 100 + wid, f"ipc:///tmp/w{wid}", f"/tmp/w{wid}.sock", serving)


def table(*workers: WorkerEntry, generation: int = 1, namespaces: dict[str, str] | None = None) -> Routes:
    owned = {"profiles": "a", "ledger": "b", "audit": "b"} if namespaces is None else namespaces
    return Routes(
        generation=generation,
        namespaces={n: NamespaceEntry(n, t, "keyvalue", "sqlite") for n, t in owned.items()},
        workers={w.id: w for w in workers},
    )


def test_ready_when_every_namespaces_tenant_has_a_serving_worker() -> None:
    assert not_ready_reason(table(worker(1, "a"), worker(2, "b"), worker(3, "b", serving=False))) is None


def test_not_ready_names_the_tenants_still_starting() -> None:
    reason = not_ready_reason(table(worker(1, "a"), worker(2, "b", serving=False)))

    assert reason == "2 namespace(s) have no serving worker yet (tenant 'b')"


def test_a_tenant_without_workers_in_the_table_is_not_ready() -> None:
    assert not_ready_reason(table(worker(1, "a"))) == "2 namespace(s) have no serving worker yet (tenant 'b')"


def test_once_ready_a_tenant_restarting_does_not_make_it_unready() -> None:
    restarting = table(worker(1, "a"), worker(2, "b", serving=False))
    assert not_ready_reason(restarting) is not None  # at boot: not ready
    assert not_ready_reason(msgspec.structs.replace(restarting, ready_once=True)) is None
    # Once ready, still not ready with no worker serving at all.
    down = table(worker(1, "a", serving=False), worker(2, "b", serving=False))
    assert not_ready_reason(msgspec.structs.replace(down, ready_once=True)) == "0 of 2 workers serving"


def test_without_namespaces_one_serving_worker_is_ready() -> None:
    assert not_ready_reason(table(worker(1, "a", serving=False), namespaces={})) == "0 of 1 workers serving"
    assert not_ready_reason(table(worker(1, "a"), namespaces={})) is None
    assert not_ready_reason(table(namespaces={}, generation=3)) == "no workers in routing table generation 3"


def test_readiness_is_computed_once_per_generation() -> None:
    readiness = Readiness()
    not_yet = table(worker(1, "a"), worker(2, "b", serving=False), generation=1)
    ready = table(worker(1, "a"), worker(2, "b"), generation=2)

    assert readiness.reason(not_yet) is not None
    assert readiness.reason(ready) is None
    # Same generation, other content: the cached answer stands (a generation
    # is published once, so its content never changes).
    assert readiness.reason(table(worker(1, "a"), generation=2)) is None


async def test_check_of_the_server_follows_readiness_and_watch_hears_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    state = health.HealthState()
    service = health.Health(state)
    current = [table(worker(1, "a"), worker(2, "b", serving=False))]
    readiness = Readiness()
    state.follow(lambda: readiness.reason(current[0]))
    state.set("profiles", health.SERVING)
    request = health_pb2.HealthCheckRequest(service="")

    answer = await service.Check(request, None)  # type: ignore[arg-type]
    assert answer.status == health.NOT_SERVING
    listed = await service.List(health_pb2.HealthListRequest(), None)  # type: ignore[arg-type]
    assert listed.statuses[""].status == health.NOT_SERVING
    assert listed.statuses["profiles"].status == health.SERVING  # a namespace's own health stands

    seen: list[int] = []

    async def watch() -> None:
        with pytest.raises(Unavailable):  # the drain ends the stream
            async for response in service.Watch(request, None):  # type: ignore[arg-type]
                seen.append(response.status)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(1.0)
        assert seen == [health.NOT_SERVING]
        current[0] = table(worker(1, "a"), worker(2, "b"), generation=2)
        assert (await service.Check(request, None)).status == health.SERVING  # type: ignore[arg-type]
        state.poke()  # the worker does this when it reads a new generation
        await trio.sleep(1.0)
        assert seen == [health.NOT_SERVING, health.SERVING]

        state.enter_drain()  # draining wins over readiness
        await trio.sleep(1.0)
        assert seen == [health.NOT_SERVING, health.SERVING, health.NOT_SERVING]
        nursery.cancel_scope.cancel()
