"""The overload door counts calls queued for the worker, not streams left open.

A PubSub subscription is a call whose task lives as long as the stream,
waiting for messages: it holds no place in any queue. Counted among the
calls in flight, 50 open subscriptions made a fresh call look 50 calls
deep the moment the door shut (``prism.limits.shed``: the calls ahead of a
new one, each with its CPU to spend), so every new call was refused, and,
each counted late, kept the door shut for as long as the subscriptions
stayed open.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from prism.config import NamespaceConfig, ServerConfig
from prism.errors import StatusCode
from prism.limits import Shedder, shed
from prism.proto import pubsub_pb2
from prism.workers.app import App

from .apps import serving_app
from .h2client import frame
from .test_quotas import put
from .test_shedding import CONFIG, standing_queue_before_handlers

SUBSCRIBE = "/prism.pubsub.v1.PubSub/Subscribe"


async def test_with_the_door_shut_open_subscriptions_do_not_keep_a_fresh_call_out(
    mock_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (No floor under the calls ahead: counted, 50 subscriptions are fewer
    # than AHEAD_FLOOR, and would not keep a call out. The floor has its own
    # test: test_shedding.)
    monkeypatch.setattr(shed, "AHEAD_FLOOR", 0)
    app = App(ServerConfig(data_dir=str(tmp_path / "data"), overload=CONFIG))
    app.settings.admission.shedder = shedder = Shedder(CONFIG)
    await app.apply(
        [
            NamespaceConfig("profiles", backend="memory"),
            NamespaceConfig("topics", abstraction="pubsub", backend="memory"),
        ]
    )
    async with serving_app(app) as client:
        body = frame(pubsub_pb2.SubscribeRequest(namespace="topics", topic="t").SerializeToString())
        subscriptions = [await client.start_call(SUBSCRIBE, body) for _ in range(50)]
        await trio.testing.wait_all_tasks_blocked()
        assert app.settings.inflight == 50  # their handlers wait for messages
        standing_queue_before_handlers(mock_clock, shedder)
        shedder.refuses(0, trio.current_time())  # the decision: the door shuts
        assert shedder.shut
        shedder.call_s = 0.001  # each call admitted lately cost 1 ms of CPU
        r = await put(client, "profiles")
        assert (r.status, r.message) == (StatusCode.OK, "")
        # Calls running are counted: ten, each with 1 ms to spend, are 10 ms
        # ahead of a new one (the target is 5 ms).
        app.settings.inflight += 10
        try:
            r = await put(client, "profiles")
            assert (r.status, r.message) == (
                StatusCode.RESOURCE_EXHAUSTED,
                "worker overloaded: queueing delay above 5 ms; retry",
            )
        finally:
            app.settings.inflight -= 10
        assert all(not client.responses[sid].ended for sid in subscriptions)  # still open
