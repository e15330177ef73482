"""A namespace whose backend cannot be opened: NOT_SERVING, retried on a
capped, jittered backoff (``prism.workers.reopen``), serving once it opens.
At boot (``strict``) a remote backend that does not answer is waited for; a
local fault raises (the worker then halts the server with exit code 3).

Time is trio's MockClock: the backoff is checked in zero real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from prism.api import health
from prism.backends import registry
from prism.backends.keyvalue import KeyValueBackend
from prism.backends.memory.keyvalue import MemoryBackend
from prism.config import NamespaceConfig, ServerConfig
from prism.errors import ConfigError, Unavailable
from prism.workers.app import App
from prism.workers.reopen import FIRST_RETRY_S, MAX_RETRY_S, ReopenSchedule, retry_delay

# -- the schedule ---------------------------------------------------------------------------------


def test_delays_double_from_the_first_and_stop_at_the_cap() -> None:
    middle = [retry_delay(n, lambda: 0.5) for n in range(1, 10)]  # jitter factor 1.0

    assert middle == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert retry_delay(10_000, lambda: 0.5) == MAX_RETRY_S  # no overflow after a long outage


def test_jitter_spreads_each_delay_over_half_to_one_and_a_half_times() -> None:
    assert retry_delay(1, lambda: 0.0) == FIRST_RETRY_S * 0.5
    assert retry_delay(1, lambda: 0.999) == pytest.approx(FIRST_RETRY_S * 1.499)
    assert retry_delay(50, lambda: 0.999) == pytest.approx(MAX_RETRY_S * 1.499)


def test_schedule_tells_what_is_due_and_starts_again_after_forget() -> None:
    schedule = ReopenSchedule(rand=lambda: 0.5)
    assert schedule.next_due() is None

    assert schedule.failed("a", now=10.0) == 0.5
    assert schedule.failed("b", now=10.2) == 0.5
    assert schedule.failed("a", now=10.5) == 1.0  # second failure in a row
    assert schedule.next_due() == pytest.approx(10.7)
    assert schedule.due(10.6) == []
    assert schedule.due(11.5) == ["b", "a"]  # earliest first

    schedule.forget("a")
    assert schedule.due(100.0) == ["b"]
    assert schedule.failed("a", now=100.0) == 0.5  # from the first delay again


# -- App, with a backend that does not answer until told to --------------------------------------


class Outage:
    """The state of the fake remote backend "flaky": down until ``up``."""

    def __init__(self) -> None:
        self.up = False
        self.attempts: list[float] = []


OUTAGE = Outage()


class FlakyBackend(MemoryBackend):
    async def open(self) -> None:
        OUTAGE.attempts.append(trio.current_time())
        if not OUTAGE.up:
            raise Unavailable("flaky: cannot connect to 127.0.0.1:1: connection refused")


def _flaky(options: Mapping[str, object], *, data_dir: Path, namespace: str) -> KeyValueBackend:
    return FlakyBackend()


@pytest.fixture(autouse=True)
def flaky_backend() -> Iterator[None]:
    global OUTAGE
    OUTAGE = Outage()
    registry.register("flaky", _flaky, replace=True)
    yield
    registry._factories.pop("flaky", None)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    app = App(ServerConfig(data_dir=str(tmp_path)))
    yield app
    await app.aclose()


FLAKY = NamespaceConfig(name="remote", backend="flaky")
LOCAL = NamespaceConfig(name="local", backend="memory")


async def test_boot_with_a_remote_backend_down_serves_the_rest(app: App) -> None:
    failed = await app.apply([FLAKY, LOCAL], strict=True)

    assert failed == ["remote"]
    assert app.holds("local") and app.health.get("local") == health.SERVING
    assert not app.holds("remote") and app.health.get("remote") == health.NOT_SERVING
    assert app.unreachable("remote") == "flaky: cannot connect to 127.0.0.1:1: connection refused"
    assert app.unreachable("local") is None


async def test_boot_halts_on_a_local_fault(app: App, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    bad_file = NamespaceConfig(name="s", backend="sqlite", options={"path": str(tmp_path / "file" / "x.db")})
    with pytest.raises(OSError):
        await app.apply([bad_file], strict=True)

    bad_option = NamespaceConfig(name="m", backend="memory", options={"nope": 1})
    with pytest.raises(ConfigError):
        await app.apply([bad_option], strict=True)


async def test_a_local_backend_saying_unavailable_still_halts_at_boot(
    app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def unavailable(self: MemoryBackend) -> None:
        raise Unavailable("memory: no")

    monkeypatch.setattr(MemoryBackend, "open", unavailable)
    with pytest.raises(Unavailable):
        await app.apply([LOCAL], strict=True)


async def test_retries_back_off_and_the_namespace_serves_once_the_backend_answers(
    app: App, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app._reopen, "_rand", lambda: 0.5)  # jitter factor 1: exact delays
    start = trio.current_time()
    assert await app.apply([FLAKY, LOCAL], strict=True) == ["remote"]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.keep_reopening)
        await trio.sleep(40.0)
        gaps = [b - a for a, b in zip([start, *OUTAGE.attempts], OUTAGE.attempts, strict=False)][1:]
        assert gaps == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])  # 31.5 s; next at 61.5
        assert app.health.get("remote") == health.NOT_SERVING

        OUTAGE.up = True
        await trio.sleep(61.5 - 40.0 - 0.01)
        assert not app.holds("remote")  # not before its turn
        await trio.sleep(0.02)
        assert app.holds("remote") and app.health.get("remote") == health.SERVING
        assert app.unreachable("remote") is None
        attempts = len(OUTAGE.attempts)
        await trio.sleep(120.0)
        assert len(OUTAGE.attempts) == attempts  # open: no more attempts
        nursery.cancel_scope.cancel()


async def test_jitter_keeps_every_retry_within_its_bounds(
    app: App, autojump_clock: trio.testing.MockClock
) -> None:
    await app.apply([FLAKY], strict=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.keep_reopening)
        await trio.sleep(300.0)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(OUTAGE.attempts, OUTAGE.attempts[1:], strict=False)]
    assert len(gaps) >= 8
    for n, gap in enumerate(gaps, start=1):
        base = min(FIRST_RETRY_S * 2 ** (n - 1), MAX_RETRY_S)
        assert 0.5 * base <= gap < 1.5 * base + 1e-6, (n, gap)


async def test_a_namespace_removed_while_down_is_no_longer_retried(
    app: App, autojump_clock: trio.testing.MockClock
) -> None:
    await app.apply([FLAKY, LOCAL], strict=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.keep_reopening)
        await trio.sleep(5.0)
        await app.apply([LOCAL])  # a reload dropped it
        attempts = len(OUTAGE.attempts)
        assert app.health.get("remote") is None
        await trio.sleep(120.0)
        assert len(OUTAGE.attempts) == attempts
        nursery.cancel_scope.cancel()


async def test_a_failure_after_boot_is_retried_on_the_same_schedule(
    app: App, autojump_clock: trio.testing.MockClock
) -> None:
    await app.apply([LOCAL], strict=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.keep_reopening)
        await trio.sleep(1.0)
        assert await app.apply([LOCAL, FLAKY]) == ["remote"]  # a reload added it
        OUTAGE.up = True
        await trio.sleep(FIRST_RETRY_S * 1.5)  # the first retry wakes the sleeping loop
        assert app.holds("remote")
        nursery.cancel_scope.cancel()


async def test_a_retry_that_opens_after_a_reload_dropped_the_namespace_is_closed(
    app: App, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = trio.Event()
    closed: list[bool] = []

    async def slow_open(self: FlakyBackend) -> None:
        OUTAGE.attempts.append(trio.current_time())
        if len(OUTAGE.attempts) == 1:
            raise Unavailable("flaky: down")
        await gate.wait()  # the retry: answers only after the reload

    async def aclose(self: FlakyBackend) -> None:
        closed.append(True)

    monkeypatch.setattr(FlakyBackend, "open", slow_open)
    monkeypatch.setattr(FlakyBackend, "aclose", aclose)
    await app.apply([FLAKY, LOCAL], strict=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.keep_reopening)
        await trio.sleep(5.0)
        assert len(OUTAGE.attempts) == 2  # the retry is in flight
        await app.apply([LOCAL])  # a reload dropped the namespace meanwhile
        gate.set()
        await trio.sleep(1.0)
        assert not app.holds("remote") and app.health.get("remote") is None
        assert closed == [True]
        await trio.sleep(120.0)
        assert len(OUTAGE.attempts) == 2  # and it is not tried again
        nursery.cancel_scope.cancel()
