"""Every built-in backend implements its abstraction's Protocol, signature and all.

The contract suites (tests/integration/test_*_contract.py) check what the
backends do, but they call most methods positionally: a backend that renamed
a parameter, gave it another default, or made a keyword-only one positional
would pass them and break a caller that passes it by keyword (the API layer
does, e.g. ``get_items(..., reverse=..., after=...)``). ``isinstance`` with a
runtime-checkable Protocol only looks at method names. So this compares the
signatures themselves, for every backend the registry builds (built from
default options: nothing connects).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from prism.backends import catalog, registry
from prism.backends.keyvalue import KeyValueBackend, Migratable
from prism.backends.pubsub import PubSubBackend
from prism.backends.timeseries import TimeSeriesBackend

PROTOCOLS: dict[str, type[Any]] = {
    "keyvalue": KeyValueBackend,
    "timeseries": TimeSeriesBackend,
    "pubsub": PubSubBackend,
}


def methods(protocol: type[Any]) -> list[str]:
    return [name for name, value in vars(protocol).items() if inspect.isfunction(value) and name[0] != "_"]


def parameters(function: Any) -> list[tuple[str, Any, Any]]:
    """(name, kind, default) of each parameter but ``self``."""
    listed = list(inspect.signature(function).parameters.values())[1:]
    return [(p.name, p.kind, p.default) for p in listed]


def differences(backend_type: type[Any], protocol: type[Any]) -> list[str]:
    found = []
    for name in methods(protocol):
        wanted = getattr(protocol, name)
        got = getattr(backend_type, name, None)
        if got is None:
            found.append(f"{name}: missing")
            continue
        if inspect.iscoroutinefunction(got) != inspect.iscoroutinefunction(wanted):
            found.append(f"{name}: async is {inspect.iscoroutinefunction(got)}, the Protocol's is not")
        if parameters(got) != parameters(wanted):
            found.append(f"{name}{inspect.signature(got)} != {name}{inspect.signature(wanted)}")
    return found


@pytest.mark.parametrize(("abstraction", "name"), sorted(catalog.OPTIONS))
def test_built_in_backend_has_its_protocols_signatures(abstraction: str, name: str, tmp_path: Path) -> None:
    backend = registry.create_any(abstraction, name, {}, data_dir=tmp_path, namespace="ns")
    assert differences(type(backend), PROTOCOLS[abstraction]) == []


@pytest.mark.parametrize("name", catalog.builtin("keyvalue"))
def test_every_keyvalue_backend_has_migratables_signatures(name: str, tmp_path: Path) -> None:
    # A live migration (prism/migrate) copies a namespace to or from any of them.
    backend = registry.create_any("keyvalue", name, {}, data_dir=tmp_path, namespace="ns")
    assert differences(type(backend), Migratable) == []


def test_a_drifted_signature_is_reported() -> None:
    # The check itself: a backend whose parameter was renamed, or whose
    # keyword-only parameter became positional, is caught.
    class Drifted:
        async def write_events(self, batch: Any, now_ms: int) -> None: ...

        async def read_events(  # reverse is positional here
            self, series_id: str, start_us: Any, end_us: Any, reverse: bool, *, after: Any,
            limit_items: int, limit_bytes: int, now_ms: int,
        ) -> Any: ...  # fmt: skip

        def open(self) -> None: ...

    found = differences(Drifted, TimeSeriesBackend)
    assert [line.split("(")[0].split(":")[0] for line in found] == [
        "write_events",
        "read_events",
        "open",
        "aclose",
    ]
