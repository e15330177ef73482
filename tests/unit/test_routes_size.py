"""The routing table sized to the config, and a config too large for any table refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism import cli
from prism.config import load_config
from prism.errors import ConfigError
from prism.router.table import Routes, RoutingTableWriter, slot_capacity
from prism.workers import routes_size
from prism.workers.routes_size import (
    ROUTES_MIN_BYTES,
    check_routes_fit,
    namespace_entries,
    routes_bytes_for,
    table_payload_bytes,
)


def config_toml(tenants: int, per_tenant: int) -> str:
    parts = []
    for t in range(tenants):
        ns = ", ".join(f'{{ name = "n{t}_{i}", backend = "memory" }}' for i in range(per_tenant))
        parts.append(f'[[tenants]]\nname = "t{t}"\nworkers = 1\nnamespaces = [{ns}]\n')
    return "\n".join(parts)


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "prism.toml"
    path.write_text(text)
    return load_config(path, {}, {})


def test_a_small_config_gets_the_minimum_buffer(tmp_path: Path) -> None:
    assert routes_bytes_for(load(tmp_path, config_toml(1, 1)), cpus=2) == ROUTES_MIN_BYTES


def test_a_large_config_gets_a_buffer_its_table_fits_with_room_to_grow(tmp_path: Path) -> None:
    config = load(tmp_path, config_toml(20, 1000))  # 20,000 namespaces: over the minimum buffer
    size = routes_bytes_for(config, cpus=2)
    payload = table_payload_bytes(config, cpus=2)

    assert payload > slot_capacity(ROUTES_MIN_BYTES)
    assert slot_capacity(size) >= 4 * payload
    writer = RoutingTableWriter(bytearray(size))
    writer.publish(Routes(1, namespace_entries(config, 2), {}))  # fits: no RoutingTableTooLarge


def test_a_table_over_the_buffer_is_refused_with_one_line(tmp_path: Path) -> None:
    config = load(tmp_path, config_toml(2, 50))
    check_routes_fit(config, 2, 64 * 1024)  # fits

    refused = r"^tenants: 100 namespaces make a routing table of \d+ bytes; at most"
    with pytest.raises(ConfigError, match=refused):
        check_routes_fit(config, 2, 8 * 1024)


def test_serve_refuses_a_config_over_the_largest_table_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "prism.toml"
    path.write_text(config_toml(2, 100))
    monkeypatch.setattr(routes_size, "ROUTES_MAX_BYTES", 16 * 1024)  # so 200 namespaces are too many

    assert cli.main(["serve", "--config", str(path), "--data-dir", str(tmp_path / "d")]) == 2

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("prism: config error: tenants: 200 namespaces make a routing table of")
