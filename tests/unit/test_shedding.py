"""Adaptive shedding (``prism.limits.shed``): engaged by a standing queue (the
shortest wait of an interval above the target), released when the waits
fall back; and, on a served App, what a client sees while it sheds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from prometheus_client import REGISTRY

from prism.config import NamespaceConfig, ServerConfig
from prism.config.quotas import OverloadConfig
from prism.errors import StatusCode
from prism.limits import Shedder
from prism.workers.app import App

from .apps import serving_app
from .h2client import H2Client
from .test_quotas import PUSHBACK, put

CONFIG = OverloadConfig(enabled=True, target_delay_ms=5, interval_ms=100)


def test_a_burst_that_drains_is_not_shed() -> None:
    shedder = Shedder(CONFIG)
    assert not shedder.refuses(50, 0.0)
    # Long waits, but one call went straight through: the queue drained.
    for wait in (0.05, 0.0, 0.08):
        shedder.observe(wait)
    assert not shedder.refuses(50, 0.1)


def test_a_standing_queue_caps_the_calls_in_flight_until_the_waits_fall_back() -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)  # the first interval starts
    for _ in range(10):
        shedder.observe(0.02)  # every wait above 5 ms for a whole interval
    # 100 calls in flight when the interval ends: at most 90 from now on.
    assert shedder.refuses(100, 0.1)
    assert shedder.refuses(90, 0.12)
    assert not shedder.refuses(89, 0.13)
    # Still standing: another tenth off (of the 89 running when it ends): 80.
    shedder.observe(0.01)
    assert shedder.refuses(89, 0.2)
    assert not shedder.refuses(79, 0.21)
    assert shedder.refuses(80, 0.22)
    # The waits fall under the target: everything is served again.
    shedder.observe(0.001)
    assert not shedder.refuses(500, 0.31)


def test_an_interval_with_no_wait_at_all_or_a_stale_one_releases() -> None:
    shedder = Shedder(CONFIG)
    shedder.refuses(0, 0.0)
    shedder.observe(0.05)
    assert shedder.refuses(10, 0.1)
    assert not shedder.refuses(10, 0.2)  # nothing queued during the last interval
    shedder.observe(0.05)
    assert not shedder.refuses(10, 0.5)  # that interval ended long ago: says nothing now


def test_disabled_it_never_sheds() -> None:
    shedder = Shedder(OverloadConfig(enabled=False))
    shedder.refuses(0, 0.0)
    shedder.observe(1.0)
    assert not shedder.refuses(10**6, 0.2)


@asynccontextmanager
async def served(tmp_path: Path) -> AsyncIterator[tuple[App, H2Client]]:
    app = App(ServerConfig(data_dir=str(tmp_path / "data"), overload=CONFIG))
    app.settings.admission.shedder = Shedder(CONFIG)  # this test's own, not the process's
    await app.apply([NamespaceConfig("profiles", backend="memory")])
    async with serving_app(app) as client:
        yield app, client


async def test_under_injected_queueing_delay_new_calls_are_refused_fast_then_served_again(
    mock_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    before = REGISTRY.get_sample_value(
        "prism_calls_limited_total", {"namespace": "profiles", "reason": "overload"}
    )
    async with served(tmp_path) as (app, client):
        shedder = app.settings.admission.shedder
        assert (await put(client, "profiles")).status == StatusCode.OK
        mock_clock.jump(0.1)
        shedder.refuses(0, trio.current_time())  # an interval starts
        # A standing queue: every wait of the interval is 20 ms, with 10 calls running.
        for _ in range(5):
            mock_clock.jump(0.02)
            shedder.observe(0.02)
        app.settings.inflight = 10
        mock_clock.jump(0.01)
        r = await put(client, "profiles")
        assert (r.status, r.message, r.trailers.get(PUSHBACK, r.headers.get(PUSHBACK))) == (
            StatusCode.RESOURCE_EXHAUSTED,
            "worker overloaded: queueing delay above 5 ms; retry",
            "100",
        )
        after = REGISTRY.get_sample_value(
            "prism_calls_limited_total", {"namespace": "profiles", "reason": "overload"}
        )
        assert after == (before or 0.0) + 1
        # Under the cap (9 of the 10) a call is still admitted.
        app.settings.inflight = 8
        assert (await put(client, "profiles")).status == StatusCode.OK
        # The queue drained: the next interval serves everything.
        app.settings.inflight = 10
        shedder.observe(0.0)
        mock_clock.jump(0.1)
        assert (await put(client, "profiles")).status == StatusCode.OK
        app.settings.inflight = 0
