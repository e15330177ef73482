"""``results.json``: read back strictly against the schema, every field documented,
the saturation point and the p99 at 80% of it; ``report.html`` self-contained."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from prism.benchmark import report, results
from prism.benchmark.results import (
    Backend,
    Latency,
    Machine,
    Results,
    ServerSetup,
    Step,
    latency,
    percentile,
    saturation,
)
from prism.errors import ConfigError

DOC = Path(__file__).resolve().parents[2] / "docs" / "bench-results.md"


def lat(p99: float) -> Latency:
    return Latency(
        p50_us=p99 / 4, p90_us=p99 / 2, p99_us=p99, p999_us=p99 * 2, mean_us=p99 / 3, max_us=p99 * 3
    )


def step(index: int, calls_per_s: float, p99: float) -> Step:
    return Step(
        index=index, mode="closed", concurrency=2**index, offered_calls_per_s=None, connections=1,
        streams_per_connection=2**index, load_generator="builtin", warmup_s=1.0, duration_s=2.0,
        calls=int(calls_per_s * 2), calls_per_s=calls_per_s, errors={}, error_calls_per_s=0.0,
        latency=lat(p99),
        operations={}, cpu_us_per_call={"worker0:default@cpu0": 50.0, "admin": 1.0, "total": 51.0},
        cpu_pct={"worker0:default@cpu0": 90.0}, loadgen_cpu_us_per_call=10.0, other_on_server_cpus_pct=1.0,
        backend=Backend(10, 30, 0.25, {}, 0, {"OK": 100}), open_loop_backlog_max=None, complete=True,
    )  # fmt: skip


def run_of(steps: list[Step]) -> Results:
    return Results(
        schema_version=results.SCHEMA_VERSION, kind=results.KIND, outcome="ok", failure=None,
        started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:01:00+00:00",
        scenario_file="s.toml", scenario={"name": "t<script>"}, quick=True,
        server=ServerSetup(True, "127.0.0.1:1", 1, [0], [1], 1),
        machine=Machine("cpu", 2, "6", "3.11", "0.1.0", "upb", {}, None, {"memory": None}),
        steps=steps, saturation=saturation(steps), warnings=[],
    )  # fmt: skip


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 1001))
    assert [percentile(values, p) for p in (50, 90, 99, 99.9)] == [500, 900, 990, 999]
    assert latency([]).p99_us is None
    assert latency([7]).p999_us == 7 and latency([7]).mean_us == 7


def test_saturation_is_the_top_step_and_the_p99_at_80_percent_is_interpolated() -> None:
    steps = [step(0, 1000, 1000), step(1, 3000, 2000), step(2, 5000, 9000), step(3, 4800, 50000)]
    sat = saturation(steps)
    assert sat is not None
    assert (sat.step, sat.calls_per_s, sat.p99_us) == (2, 5000, 9000)
    # 80% = 4000 calls/s, halfway between 3000 (p99 2 ms) and 5000 (p99 9 ms).
    assert (sat.at_80pct.calls_per_s, sat.at_80pct.p99_us, sat.at_80pct.method) == (
        4000,
        5500,
        "interpolated",
    )


def test_without_a_bracket_the_nearest_step_is_used() -> None:
    sat = saturation([step(0, 4500, 700), step(1, 5000, 900)])
    assert sat is not None and (sat.at_80pct.p99_us, sat.at_80pct.method) == (700, "nearest")
    assert saturation([]) is None


def test_results_round_trip_and_a_file_off_the_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    run = run_of([step(0, 1000, 1000), step(1, 2000, 3000)])
    results.write(path, run)
    assert results.read(path) == run
    data = json.loads(path.read_text())
    data["steps"][0]["surprise"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(msgspec.ValidationError, match="surprise"):
        results.read(path)
    data["steps"][0].pop("surprise")
    data["schema_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(msgspec.ValidationError, match="schema version 1"):
        results.read(path)


def _fields(struct: type[msgspec.Struct]) -> set[str]:
    return set(struct.__struct_fields__)


def test_every_field_of_the_schema_is_documented() -> None:
    doc = DOC.read_text()
    documented = set(re.findall(r"`([a-z0-9_]+)`", doc)) | {
        name
        for group in re.findall(r"`([a-z0-9_]+(?:`, `[a-z0-9_]+)+)`", doc)
        for name in group.split("`, `")
    }
    documented |= {part for dotted in re.findall(r"`([a-z0-9_.]+)`", doc) for part in dotted.split(".")}
    structs = (Results, ServerSetup, Machine, Step, Latency, results.Operation, Backend, results.Saturation,
               results.At80, results.PerWorker)  # fmt: skip
    missing = {f"{s.__name__}.{f}" for s in structs for f in _fields(s) if f not in documented}
    assert not missing, f"not in {DOC.name}: {sorted(missing)}"


def test_the_report_is_one_self_contained_page(tmp_path: Path) -> None:
    run = run_of([step(0, 1000, 1000), step(1, 3000, 2000), step(2, 5000, 9000)])
    written = report.write_report(run, tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "t&lt;script&gt;" in page and "<script>" not in page
    assert not re.search(r"""(src|href)=["'](?!data:)""", page), (
        "the page refers to another file or the network"
    )
    assert 'id="saturation"' in page and "5,000 calls/s" in page and "5.50 ms" in page
    if report.have_matplotlib():
        assert {p.name for p in written} == {"throughput.png", "latency.png", "cpu.png", "report.html"}
        assert page.count('src="data:image/png;base64,') == 3
    else:
        assert report.INSTALL_HINT in page


