"""PutItems on the SQLite backend, this checkout against another git ref, A/B.

    python bench/sqlite_put_ab.py [--ref main] [--rounds 5] [--puts 4000]

Each round runs the same put loop once per tree, alternating, each in a
fresh process on a fresh file (the other tree is ``git archive``d into a
temporary directory): sequential puts, and puts from 16 concurrent tasks
(which share transactions), with ``synchronous`` NORMAL (CPU-bound) and
FULL (the default: fsync-bound). ``with_tombstones`` repeats the loop on
records that already hold a key tombstone and a range tombstone (this
checkout only, if the other tree has none). Prints CPU and wall time per
put, and the medians of this tree's over the ref's, per case; quote those
ratios, not the absolute times (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = [("NORMAL", 1), ("NORMAL", 16), ("FULL", 1), ("FULL", 16)]


async def _loop(data_dir: str, synchronous: str, tasks: int, puts: int, tombstones: bool) -> dict[str, float]:
    import trio

    from prism.backends.keyvalue import ItemWrite, MatchKeys, MatchRange, Stamp
    from prism.backends.sqlite.keyvalue import SqliteBackend
    from prism.backends.sqlite.options import SqliteOptions

    kv = SqliteBackend(SqliteOptions(synchronous=synchronous), data_dir=Path(data_dir), namespace="ns")
    await kv.open()
    now = 1_700_000_000_000
    value = b"v" * 100
    if tombstones:
        for r in range(1000):
            await kv.delete_items(f"r{r}", MatchKeys((b"gone",)), Stamp(1), now)
            await kv.delete_items(f"r{r}", MatchRange(b"x", b"y"), Stamp(1), now)

    async def worker(first: int) -> None:
        for i in range(first, puts, tasks):
            await kv.put_items(f"r{i % 1000}", [ItemWrite(b"k%d" % (i % 10), value)], Stamp(10 + i), now)

    async def run_all() -> None:
        async with trio.open_nursery() as nursery:
            for t in range(tasks):
                nursery.start_soon(worker, t)

    await run_all()  # warm: the records exist, the file has grown
    cpu, wall = time.process_time(), time.perf_counter()
    await run_all()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await kv.aclose()
    return {"cpu_us_per_put": cpu / puts * 1e6, "wall_us_per_put": wall / puts * 1e6}


def _child(args: argparse.Namespace) -> None:
    import trio

    with tempfile.TemporaryDirectory() as tmp:
        result = trio.run(_loop, tmp, args.synchronous, args.tasks, args.puts, args.tombstones)
    print(json.dumps(result))


def _run(tree: Path, synchronous: str, tasks: int, puts: int, tombstones: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--synchronous", synchronous]
    cmd += ["--tasks", str(tasks), "--puts", str(puts)] + (["--tombstones"] if tombstones else [])
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--puts", type=int, default=4000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--synchronous", default="NORMAL", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tombstones", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory() as other:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.ref, "prism"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", other], input=archive.stdout, check=True)
        trees = {"this": ROOT, args.ref: Path(other)}
        report = {}
        for synchronous, tasks in CASES:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*trees, "with_tombstones"]}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    runs[name].append(_run(tree, synchronous, tasks, args.puts, False))
                runs["with_tombstones"].append(_run(ROOT, synchronous, tasks, args.puts, True))
            case = f"{synchronous.lower()}_c{tasks}"
            report[case] = {
                name: {k: round(statistics.median(r[k] for r in rs), 1) for k in rs[0]}
                for name, rs in runs.items()
            }
            for k in ("cpu_us_per_put", "wall_us_per_put"):
                base = report[case][args.ref][k]
                report[case][f"{k}_ratio"] = round(report[case]["this"][k] / base, 3)
                report[case][f"{k}_ratio_with_tombstones"] = round(
                    report[case]["with_tombstones"][k] / base, 3
                )
            print(case, json.dumps(report[case]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
