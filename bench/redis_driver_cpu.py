"""CPU per Redis GET: redis-py's sync client vs ``prism.drivers.resp`` (trio + hiredis).

Process CPU time over ``n`` sequential GETs on one connection after a warm-up.
Also: a pipelined batch of 16 GETs per round trip (per GET), and the
backend's whole get_items call (Lua read script) for reference.

    python bench/redis_driver_cpu.py [--url redis://127.0.0.1:6379/0] [-n 20000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import redis
import trio

from prism.backends.keyvalue import ItemWrite, MatchAll, Stamp
from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.redis.options import RedisOptions
from prism.drivers import resp

KEY = b"prism_bench:k"


def bench_redis_py(url: str, n: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    for _ in range(200):
        client.get(KEY)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        client.get(KEY)
    out = {"get": (time.process_time() - c0) / n * 1e6, "get_wall": (time.perf_counter() - w0) / n * 1e6}
    pipe = client.pipeline(transaction=False)
    c0 = time.process_time()
    for _ in range(n // 16):
        for _ in range(16):
            pipe.get(KEY)
        pipe.execute()
    out["pipelined16"] = (time.process_time() - c0) / (n // 16 * 16) * 1e6
    client.close()
    return out


def bench_resp(url: str, n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    async def main() -> None:
        conn = await resp.connect(resp.Address(url), timeout_s=5)
        try:
            for _ in range(200):
                await conn.call("GET", KEY)
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await conn.call("GET", KEY)
            out["get"] = (time.process_time() - c0) / n * 1e6
            out["get_wall"] = (time.perf_counter() - w0) / n * 1e6
            batch = [("GET", KEY)] * 16
            c0 = time.process_time()
            for _ in range(n // 16):
                await conn.pipeline(batch)
            out["pipelined16"] = (time.process_time() - c0) / (n // 16 * 16) * 1e6
        finally:
            conn.close()

    trio.run(main)
    return out


def bench_backend(url: str, n: int) -> dict[str, float]:
    out: dict[str, float] = {}

    async def main() -> None:
        kv = RedisBackend(RedisOptions(url=url, key_prefix="prism_bench:"), namespace="b")
        await kv.open()
        try:
            await kv.put_items("r1", [ItemWrite(b"k", b"\x00\x11\x22\x33")], Stamp(1), 0)
            for _ in range(200):
                await kv.get_items(
                    "r1",
                    MatchAll(),
                    reverse=False,
                    after=None,
                    limit_items=100,
                    limit_bytes=1 << 20,
                    now_ms=0,
                )
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                await kv.get_items(
                    "r1",
                    MatchAll(),
                    reverse=False,
                    after=None,
                    limit_items=100,
                    limit_bytes=1 << 20,
                    now_ms=0,
                )
            out["get"] = (time.process_time() - c0) / n * 1e6
            out["get_wall"] = (time.perf_counter() - w0) / n * 1e6
        finally:
            await kv.aclose()

    trio.run(main)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("-n", type=int, default=20000)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "redis_driver_cpu.json"))
    args = ap.parse_args()
    redis.Redis.from_url(args.url).set(KEY, b"\x00\x11\x22\x33")
    results = {
        "redis-py sync": bench_redis_py(args.url, args.n),
        "resp (trio + hiredis)": bench_resp(args.url, args.n),
        "RedisBackend.get_items (Lua read)": bench_backend(args.url, args.n),
    }
    print(f"{'path':36} {'GET cpu/wall us':>18} {'pipelined x16 cpu us':>22}")
    for path, r in results.items():
        print(f"{path:36} {r['get']:8.1f} /{r['get_wall']:7.1f}  {r.get('pipelined16', float('nan')):14.1f}")
    Path(args.out).write_text(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()
