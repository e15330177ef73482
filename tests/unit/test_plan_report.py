"""``prism plan``'s predictions and how it shows them: the hit rate and the saturation
per worker by hand, the p99 column from a bench ladder (or "-" and why), ``--json``,
the costs it takes (``--bench`` files, the built-in ones said in one line) and its
refusals of bad inputs, the cache table it sizes, the quick bench's scenarios."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest

from prism.benchmark import results
from prism.benchmark.results import Backend, Latency, Machine, Results, ServerSetup, Step, saturation
from prism.benchmark.scenario import parse_scenario
from prism.cli.main import main
from prism.config import load_config
from prism.errors import ConfigError
from prism.plan.model import CACHE_RECORDS, CACHE_TTL_S, VERSION_WORDS, hit_rate, p99_at
from prism.plan.needs import Need
from prism.plan.quick import Calibration, calibrations_for, scenario_toml

NEED = '[[needs]]\nnamespace = "a"\nread_rps = {r}\nwrite_rps = {w}\nitem_bytes = 20000\n'


def test_the_hit_rate_by_hand() -> None:
    # Many writes per record within the TTL: about R / (R + W).
    assert hit_rate(9000, 1000, 100) == pytest.approx(0.9, abs=0.002)
    # No writes: a record read r times a second hits r T / (1 + r T).
    r = 10 / 1000
    assert hit_rate(10, 0, 1000) == pytest.approx(r * CACHE_TTL_S / (1 + r * CACHE_TTL_S))
    # More records than the cache holds: only its share can hit.
    records = 4 * CACHE_RECORDS
    r, w = 1e6 / records, 1e5 / records * (1 + (records - 1) / VERSION_WORDS)
    life = -math.expm1(-w * CACHE_TTL_S) / w
    assert hit_rate(1e6, 1e5, records) == pytest.approx(0.25 * r * life / (1 + r * life))
    assert hit_rate(1000, 0, 0) == 0.0  # records not declared: no hits assumed


def test_the_p99_at_a_utilisation_is_interpolated_or_the_nearest_step() -> None:
    ladder = ((0.5, 2_000.0), (0.8, 8_000.0), (0.95, 30_000.0))
    assert p99_at(ladder, 0.65) == (pytest.approx(5_000.0), "interpolated")
    # In ladder order: a later step that other load held back is not bracketed first.
    noisy = ((0.4, 10_000.0), (0.6, 20_000.0), (0.5, 300_000.0))
    assert p99_at(noisy, 0.45) == (pytest.approx(12_500.0), "interpolated")
    assert p99_at(ladder, 0.3) == (2_000.0, "nearest")
    assert p99_at(ladder, 0.99) == (30_000.0, "nearest")
    assert p99_at((), 0.5) is None


def _step(index: int, busy: float, cpu_us: float, p99: float) -> Step:
    lat = Latency(p50_us=p99 / 4, p90_us=p99 / 2, p99_us=p99, p999_us=p99, mean_us=p99 / 3, max_us=p99)
    calls_per_s = busy / 100 * 1e6 / cpu_us
    return Step(
        index=index, mode="closed", concurrency=8 * 4**index, offered_calls_per_s=None, connections=1,
        streams_per_connection=8, load_generator="builtin", warmup_s=1.0, duration_s=4.0,
        calls=int(calls_per_s * 4), calls_per_s=calls_per_s, errors={}, error_calls_per_s=0.0, latency=lat,
        operations={}, cpu_us_per_call={"worker0:default@cpu0": cpu_us, "total": cpu_us},
        cpu_pct={"worker0:default@cpu0": busy}, loadgen_cpu_us_per_call=10.0, other_on_server_cpus_pct=0.0,
        backend=Backend(0, 0, None, {}, 0, {}), open_loop_backlog_max=None, complete=True,
    )  # fmt: skip


def bench_file(
    path: Path,
    backend: str,
    op: str | dict[str, float],
    ladder: list[tuple[float, float, float]],
    hit: float | None = None,
) -> Path:
    """A results.json of one operation (or a mix) on ``backend``: steps of (busy %, worker CPU
    us per call, p99 us); with ``hit``, on a namespace with the cache, at that hit ratio."""
    steps = [_step(i, *s) for i, s in enumerate(ladder)]
    namespace: dict[str, object] = {"name": "b", "backend": backend}
    if hit is not None:
        namespace["cache"] = {"enabled": True}
        for s in steps:
            assert s.backend is not None
            s.backend.cache_hit_ratio = hit
    run = Results(
        schema_version=results.SCHEMA_VERSION, kind=results.KIND, outcome="ok", failure=None,
        started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:01:00+00:00",
        scenario_file="s.toml", quick=False,
        scenario={"name": "s", "namespaces": [namespace],
                  "workload": {"mix": op if isinstance(op, dict) else {op: 1}}},
        server=ServerSetup(True, "127.0.0.1:1", 1, [0], [1], 1),
        machine=Machine("cpu", 2, "6", "3.11", "0.1.0", "upb", {}, None, {}),
        steps=steps, saturation=saturation(steps), warnings=[],
    )  # fmt: skip
    results.write(path, run)
    return path


def plan(tmp_path: Path, *args: str, r: float = 3000, w: float = 0) -> int:
    needs = tmp_path / "needs.toml"
    needs.write_text(NEED.format(r=r, w=w))
    return main(["plan", str(needs), "--cpus", "4", "--out", str(tmp_path / "prism.toml"), *args])


def test_json_has_the_predicted_saturation_and_the_p99_the_bench_measured_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite gets: 100 us per call at saturation; p99 2 ms at 40% busy, 10 ms at 80%.
    costs = bench_file(
        tmp_path / "get.json", "sqlite", "get", [(40, 120, 2000), (80, 100, 10000), (99, 100, 40000)]
    )
    assert plan(tmp_path, "--bench", str(costs), "--json", "-", r=5000) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    (ns,) = doc["namespaces"]
    # 20,000-byte values: 100 us + 0.25 us per KiB over the 512 B measured.
    per_call = 100 + 0.25 * (20000 - 512) / 1024
    assert ns["backend"] == "sqlite" and not ns["cached"]  # too large a value for the cache
    assert ns["saturation_rps_per_worker"] == pytest.approx(1e6 / per_call, abs=0.1)
    (tenant,) = doc["tenants"]
    u = 5000 * per_call / 1e6
    assert tenant["utilisation"] == pytest.approx(u, abs=1e-4) and tenant["workers"] == 1
    assert tenant["p99_method"] == "interpolated"
    assert tenant["p99_us"] == pytest.approx(2000 + (u - 0.4) / 0.4 * 8000, abs=1)
    assert doc["fits"] and doc["costs"]["source"] == str(costs)
    # The table went to stderr, with the p99 in ms.
    assert "sat/worker" in err and f"{tenant['p99_us'] / 1000:.1f}" in err
    load_config(str(tmp_path / "prism.toml"), {}, {})


def test_without_a_ladder_the_p99_is_a_dash_and_a_footnote_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert plan(tmp_path, "--json", str(tmp_path / "plan.json")) == 0
    out, err = capsys.readouterr()
    # Not on a terminal, no --bench-quick: the built-in costs, said in one line with how to measure.
    assert err.count("\n") == 1 and "using the built-in costs" in err and "--bench-quick" in err
    rows = [line for line in out.splitlines() if line.startswith("a ")]
    assert rows and rows[0].split()[-2] == "-"
    assert "p99 -: no latency ladder for sqlite get: the built-in costs have none" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["tenants"][0]["p99_us"] is None and doc["tenants"][0]["p99_method"] is None


def test_bad_inputs_are_one_line_and_exit_2_writing_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reads = bench_file(tmp_path / "get.json", "sqlite", "get", [(90, 100, 1000)])
    (tmp_path / "adir").mkdir()
    cases = {
        ("--json", str(tmp_path / "adir")): "give a file to write",
        ("--json", str(tmp_path / "no" / "plan.json")): "no such directory",
        ("--json", str(tmp_path / "prism.toml")): "is --out, the config",
        ("--bench", str(tmp_path / "missing.json")): "cannot read",
        ("--bench", str(reads), "--bench-quick"): "give one",
    }
    for args, message in cases.items():
        assert plan(tmp_path, *args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    # A bench file without an operation the need sends: named.
    assert plan(tmp_path, "--bench", str(reads), w=500) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no figures for sqlite put" in err and str(reads) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "get.json", "needs.toml"]


def test_a_backend_the_bench_files_lack_is_left_out_and_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reads = bench_file(tmp_path / "get.json", "sqlite", "get", [(90, 100, 1000)])
    assert plan(tmp_path, "--bench", str(reads), "--postgres", "postgresql://127.0.0.1/x") == 0
    out = capsys.readouterr().out
    assert "not considered (no figures in the costs): postgres get" in out


def test_the_plan_sizes_the_shared_cache_when_it_pays(tmp_path: Path) -> None:
    needs = tmp_path / "needs.toml"
    needs.write_text(
        '[[needs]]\nnamespace = "hot"\nread_rps = 9000\nwrite_rps = 100\nrecords = 50000\n'
        '[[needs]]\nnamespace = "cold"\nread_rps = 900\nwrite_rps = 100\nrecords = 50000000\n'
    )
    out = tmp_path / "prism.toml"
    assert (
        main(["plan", str(needs), "--cpus", "8", "--out", str(out), "--json", str(tmp_path / "p.json")]) == 0
    )
    doc = json.loads((tmp_path / "p.json").read_text())
    cached = {ns["namespace"]: (ns["cached"], ns["hit_rate"]) for ns in doc["namespaces"]}
    assert cached["hot"][0] and cached["hot"][1] > 0.8
    assert cached["cold"] == (False, 0.0)  # uniform keys over 50 M records: misses cost more than hits save
    config = load_config(str(out), {}, {})
    # 50,000 records twice over, in slots that hold a 512-byte answer: over the default 16,384.
    assert config.cache.slot_bytes == 1024 and config.cache.total_bytes == 100_000 * 1024
    assert doc["cache_table"] == {"total_bytes": 100_000 * 1024, "slot_bytes": 1024}


def test_the_quick_bench_runs_what_the_needs_can_use() -> None:
    needs = [
        Need("kv", read_rps=900, write_rps=100, records=1000),
        Need("ts", "timeseries", write_rps=10),
        Need("bus", "pubsub", write_rps=10, durability="cache"),  # no scenario: built-in costs
    ]
    runs = calibrations_for(needs, {"postgres": "postgresql://127.0.0.1/x"})
    assert [r.key for r in runs] == [
        ("sqlite", "get"), ("sqlite", "put"), ("sqlite", "get+put"), ("cache", "get"),
        ("sqlite", "get+cache"), ("sqlite", "put+cache"), ("postgres", "get"), ("postgres", "put"),
        ("postgres", "get+put"), ("postgres", "get+cache"), ("postgres", "put+cache"),
        ("sqlite", "write_events"), ("postgres", "write_events"),
    ]  # fmt: skip
    import tomllib

    miss = parse_scenario(tomllib.loads(scenario_toml(Calibration("postgres", "keyvalue", "get", "miss"),
                                                      {"postgres": "postgresql://x"}, True)))  # fmt: skip
    assert miss.namespace.backend == "postgres" and miss.namespace.options == {"dsn": "postgresql://x"}
    assert miss.namespace.cache.enabled and miss.namespace.cache.ttl_s < 0.01
    assert miss.workload.mix.weights() == {"get": 1.0} and miss.server.workers == 1


def test_a_scenario_sets_the_cache_table_as_a_plan_does(tmp_path: Path) -> None:
    from prism.benchmark.serverconf import config_body

    base = {"name": "s", "namespaces": [{"name": "b", "backend": "memory"}]}
    scenario = parse_scenario(base | {"server": {"cache": {"total_bytes": 1 << 20, "slot_bytes": 1024}}})
    body = config_body(scenario)
    assert "[cache]\ntotal_bytes = 1048576\nslot_bytes = 1024" in body
    (tmp_path / "p.toml").write_text(body)
    assert load_config(str(tmp_path / "p.toml"), {}, {}).cache.slot_bytes == 1024
    bad = (({"slot_bytes": 100}, "server.cache.slot_bytes"),
           ({"total_bytes": 2048, "slot_bytes": 1024}, "server.cache.total_bytes"))  # fmt: skip
    for cache, field in bad:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_scenario(base | {"server": {"cache": cache}})


def test_a_hits_cost_is_taken_among_misses(tmp_path: Path) -> None:
    from prism.plan.costfile import load_costs
    from prism.plan.model import HIT

    # A get run at 90% hits costs 50 us a call; misses alone 140: a hit among misses, 40.
    mixed = bench_file(tmp_path / "mixed.json", "sqlite", "get", [(95, 50, 3000)], hit=0.9)
    misses = bench_file(tmp_path / "miss.json", "sqlite", "get", [(95, 140, 9000)], hit=0.0)
    table = load_costs([mixed, misses])
    hit = table.cost(*HIT)
    assert hit is not None and hit.cpu_us == 40.0 and hit.hit_ratio == 0.9
    assert table.cost("sqlite", "get+cache") is not None and table.cost("sqlite", "get+cache-mixed") is None
    assert table.files[HIT] == "mixed.json"
    # Without the misses' cost, no hit's cost (and no stray mixed figure).
    with pytest.raises(ConfigError, match="no backend costs"):
        load_costs([mixed])


def test_a_hits_cost_is_taken_among_misses_and_the_writes_that_make_them(tmp_path: Path) -> None:
    from prism.plan.costfile import load_costs
    from prism.plan.model import HIT

    # 9 gets to 1 put, 80% of the gets hits: a call costs 60 us; a miss alone 140, a cached put 150.
    # 60 = 0.1 x 150 + 0.9 x (0.8 x hit + 0.2 x 140): a hit, 27.5 us.
    mixed = bench_file(tmp_path / "mixed.json", "sqlite", {"get": 9, "put": 1}, [(95, 60, 3000)], hit=0.8)
    misses = bench_file(tmp_path / "miss.json", "sqlite", "get", [(95, 140, 9000)], hit=0.0)
    puts = bench_file(tmp_path / "put.json", "sqlite", "put", [(95, 150, 9000)], hit=1.0)
    table = load_costs([mixed, misses, puts])
    hit = table.cost(*HIT)
    assert hit is not None and hit.cpu_us == 27.5 and (hit.hit_ratio, hit.write_share) == (0.8, 0.1)
    assert table.cost("sqlite", "put+cache") is not None and table.cost("sqlite", "get+cache-mixed") is None
    # Without the cached writes' cost, no hit's cost: its writes could not be taken out.
    with pytest.raises(ConfigError, match="no backend costs"):
        load_costs([mixed])
    assert load_costs([mixed, misses]).cost(*HIT) is None
    # Too few hits (writes to most records between reads): no figure from the run.
    low = bench_file(tmp_path / "low.json", "sqlite", {"get": 1, "put": 1}, [(95, 60, 3000)], hit=0.3)
    assert load_costs([low, misses, puts]).cost(*HIT) is None


def test_a_hits_calibration_is_gets_among_invalidating_puts() -> None:
    import tomllib

    from prism.plan.quick import HIT_MIX

    run = Calibration("sqlite", "keyvalue", "get", "hit")
    scenario = parse_scenario(tomllib.loads(scenario_toml(run, {}, False)))
    assert (
        scenario.workload.mix.weights()
        == {"get": 9.0, "put": 1.0}
        == {k: float(v) for k, v in HIT_MIX.items()}
    )
    # The writes make the misses, not the TTL: the plan's TTL.
    assert scenario.namespace.cache.enabled and scenario.namespace.cache.ttl_s == CACHE_TTL_S
    # A need that reads only still gets the miss's and the cached write's runs its hit needs.
    runs = calibrations_for([Need("kv", read_rps=900, records=1000)], {})
    assert [r.key for r in runs] == [("sqlite", "get"), ("cache", "get"), ("sqlite", "get+cache"),
                                     ("sqlite", "put+cache")]  # fmt: skip


def test_what_mixing_reads_and_writes_adds_comes_from_a_half_and_half_run(tmp_path: Path) -> None:
    from prism.plan.costfile import load_costs
    from prism.plan.model import demand

    runs = {r.key: r for r in calibrations_for([Need("ts", "timeseries", read_rps=300, write_rps=700)], {})}
    mix = runs["sqlite", "read_events+write_events"]
    scenario = parse_scenario(tomllib.loads(scenario_toml(mix, {}, False)))
    assert scenario.workload.mix.weights() == {"read_events": 1.0, "write_events": 1.0}
    assert mix.name == "sqlite-timeseries-mix" and not scenario.namespace.cache.enabled
    # Reads 150 us, writes 150 us alone; half and half, 180 us a call: 30 us more at w = 0.5,
    # so k = 30 / 0.25 = 120, and at w = 0.7, x = 120 x 0.21 = 25.2 us more a call.
    files = [
        bench_file(tmp_path / "r.json", "sqlite", "read_events", [(95, 150, 3000)]),
        bench_file(tmp_path / "w.json", "sqlite", "write_events", [(95, 150, 3000)]),
        bench_file(tmp_path / "m.json", "sqlite", {"read_events": 1, "write_events": 1}, [(95, 180, 3000)]),
    ]
    table = load_costs(files)
    got = demand(table, "sqlite", "timeseries", 300, 700, 512, 1000, cached=False)
    assert not isinstance(got, str)
    assert got.mix_us == pytest.approx(25.2) and got.cpu_us_per_s == pytest.approx(1000 * (150 + 25.2))
    # Either stream alone: nothing added; without the mixed run, nothing either.
    alone = demand(table, "sqlite", "timeseries", 0, 700, 512, 1000, cached=False)
    assert not isinstance(alone, str) and alone.mix_us == 0.0
    plain = demand(load_costs(files[:2]), "sqlite", "timeseries", 300, 700, 512, 1000, cached=False)
    assert not isinstance(plain, str) and plain.cpu_us_per_s == pytest.approx(150_000)
