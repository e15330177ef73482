"""``bench/plan_accuracy.py`` benches what the plan planned: the scenario it derives from a
need and the planned config has the need's mix, sizes, records and (uniform) keys, and the
planned namespace, backend, cache and cache table, with one worker."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from prism.benchmark.scenario import parse_scenario
from prism.cli.main import main
from prism.plan.needs import load_needs

REPO = Path(__file__).resolve().parents[2]


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("plan_accuracy", REPO / "bench" / "plan_accuracy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_accuracy"] = module
    spec.loader.exec_module(module)
    return module


def test_the_scenario_is_the_need_on_the_planned_config(tmp_path: Path) -> None:
    needs = tmp_path / "needs.toml"
    needs.write_text(
        '[[needs]]\nnamespace = "hot"\nread_rps = 9000\nwrite_rps = 300\nitem_bytes = 700\nrecords = 60000\n'
    )
    config = tmp_path / "prism.toml"
    assert main(["plan", str(needs), "--cpus", "4", "--out", str(config)]) == 0
    (need,) = load_needs(needs)
    scenario = parse_scenario(tomllib.loads(script()._scenario("hot", need, config)))
    ns = scenario.namespace
    assert (ns.name, ns.abstraction, ns.backend, ns.cache.enabled, ns.cache.ttl_s) == (
        "hot", "keyvalue", "sqlite", True, 30.0
    )  # fmt: skip
    w = scenario.workload
    assert w.mix.weights() == {"get": 9000, "put": 300}
    assert (w.records, w.value_bytes, w.key_distribution) == (60000, 700, "uniform")
    # The table the plan sized: 120,000 slots of 1 KiB (the default holds 16,384).
    assert scenario.server.workers == 1 and scenario.server.cache is not None
    assert (scenario.server.cache.total_bytes, scenario.server.cache.slot_bytes) == (120_000 * 1024, 1024)
    assert scenario.load.mode == "closed" and scenario.load.concurrency == (32, 128, 256)


def test_the_examples_are_the_three_the_issue_names() -> None:
    examples = script().EXAMPLES
    kinds = {}
    for name, (path, _) in examples.items():
        (need,) = load_needs(REPO / path)
        kinds[name] = (need.abstraction, need.backend, need.read_rps > need.write_rps)
    assert kinds == {
        "read-cached": ("keyvalue", None, True),
        "write-postgres": ("keyvalue", "postgres", False),
        "timeseries-sqlite": ("timeseries", None, False),
    }


def test_runs_out_of_bounds_is_refused_before_anything_runs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    module = script()
    for bad in ("0", "6", "x"):
        monkeypatch.setattr(sys, "argv", ["plan_accuracy.py", "--runs", bad, "--keep", str(tmp_path / "k")])
        with pytest.raises(SystemExit) as exited:
            module.main()
        assert exited.value.code == 2 and "--runs" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()  # nothing calibrated, nothing written


def test_the_lowest_cpu_per_call_of_a_figures_runs_is_kept(tmp_path: Path) -> None:
    from tests.unit.test_plan_report import bench_file

    module = script()
    runs = [
        bench_file(tmp_path / f"{n}.json", "sqlite", "get", [(95, us, 3000)])
        for n, us in (("a", 90), ("b", 60))
    ]
    assert module._lowest(runs) == runs[1] and [module._cpu_us(p) for p in runs] == [90.0, 60.0]
    # A run that failed leaves the figure to the others, in one line.
    assert module._attempt(lambda: (_ for _ in ()).throw(SystemExit("prism bench exited 1"))) == []
