"""CPU per PostgreSQL query for three ways of running psycopg 3, one at a time.

Paths: sync psycopg (what a client process spends), sync psycopg under
``trio.to_thread.run_sync`` with a CapacityLimiter, and ``prism.drivers.pg``
(psycopg's generators driven by trio). Prints a table and writes JSON.

    python bench/pg_driver_cpu.py [--dsn postgresql://127.0.0.1/test] [-n 20000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import psycopg
import trio

from prism.drivers import pg as pgio

SETUP = (
    'CREATE TABLE IF NOT EXISTS prism_bench_kv (id text COLLATE "C", key bytea, value bytea,'
    " PRIMARY KEY (id, key))",
    "INSERT INTO prism_bench_kv VALUES ('r1', '\\x6b', '\\x00112233') ON CONFLICT DO NOTHING",
)
PK = "SELECT key, value FROM prism_bench_kv WHERE id = $1 AND key = $2"
PK_PSYCOPG = "SELECT key, value FROM prism_bench_kv WHERE id = %s AND key = %s"


def cpu() -> float:
    t = time.process_time()
    return t


def bench_sync(dsn: str, n: int) -> dict[str, float]:
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, sql, params in (("select1", "SELECT 1", None), ("pk_get", PK_PSYCOPG, ("r1", b"k"))):
            cur = conn.cursor()
            for _ in range(200):
                cur.execute(sql, params).fetchall()
            c0, w0 = cpu(), time.perf_counter()
            for _ in range(n):
                cur.execute(sql, params).fetchall()
            out[name] = (cpu() - c0) / n * 1e6
            out[name + "_wall"] = (time.perf_counter() - w0) / n * 1e6
    return out


def bench_threads(dsn: str, n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    async def main() -> None:
        limiter = trio.CapacityLimiter(8)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, sql, params in (("select1", "SELECT 1", None), ("pk_get", PK_PSYCOPG, ("r1", b"k"))):
                cur = conn.cursor()

                def run() -> object:
                    return cur.execute(sql, params).fetchall()  # noqa: B023

                for _ in range(200):
                    await trio.to_thread.run_sync(run, limiter=limiter)
                c0, w0 = cpu(), time.perf_counter()
                for _ in range(n):
                    await trio.to_thread.run_sync(run, limiter=limiter)
                out[name] = (cpu() - c0) / n * 1e6
                out[name + "_wall"] = (time.perf_counter() - w0) / n * 1e6

    trio.run(main)
    return out


def bench_pgio(dsn: str, n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    async def main() -> None:
        conn = await pgio.connect(dsn, timeout_s=5)
        try:
            for name, sql, params in (("select1", b"SELECT 1", ()), ("pk_get", PK.encode(), ("r1", b"k"))):
                for _ in range(200):
                    await conn.execute(sql, params)
                c0, w0 = cpu(), time.perf_counter()
                for _ in range(n):
                    await conn.execute(sql, params)
                out[name] = (cpu() - c0) / n * 1e6
                out[name + "_wall"] = (time.perf_counter() - w0) / n * 1e6
        finally:
            conn.close()

    trio.run(main)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default="postgresql://127.0.0.1/test")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pg_driver_cpu.json"))
    args = ap.parse_args()
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        for s in SETUP:
            conn.execute(s)
    results = {
        "sync psycopg": bench_sync(args.dsn, args.n),
        "psycopg in trio.to_thread + limiter": bench_threads(args.dsn, args.n),
        "pgio (generators driven by trio)": bench_pgio(args.dsn, args.n),
    }
    print(f"{'path':40} {'SELECT 1 cpu/wall us':>22} {'pk get cpu/wall us':>22}")
    for path, r in results.items():
        print(
            f"{path:40} {r['select1']:10.1f} /{r['select1_wall']:8.1f}"
            f"  {r['pk_get']:10.1f} /{r['pk_get_wall']:8.1f}"
        )
    Path(args.out).write_text(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
