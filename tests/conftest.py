"""Checks that apply to every tier: the services the selected tests need answer."""

from __future__ import annotations

import pytest

from tests.services import START_ALL, known


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "services(*names): the module needs these services (postgres, redis, nats) running"
    )


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    services = known()
    needed: dict[str, int] = {}
    for item in items:
        for mark in item.iter_markers("services"):
            for name in mark.args:
                if name not in services:
                    raise pytest.UsageError(f"{item.nodeid}: unknown service {name!r} in @services")
                needed[name] = needed.get(name, 0) + 1
    for name, count in sorted(needed.items()):
        service = services[name]
        if not service.answers():
            pytest.exit(
                f"{service.title} does not answer on {service.host}:{service.port}, and {count} selected "
                f"tests need it: start it with `{START_ALL}` (or: {service.start})",
                returncode=4,
            )