def test_without_matplotlib_the_page_has_the_tables_and_says_how_to_get_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    written = report.write_report(run_of([step(0, 1000, 1000)]), tmp_path)
    assert written == [tmp_path / "report.html"]
    page = written[0].read_text()
    assert "pip install &#x27;prism-gateway[report]&#x27;" in page and "<table>" in page
    assert "data:image/png" not in page


def test_prism_plan_reads_a_one_operation_run_and_skips_a_mix(tmp_path: Path) -> None:
    from prism.plan.costfile import load_costs
    from prism.plan.model import Cost

    steps = [step(0, 1000, 1000), step(1, 5000, 9000)]
    steps[0].cpu_pct = {"worker0:default@cpu0": 40.0}  # under half busy: not a saturation figure
    steps[0].cpu_us_per_call = {"worker0:default@cpu0": 30.0, "total": 30.0}
    run = run_of(steps)
    run.scenario = {
        "name": "pg-reads",
        "namespaces": [{"name": "bench", "backend": "postgres"}],
        "workload": {"namespace": "", "mix": {"get": 1.0, "put": 0.0}},
    }
    assert run.saturation is not None and run.saturation.per_worker == results.PerWorker(
        1, 20000.0, 90.0, 5000.0
    )
    path = tmp_path / "results.json"
    results.write(path, run)
    table = load_costs([path])
    # The worker's CPU per call at its best step (of those at least half busy), the calls/s
    # one worker would serve at its whole CPU, and each step's (worker busy share, p99).
    assert table.costs == {("postgres", "get"): Cost(50.0, 20000.0, ((0.4, 1000.0), (0.9, 9000.0)))}
    # A mix prices no operation: of reads and writes, it only gives what mixing adds to them.
    run.scenario["workload"] = {"mix": {"get": 0.9, "put": 0.1}}
    results.write(path, run)
    with pytest.raises(ConfigError, match="no backend costs"):
        load_costs([path])
    run.scenario["workload"] = {"mix": {"get": 0.9, "scan": 0.1}}
    results.write(path, run)
    with pytest.raises(ConfigError, match="no backend costs"):
        load_costs([path])


@pytest.mark.parametrize(
    ("op", "hit_ratio", "key"),
    [
        ("get", 0.99, ("cache", "get")),
        ("get", 0.01, ("sqlite", "get+cache")),
        ("get", 0.9, ("sqlite", "get+cache-mixed")),  # hits among misses: costfile takes a hit's cost
        ("get", 0.3, None),  # mostly misses, some hits: no figure
        ("put", None, ("sqlite", "put+cache")),
        ("read_events", None, ("sqlite", "read_events")),
    ],
)
def test_a_run_on_a_namespace_with_the_cache_gives_a_hit_a_miss_or_a_cached_write(
    op: str, hit_ratio: float | None, key: tuple[str, str] | None
) -> None:
    from prism.benchmark.costs import plan_costs

    steps = [step(0, 5000, 9000)]
    assert steps[0].backend is not None
    steps[0].backend.cache_hit_ratio = hit_ratio
    run = run_of(steps)
    run.scenario = {
        "name": "c",
        "namespaces": [{"name": "bench", "backend": "sqlite", "cache": {"enabled": op != "read_events"}}],
        "workload": {"mix": {op: 1.0}},
    }
    got = plan_costs(msgspec.to_builtins(run))
    assert got == ({key: (50.0, 20000.0, ((0.9, 9000.0),), hit_ratio, 0.0)} if key else {})


def test_the_saturation_per_worker_is_its_lowest_cpu_per_call_when_busy() -> None:
    steps = [step(0, 1000, 1000), step(1, 5000, 9000), step(2, 4000, 20000)]
    busy = {0: (30.0, 40.0), 1: (95.0, 60.0), 2: (60.0, 55.0)}  # busy %, worker CPU us per call
    for s in steps:
        s.cpu_pct = {"worker0:default@cpu0": busy[s.index][0]}
        s.cpu_us_per_call = {"worker0:default@cpu0": busy[s.index][1], "total": busy[s.index][1]}
    # Step 0's 40 us is at 30% busy: not a saturated figure. Of the others, 55 us (step 2).
    assert results.per_worker(steps) == results.PerWorker(2, round(1e6 / 55, 1), 60.0, 4000.0)
    # None at least half busy (other work took the CPU): the lowest of them all, still a figure.
    for s in steps:
        s.cpu_pct = {"worker0:default@cpu0": 20.0}
    assert results.per_worker(steps) == results.PerWorker(0, 25000.0, 20.0, 1000.0)
    # Not metered (a --target run): none.
    for s in steps:
        s.cpu_pct = s.cpu_us_per_call = None
    assert results.per_worker(steps) is None
