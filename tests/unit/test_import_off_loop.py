"""A backend's lazy import runs in a thread, not on the event loop.

The first namespace of a kind added to a serving worker (a reload, a
migration's target) imported its backend on the loop: PostgreSQL's took
~85 ms, and a migration's start stopped the worker's loop for 107-135 ms.
"""

from __future__ import annotations

import importlib
import sys
import threading
from typing import Any

import pytest
import trio

from prism.backends import registry


def test_every_lazy_module_is_what_its_factory_imports() -> None:
    factories: dict[str, Any] = {
        "keyvalue": registry._factories,
        "timeseries": registry._timeseries,
        "pubsub": registry._pubsub,
    }
    for (abstraction, name), module in registry.LAZY_MODULES.items():
        factory = factories[abstraction][name]
        assert module in factory.__code__.co_names, (abstraction, name)  # its ``from module import``
        assert importlib.import_module(module)


async def test_a_backend_not_yet_imported_is_imported_in_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if psycopg's backend had never been imported here: its import runs
    # off the loop's thread, and the loop takes turns meanwhile.
    module = registry.LAZY_MODULES[("keyvalue", "postgres")]
    monkeypatch.delitem(sys.modules, module, raising=False)
    loop_thread = threading.get_ident()
    imported_in: list[int] = []
    real = importlib.import_module
    turns = 0

    def importing(name: str, *args: Any) -> Any:
        imported_in.append(threading.get_ident())
        return real(name, *args)

    async def turning() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.sleep(0)

    monkeypatch.setattr(importlib, "import_module", importing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turning)
        await registry.import_off_loop("keyvalue", "postgres")
        nursery.cancel_scope.cancel()
    assert module in sys.modules
    assert imported_in and loop_thread not in imported_in
    assert turns > 0


async def test_an_imported_or_eager_backend_costs_no_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_thread(*args: Any, **kw: Any) -> Any:
        raise AssertionError("no thread should be started")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    importlib.import_module(registry.LAZY_MODULES[("keyvalue", "sqlite")])
    await registry.import_off_loop("keyvalue", "sqlite")  # imported already
    await registry.import_off_loop("keyvalue", "memory")  # imported with the registry
    await registry.import_off_loop("keyvalue", "some-plugin")  # a plugin's factory imports what it needs
