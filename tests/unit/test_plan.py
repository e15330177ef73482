"""``prism plan``: the cost model by hand, the planner's choices, the config
it writes (which Prism's own loader accepts) and the CLI's exits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prism.cli.main import main
from prism.config import load_config
from prism.plan.costfile import load_costs
from prism.plan.model import (
    CACHE_HIT_SHARE,
    CACHE_MISS_US,
    DEFAULT_COSTS,
    TARGET_UTILISATION,
    Cost,
    CostTable,
    Demand,
    demand,
    workers_for,
)
from prism.plan.needs import Need
from prism.plan.planner import config_toml, make_plan

TABLE = CostTable(
    {
        ("memory", "get"): Cost(50, 20000),
        ("memory", "put"): Cost(50, 20000),
        ("sqlite", "get"): Cost(100, 10000),
        ("sqlite", "put"): Cost(200, 5000),
        ("sqlite", "read_events"): Cost(150, 6000),
        ("sqlite", "write_events"): Cost(120, 8000),
        ("postgres", "get"): Cost(80, 12000),
        ("postgres", "put"): Cost(90, 11000),
        ("postgres", "read_events"): Cost(100, 10000),
        ("postgres", "write_events"): Cost(100, 10000),
    },
    "test",
)


def kv(table: CostTable, backend: str, r: float, w: float, size: int, records: int, cached: bool) -> Demand:
    got = demand(table, backend, "keyvalue", r, w, size, records, cached)
    assert isinstance(got, Demand), got
    return got


def test_the_demand_is_the_documented_sum() -> None:
    # 1,000 reads/s of 1.5 KiB on sqlite, 500 writes/s: 1 KiB over the 512 B the costs are for.
    d = kv(TABLE, "sqlite", 1000, 500, 1536, 10, cached=False)
    assert d.cpu_us_per_s == pytest.approx(100.25 * 1000 + 200.6 * 500)
    # The saturation per worker: those 1,500 calls at one whole CPU.
    assert d.saturation_rps == pytest.approx(1e6 * 1500 / (100.25 * 1000 + 200.6 * 500))
    # A TimeSeries' reads and writes are ReadEvents and WriteEvents.
    ts = demand(TABLE, "sqlite", "timeseries", 100, 1000, 512, 10, False)
    assert isinstance(ts, Demand) and ts.cpu_us_per_s == pytest.approx(100 * 150 + 1000 * 120)
    # Read-only, cached, 1,000,000 records: 0.1 of them cached, read 1e-3 times a second
    # each for a 30 s TTL: h = 0.1 * 0.03 / 1.03; a hit CACHE_HIT_SHARE of a read, a miss the read
    # plus the cache's work.
    cached = kv(TABLE, "sqlite", 1000, 0, 512, 1_000_000, cached=True)
    h = 0.1 * 0.03 / 1.03
    assert cached.hit_rate == pytest.approx(h)
    miss = 100 + CACHE_MISS_US
    assert cached.cpu_us_per_s == pytest.approx(1000 * (h * CACHE_HIT_SHARE * 100 + (1 - h) * miss))
    # Without the figures for an operation, what is missing.
    assert demand(TABLE, "redis", "keyvalue", 1, 1, 1, 1, False) == "redis get, redis put"
    assert demand(TABLE, "memory", "timeseries", 0, 1, 1, 1, False) == "memory write_events"
    # One CPU at TARGET_UTILISATION holds 0.7e6 us/s: just over needs two.
    assert workers_for(0.7e6) == 1 and workers_for(0.7e6 + 1) == 2 and workers_for(0) == 1


def test_the_cheapest_allowed_backend_with_a_cache_for_read_heavy_keyvalue() -> None:
    needs = [
        Need("profiles", read_rps=9000, write_rps=1000, records=1000, tenant="web"),  # durable: no memory
        Need("sessions", read_rps=100, write_rps=100, durability="cache", tenant="solo"),
        Need("events", "timeseries", write_rps=100),
    ]
    plan = make_plan(needs, TABLE, 8, {"postgres": "postgresql://db/x"})
    got = {c.need.namespace: (c.backend, c.cached, c.tenant) for t in plan.tenants for c in t.choices}
    assert got == {
        "profiles": ("postgres", True, "web"),
        "sessions": ("memory", False, "solo"),
        "events": ("postgres", False, "default"),
    }
    # Without PostgreSQL: SQLite.
    plan = make_plan(needs[:1], TABLE, 8, {})
    assert [c.backend for t in plan.tenants for c in t.choices] == ["sqlite"]


def test_a_memory_namespace_leaves_a_tenant_of_several_workers() -> None:
    needs = [
        Need("big", read_rps=20000, tenant="web"),
        Need("cache", read_rps=10, durability="cache", tenant="web"),
    ]
    plan = make_plan(needs, TABLE, 16, {})
    (web,) = plan.tenants
    assert web.workers > 1
    assert {c.need.namespace: c.backend for c in web.choices} == {"big": "sqlite", "cache": "sqlite"}


def test_workers_and_cpus_needed() -> None:
    plan = make_plan([Need("a", read_rps=20000)], TABLE, 64, {})
    (tenant,) = plan.tenants
    # 20,000 reads/s at 100.125 us (512 B) = 2.0025 CPUs of work: 3 workers at 70%.
    assert tenant.workers == math.ceil(20000 * 100 / 1e6 / TARGET_UTILISATION) == 3
    assert tenant.utilisation == pytest.approx(20000 * 100 / 1e6 / 3)
    assert plan.cpus_needed == 4 and plan.fits  # and one for the supervisor and admin


def test_a_plan_that_does_not_fit_names_the_tenant_and_the_machine() -> None:
    plan = make_plan([Need("a", read_rps=20000), Need("b", tenant="t", write_rps=10)], TABLE, 2, {})
    assert not plan.fits
    assert plan.problems == (
        "tenant 'default' ('a') needs 3 workers of one CPU each at 70% load; this machine has 2 CPUs",
    )
    plan = make_plan([Need("p", "pubsub", write_rps=10)], TABLE, 2, {})
    assert plan.problems == (
        "need 'p': no backend for a durable pubsub namespace: give a NATS address (--nats)",
    )
    plan = make_plan([Need("o", write_rps=10, backend="postgres")], TABLE, 2, {})
    assert plan.problems == ("need 'o': it requires postgres: give its address (--postgres)",)


def test_a_need_that_names_its_backend_gets_it() -> None:
    # PostgreSQL costs less in TABLE; the need names SQLite, and gets it.
    need = Need("o", read_rps=100, write_rps=100, backend="sqlite")
    plan = make_plan([need], TABLE, 2, {"postgres": "postgresql://db/x"})
    assert [c.backend for t in plan.tenants for c in t.choices] == ["sqlite"]


def test_the_written_config_is_one_prism_serves(tmp_path: Path) -> None:
    needs = [
        Need("profiles", read_rps=9000, write_rps=1000, records=1000, tenant="web"),
        Need("q", "pubsub", write_rps=100, tenant="bus"),
        Need("sessions", read_rps=100, durability="cache", tenant="solo"),
    ]
    addresses = {"postgres": "postgresql://127.0.0.1/x", "nats": "nats://127.0.0.1:4222"}
    plan = make_plan(needs, TABLE, 16, addresses)
    path = tmp_path / "prism.toml"
    path.write_text(config_toml(plan, addresses))
    config = load_config(str(path), {}, {})
    assert {(t.name, t.workers) for t in config.tenants} == {(t.name, t.workers) for t in plan.tenants}
    namespaces = {ns.name: ns for t in config.tenants for ns in t.namespaces}
    assert namespaces["profiles"].backend == "postgres" and namespaces["profiles"].cache.enabled
    assert namespaces["profiles"].options == {"dsn": "postgresql://127.0.0.1/x"}
    assert namespaces["q"].backend == "nats" and namespaces["q"].abstraction == "pubsub"


def test_costs_from_benchmark_results(tmp_path: Path) -> None:
    path = tmp_path / "backends.json"
    path.write_text(
        json.dumps({"results": {"sqlite": {"prism_get": {"cpu_us_per_call": 40, "calls_per_s": 25000},
                                           "prism_put": {"cpu_us_per_call": 50, "calls_per_s": 20000}}}})
    )  # fmt: skip
    table = load_costs([path])
    assert table.cost("sqlite", "get") == Cost(40, 25000) and table.cost("memory", "get") is None
    assert load_costs([]) is DEFAULT_COSTS


def _plan(tmp_path: Path, *args: str, needs: str | None = None) -> int:
    path = tmp_path / "needs.toml"
    path.write_text(needs if needs is not None else '[[needs]]\nnamespace = "a"\nread_rps = 1000\n')
    return main(["plan", str(path), "--out", str(tmp_path / "prism.toml"), *args])


def test_the_cli_writes_the_config_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _plan(tmp_path, "--cpus", "4") == 0
    out = capsys.readouterr().out
    assert "a " in out and "sqlite" in out and "CPUs needed: 1 (this machine: 4)" in out
    load_config(str(tmp_path / "prism.toml"), {}, {})
    # Not over an existing file without --force.
    assert _plan(tmp_path, "--cpus", "4") == 2
    assert "exists: give --force" in capsys.readouterr().err
    assert _plan(tmp_path, "--cpus", "4", "--force") == 0


def test_the_cli_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _plan(tmp_path, "--cpus", "1", needs='[[needs]]\nnamespace = "a"\nread_rps = 50000\n') == 1
    err = capsys.readouterr().err
    assert "cannot meet" in err and "the smallest machine that holds this plan has" in err
    assert not (tmp_path / "prism.toml").exists()
    assert _plan(tmp_path, needs="[[needs]\n") == 2
    assert "not TOML" in capsys.readouterr().err
    assert _plan(tmp_path, "--cpus", "0") == 2
    bad = tmp_path / "bench.json"
    bad.write_text("[]")
    assert _plan(tmp_path, "--bench", str(bad)) == 2
    assert "not benchmark results" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", ["web.toml", "shop.proto", "read-cached.toml", "write-postgres.toml", "timeseries-sqlite.toml"]
)
def test_the_shipped_examples_plan(name: str, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "needs" / name
    out = tmp_path / "prism.toml"
    # The accuracy examples fit this 2-CPU machine (bench/plan_accuracy.py plans them with --cpus 2).
    cpus = "16" if name in ("web.toml", "shop.proto") else "2"
    assert (
        main(["plan", str(example), "--cpus", cpus, "--out", str(out), "--postgres", "postgresql://db/x"])
        == 0
    )
    load_config(str(out), {}, {})


def test_an_address_prism_would_refuse_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A need that requires Redis: --redis is taken.
    needs = '[[needs]]\nnamespace = "a"\nread_rps = 1000\nbackend = "redis"\n'
    assert _plan(tmp_path, "--cpus", "4", "--redis", "notaurl", needs=needs) == 2
    err = capsys.readouterr().err
    built_in, refused = err.splitlines()
    assert built_in.startswith("prism plan: using the built-in costs")
    assert "the planned config is not valid" in refused and "options.url" in refused
    assert list(tmp_path.iterdir()) == [tmp_path / "needs.toml"]


def test_an_out_that_cannot_be_written_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "needs.toml"
    path.write_text('[[needs]]\nnamespace = "a"\nread_rps = 1000\n')
    assert main(["plan", str(path), "--out", str(tmp_path / "no" / "such" / "prism.toml")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith("prism plan: cannot write")
