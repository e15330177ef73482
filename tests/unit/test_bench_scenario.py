"""``prism bench`` scenario files: the shipped ones load, and each bad field is refused by name."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from prism.benchmark.scenario import load_scenario, parse_scenario
from prism.benchmark.serverconf import config_body
from prism.cli.main import main
from prism.config import load_config
from prism.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parents[2] / "bench" / "scenarios"

GOOD: dict[str, Any] = {
    "name": "t",
    "namespaces": [{"name": "bench", "backend": "memory"}],
    "workload": {"records": 10, "mix": {"get": 9, "put": 1}},
    "load": {"concurrency": [1, 8, 64, 128], "duration_s": 5, "warmup_s": 1},
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """GOOD with the value at dotted ``path`` replaced (a missing table is created)."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return data


def test_every_shipped_scenario_loads_and_covers_each_backend_and_abstraction() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    scenarios = [load_scenario(f) for f in files]
    pairs = {(s.namespace.abstraction, s.namespace.backend) for s in scenarios}
    assert {
        ("keyvalue", "memory"), ("keyvalue", "sqlite"), ("keyvalue", "postgres"), ("keyvalue", "redis"),
        ("timeseries", "sqlite"), ("pubsub", "memory"), ("pubsub", "nats"),
    } <= pairs  # fmt: skip
    assert {s.load.mode for s in scenarios} == {"closed", "open"}


def test_the_server_config_written_for_a_scenario_is_one_prism_serve_accepts(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIOS / "postgres-kv.toml")
    config = tmp_path / "prism.toml"
    config.write_text(config_body(scenario))
    loaded = load_config(str(config), {}, {})
    assert loaded.workers == 1
    assert loaded.namespaces == scenario.namespaces


def test_defaults_and_the_quick_ladder() -> None:
    scenario = parse_scenario(GOOD)
    assert scenario.namespace.name == "bench"
    assert scenario.workload.mix.weights() == {"get": 9, "put": 1}
    assert scenario.steps(quick=False) == (1, 8, 64, 128)
    assert scenario.steps(quick=True) == (1, 64, 128)  # first, middle (rounded), last
    assert scenario.durations(quick=True) == (0.3, 1.0)
    assert scenario.durations(quick=False) == (1, 5)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("name", "", "name: must not be empty"),
        ("colour", "red", "colour: unknown field"),
        ("namespaces", [], "namespaces: at least one namespace is required"),
        ("namespaces.0.backend", "mongo", "namespaces[0].backend:"),
        ("namespaces.0.abstraction", "graph", "namespaces[0].abstraction: unknown abstraction"),
        ("namespaces.0.options", {"nope": 1}, "namespaces[0].options.nope"),
        ("workload.namespace", "other", "workload.namespace: 'other' is not one of the namespaces"),
        ("workload.mix", {"get": 0}, "workload.mix: no operation has a weight > 0"),
        ("workload.mix", {"delete": 1}, "workload.mix.delete: unknown field"),
        ("workload.mix", {"get": -1}, "workload.mix.get: -1.0 must be a weight >= 0"),
        ("workload.mix", {"publish": 1}, "workload.mix.publish: is a pubsub operation"),
        ("workload.records", 0, "workload.records: 0 out of range"),
        ("workload.records", "many", "workload.records: expected int, got str"),
        ("workload.value_bytes", 1_000_000, "workload.value_bytes: 1000000 out of range"),
        ("workload.key_distribution", "pareto", "workload.key_distribution: 'pareto' is not one of"),
        ("workload.zipf_skew", 0, "workload.zipf_skew: 0.0 out of range"),
        ("workload.events_per_series", 0, "workload.events_per_series: 0 out of range"),
        ("workload.scan_limit", 5000, "workload.scan_limit: 5000 out of range"),
        ("load.mode", "burst", "load.mode: 'burst' is not one of closed, open"),
        ("load.concurrency", [], "load.concurrency: a closed-loop ladder needs at least one step"),
        ("load.concurrency", [8, 0], "load.concurrency[1]: 0 out of range"),
        ("load.rates", [100], 'load.rates: is for mode = "open"'),
        ("load.streams_per_connection", 0, "load.streams_per_connection: 0 out of range"),
        ("load.connections", 0, "load.connections: 0 out of range"),
        ("load.duration_s", 0, "load.duration_s: 0.0 out of range"),
        ("load.warmup_s", -1, "load.warmup_s: -1.0 out of range"),
        ("load.processes", -1, "load.processes: -1 out of range"),
        ("server.workers", 2, "server.workers: the memory backend holds data in one worker"),
        ("server.cpus", [], "server.cpus: must name at least one CPU"),
        ("server.load_cpus", [-1], "server.load_cpus: CPU numbers must be >= 0"),
        ("server.max_concurrent_streams", 0, "server.max_concurrent_streams: 0 out of range"),
        ("server.threads", 4, "server.threads: unknown field"),
    ],
)
def test_a_bad_field_is_refused_in_one_line_naming_it(path: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_scenario(with_change(path, value))
    text = str(refused.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_an_open_ladder_needs_rates_and_each_rate_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"^load\.rates: an open-loop ladder needs at least one rate"):
        parse_scenario(with_change("load.mode", "open"))
    data = with_change("load.mode", "open")
    data["load"].update(concurrency=[], rates=[100, 0])
    with pytest.raises(ConfigError, match=r"^load\.rates\[1\]: 0\.0 out of range"):
        parse_scenario(data)


def test_the_cli_refuses_a_bad_scenario_with_exit_2_and_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "x"\n[[namespaces]]\nname = "bench"\nbackend = "memory"\n[load]\nconcurrency = [0]\n'
    )
    assert main(["bench", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prism bench: {bad}: load.concurrency[0]: 0 out of range (1-100000)"]
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_file_that_is_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    assert main(["bench", str(bad)]) == 2
    assert "invalid TOML" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_shipped_scenarios_are_plain_toml() -> None:
    for path in SCENARIOS.glob("*.toml"):
        assert "name" in tomllib.loads(path.read_text())


def test_zipf_keys_come_from_at_most_a_million_records() -> None:
    data = with_change("workload.key_distribution", "zipf")
    data["workload"]["records"] = 1_000_001
    with pytest.raises(
        ConfigError, match=r"^workload\.records: 1000001: zipf keys are drawn from at most 1,000,000"
    ):
        parse_scenario(data)
    data["workload"]["records"] = 1_000_000
    assert parse_scenario(data).workload.records == 1_000_000
