"""PutItems on one KeyValue backend, this checkout against another git ref, A/B.

    python bench/put_ab.py [--backend sqlite|postgres|redis] [--ref main] [--rounds 5] [--puts 4000]
    python bench/put_ab.py --statement     # SQLite: the upsert statement alone, each tree's


Each round runs the same put loop once per tree, alternating, each in a
fresh process on a fresh file, tables or key prefix (the other tree is
``git archive``d into a temporary directory; PostgreSQL tables and Redis
keys are dropped after each run): sequential puts, and puts from 16
concurrent tasks (which share a transaction on SQLite, a statement on
PostgreSQL, a pipeline on Redis). SQLite runs with ``synchronous`` NORMAL
(CPU-bound) and FULL (the default). ``with_tombstones`` repeats the loop,
in this checkout, on records that already hold a key tombstone and a range
tombstone. Prints the CPU and wall time per put (CPU: this process only,
not the database server's) and the medians of this tree's over the ref's;
quote those ratios, not the absolute times (the machine is shared).
``--statement`` times each tree's SQLite upsert statement alone (its own
schema, one transaction, 20,000 executions a round): the part of a put a
change to the statement changes, without the thread hop and the commit
around it. PostgreSQL and Redis: ``PRISM_BENCH_PG_DSN`` (default
postgresql://127.0.0.1/test) and ``PRISM_BENCH_REDIS_URL`` (default
redis://127.0.0.1:6379/0).
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
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_DSN = os.environ.get("PRISM_BENCH_PG_DSN", "postgresql://127.0.0.1/test")
REDIS_URL = os.environ.get("PRISM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CASES = {
    "sqlite": [("NORMAL", 1), ("NORMAL", 16), ("FULL", 1), ("FULL", 16)],
    "postgres": [("", 1), ("", 16)],
    "redis": [("", 1), ("", 16)],
}


def _backend(kind: str, data_dir: str, synchronous: str, name: str) -> Any:
    if kind == "sqlite":
        from prism.backends.sqlite.keyvalue import SqliteBackend
        from prism.backends.sqlite.options import SqliteOptions

        return SqliteBackend(SqliteOptions(synchronous=synchronous), data_dir=Path(data_dir), namespace="ns")
    if kind == "postgres":
        from prism.backends.postgres.keyvalue import PostgresBackend
        from prism.backends.postgres.options import PostgresKeyValueOptions

        return PostgresBackend(PostgresKeyValueOptions(dsn=PG_DSN), namespace=name)
    from prism.backends.redis.keyvalue import RedisBackend
    from prism.backends.redis.options import RedisOptions

    return RedisBackend(RedisOptions(url=REDIS_URL, key_prefix=f"{name}:"), namespace="ns")


async def _drop(kind: str, name: str) -> None:
    if kind == "postgres":
        import psycopg

        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", (f"prism_kv_{name}%",)
            )
            for (table,) in tables.fetchall():
                conn.execute(f'DROP TABLE "{table}"'.encode())
    elif kind == "redis":
        from prism.drivers import resp

        conn = await resp.connect(resp.Address(REDIS_URL), timeout_s=5)
        try:
            cursor = b"0"
            while True:
                cursor, keys = await conn.call("SCAN", cursor, "MATCH", f"{name}:*", "COUNT", 1000)
                if keys:
                    await conn.call("DEL", *keys)
                if cursor == b"0":
                    break
        finally:
            conn.close()


def _statement(puts: int, tombstones: bool) -> dict[str, float]:
    import sqlite3

    from prism.backends.sqlite import keyvalue_ops as ops

    with tempfile.TemporaryDirectory() as data_dir:
        conn = sqlite3.connect(Path(data_dir) / "ns.sqlite3", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        for statement in ops._SCHEMA:
            conn.execute(statement)
        if tombstones:
            for r in range(1000):
                conn.execute(ops._RANGE_TOMBSTONE, (f"r{r}", b"x", b"y", 1, "", 1 << 50, 1))
        value = b"v" * 100
        rows = [(f"r{i % 1000}", b"k%d" % (i % 10), value, 0, 10 + i, "", 1) for i in range(2 * puts)]
        conn.execute("BEGIN")
        conn.executemany(ops._UPSERT, rows[:puts])  # warm: the rows exist
        cpu = time.process_time()
        for row in rows[puts:]:
            conn.execute(ops._UPSERT, row)
        cpu = time.process_time() - cpu
        conn.execute("COMMIT")
        conn.close()
    return {"cpu_us_per_put": cpu / puts * 1e6}


async def _loop(kind: str, synchronous: str, tasks: int, puts: int, tombstones: bool) -> dict[str, float]:
    import trio

    from prism.backends.keyvalue import ItemWrite, MatchKeys, MatchRange, Stamp

    name = f"prism_bench_{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as data_dir:
        kv = _backend(kind, data_dir, synchronous, name)
        await kv.open()
        try:
            now = 1_700_000_000_000
            value = b"v" * 100
            if tombstones:
                for r in range(1000):
                    await kv.delete_items(f"r{r}", MatchKeys((b"gone",)), Stamp(1), now)
                    await kv.delete_items(f"r{r}", MatchRange(b"x", b"y"), Stamp(1), now)

            async def worker(first: int) -> None:
                for i in range(first, puts, tasks):
                    item = ItemWrite(b"k%d" % (i % 10), value)
                    await kv.put_items(f"r{i % 1000}", [item], Stamp(10 + i), now)

            async def run_all() -> None:
                async with trio.open_nursery() as nursery:
                    for t in range(tasks):
                        nursery.start_soon(worker, t)

            await run_all()  # warm: the records exist, the file has grown
            cpu, wall = time.process_time(), time.perf_counter()
            await run_all()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        finally:
            await kv.aclose()
            await _drop(kind, name)
    return {"cpu_us_per_put": cpu / puts * 1e6, "wall_us_per_put": wall / puts * 1e6}


def _run(
    tree: Path, args: argparse.Namespace, synchronous: str, tasks: int, tombstones: bool
) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--backend", args.backend]
    cmd += ["--synchronous", synchronous or "FULL", "--tasks", str(tasks), "--puts", str(args.puts)]
    cmd += ["--tombstones"] if tombstones else []
    cmd += ["--statement"] if args.statement else []
    out = subprocess.run(cmd, env=env, cwd=tree, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=sorted(CASES), default="sqlite")
    parser.add_argument("--ref", default="main")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--puts", type=int, default=4000)
    parser.add_argument("--statement", action="store_true", help="SQLite: the upsert statement alone")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--synchronous", default="FULL", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tombstones", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.statement:
        print(json.dumps(_statement(20_000, args.tombstones)))
        return
    if args.child:
        import trio

        print(
            json.dumps(
                trio.run(_loop, args.backend, args.synchronous, args.tasks, args.puts, args.tombstones)
            )
        )
        return
    with tempfile.TemporaryDirectory() as other:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.ref, "prism"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", other], input=archive.stdout, check=True)
        trees = {"this": ROOT, args.ref: Path(other)}
        report = {}
        cases = [("", 1)] if args.statement else CASES[args.backend]
        for synchronous, tasks in cases:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*trees, "with_tombstones"]}
            for _ in range(args.rounds):
                for name, tree in trees.items():
                    runs[name].append(_run(tree, args, synchronous, tasks, False))
                runs["with_tombstones"].append(_run(ROOT, args, synchronous, tasks, True))
            case = (
                "sqlite_statement"
                if args.statement
                else "_".join(filter(None, [args.backend, synchronous.lower(), f"c{tasks}"]))
            )
            medians = {
                name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
            }
            report[case] = {name: {k: round(v, 1) for k, v in m.items()} for name, m in medians.items()}
            for k in medians[args.ref]:
                base = medians[args.ref][k]
                report[case][f"{k}_ratio"] = round(medians["this"][k] / base, 3)
                report[case][f"{k}_ratio_with_tombstones"] = round(medians["with_tombstones"][k] / base, 3)
            print(case, json.dumps(report[case]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
