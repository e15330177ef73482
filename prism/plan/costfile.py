"""Cost tables from benchmark results files: ``prism plan --bench FILE ...``.

Two formats: ``prism bench``'s results.json (``prism.benchmark.costs``: a
one-operation scenario gives its backend's cost for that operation, with the
ladder's latency), and ``bench/backends.py``'s JSON (``prism_get``,
``prism_put`` per backend: KeyValue only, no ladder). Later files override
earlier ones for the same backend and operation. What a plan then needs and
no file gives is ``missing``: one line naming it, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import msgspec

from prism.errors import ConfigError
from prism.plan.model import DEFAULT_COSTS, HIT, OPS, Cost, CostTable

_LEGACY_OPS: Final = {"prism_get": "get", "prism_put": "put"}
MIXED: Final = {"+".join(OPS[a]) for a in ("keyvalue", "timeseries")}  # what mixing adds (model's x(w))
MAX_FILE_BYTES: Final = 64 << 20  # a results.json of a long ladder is well under 1 MiB


def load_costs(paths: list[Path], over: CostTable | None = None) -> CostTable:
    """A cost table from benchmark results; ``over``: a table whose figures
    the files' replace (the quick bench: measured over built in). ConfigError
    (one line, naming the file) if a file is unusable or none gives a cost."""
    if not paths:
        return over or DEFAULT_COSTS
    costs: dict[tuple[str, str], Cost] = {}
    files: dict[tuple[str, str], str] = {}
    machine: dict[str, Any] = {}
    for path in paths:
        got, machine = _read(path, machine)
        costs.update(got)
        files.update({key: path.name for key in got})
    _hits_among_misses(costs, files)
    if all(op in MIXED for _, op in costs):  # (what mixing adds prices no operation by itself)
        raise ConfigError(
            f"{', '.join(map(str, paths))}: no backend costs in these results "
            "(a prism bench run of one operation gives one; a mix of reads and writes only adds to them)"
        )
    source = ", ".join(str(p) for p in paths)
    if over is not None:
        measured = ", ".join(f"{b} {op}" for b, op in sorted(costs))
        return CostTable({**over.costs, **costs}, f"measured here ({measured}); the rest {over.source}",
                         machine, files)  # fmt: skip
    return CostTable(costs, source, machine, files)


def _hits_among_misses(costs: dict[tuple[str, str], Cost], files: dict[tuple[str, str], str]) -> None:
    """A hit's cost from a run of gets on the cache, hits and misses
    (``get+cache-mixed``: gets at hit ratio h, and a share w of its calls
    puts that invalidate), the misses' own cost (``get+cache``) and, with
    puts, the cached writes' (``put+cache``): a call cost c, so

        c_hit = (c - w c_put - (1 - w) (1 - h) c_miss) / ((1 - w) h)

    A stream of hits alone is answered in whole batches, with no task, and
    costs less per hit than hits among misses and writes do (on this
    repository's machine, 31 us against 39-42): so this one, when both are given."""
    for (backend, op), mixed in list(costs.items()):
        if op != "get+cache-mixed":
            continue
        del costs[backend, op]
        miss = costs.get((backend, "get+cache"))
        put = costs.get((backend, "put+cache"))
        h, w = mixed.hit_ratio, mixed.write_share
        if miss is None or not h or (w > 0 and put is None):
            continue
        writes = w * put.cpu_us if put is not None and w > 0 else 0.0
        c_hit = (mixed.cpu_us - writes - (1 - w) * (1 - h) * miss.cpu_us) / ((1 - w) * h)
        if c_hit > 0:
            costs[HIT] = Cost(round(c_hit, 1), round(1e6 / c_hit), mixed.ladder, h, w)
            files[HIT] = files.pop((backend, op), "")


def _read(path: Path, machine: dict[str, Any]) -> tuple[dict[tuple[str, str], Cost], dict[str, Any]]:
    costs: dict[tuple[str, str], Cost] = {}
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: over {MAX_FILE_BYTES >> 20} MiB: not benchmark results")
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        if data.get("kind") == "prism-bench-results":  # prism bench's results.json
            from prism.benchmark.costs import plan_costs

            for key, (cpu_us, sat_rps, ladder, hit, writes) in plan_costs(data).items():
                costs[key] = Cost(cpu_us, sat_rps, ladder, hit, writes)
            return costs, data.get("machine") or machine
        for backend, figures in data["results"].items():
            for name, op in _LEGACY_OPS.items():
                got = figures.get(name)
                if got and got.get("cpu_us_per_call") and got.get("calls_per_s"):
                    costs[backend, op] = Cost(float(got["cpu_us_per_call"]), float(got["calls_per_s"]))
        return costs, data.get("machine") or machine
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError, msgspec.ValidationError) as exc:
        raise ConfigError(f"{path}: not benchmark results ({type(exc).__name__}: {exc})") from None


def missing_line(table: CostTable, what: str) -> str:
    """The one line for figures a plan needs that the --bench files lack."""
    return (
        f"{table.source}: no figures for {what}: give --bench a prism bench results.json "
        "of a one-operation scenario on that backend (bench/scenarios/, or --bench-quick)"
    )


__all__ = ["load_costs", "missing_line"]
