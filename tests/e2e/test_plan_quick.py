"""``prism plan --bench-quick``: the costs measured on this machine by ``prism bench --quick``
(a real ``prism serve`` per figure, stopped after), then the plan from them, with the p99
the quick ladder measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_quick_measures_what_the_plan_uses_and_plans_from_it(tmp_path: Path) -> None:
    needs = tmp_path / "needs.toml"
    # Reads only, of values too large for the cache: one figure to measure (SQLite's get).
    needs.write_text('[[needs]]\nnamespace = "big"\nread_rps = 2000\nitem_bytes = 20000\n')
    done = subprocess.run(
        [sys.executable, "-m", "prism.cli", "plan", str(needs), "--bench-quick", "--cpus", "2",
         "--out", str(tmp_path / "prism.toml"), "--json", str(tmp_path / "plan.json")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "measuring sqlite get (1/1): prism bench --quick sqlite-get.toml" in done.stderr
    assert "using the built-in costs" not in done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["costs"]["source"].startswith("measured here (sqlite get); the rest built in")
    (ns,) = plan["namespaces"]
    assert ns["backend"] == "sqlite" and ns["saturation_rps_per_worker"] > 0
    # The quick ladder's latency gives the p99 at the planned utilisation.
    (tenant,) = plan["tenants"]
    assert tenant["p99_us"] is not None and tenant["p99_method"] in ("interpolated", "nearest")
    assert tenant["p99_source"] == "sqlite get (results.json)"
    assert f"{tenant['p99_us'] / 1000:.1f}" in done.stdout
    assert (tmp_path / "prism.toml").exists()
    # Its scratch directory (scenarios, results) is gone.
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("prism-plan-bench-*"))
