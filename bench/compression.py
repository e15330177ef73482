"""What gzip costs the server: 1 MiB PutItems and GetItems, identity against gzip.

    python bench/compression.py [--size 1048576] [--calls 50] [--runs 3] [--out FILE]

A grpcio client (one call at a time, on CPU 1) puts and gets one item of
``--size`` bytes, uncompressed and with ``compression=grpc.Compression.Gzip``
(the request compressed by the client, the answer by the server: the client
compressed its request), against ``prism serve`` (one worker, memory
backend, pinned to CPU 0). Two values: ``text`` (repetitive records, which
deflate ~17:1) and ``random`` (incompressible: the server's probe gives up
after 16 KiB and answers uncompressed). The figure is the server's CPU per
call (its whole process tree), median of ``--runs``; the client's own
compression is not the server's and is not counted. Every answer is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from bench_load import machine_info
from bench_servers import make_prism, ticks_to_us

from prism.proto import kv_pb2, kv_pb2_grpc

HERE = Path(__file__).resolve().parent
NAMESPACE = "bench"
CONFIG_TOML = f'workers = 1\n[[namespaces]]\nname = "{NAMESPACE}"\nbackend = "memory"\n'
COMPRESSIONS = {"identity": grpc.Compression.NoCompression, "gzip": grpc.Compression.Gzip}


def values(size: int) -> dict[str, bytes]:
    text = b"".join(b'{"id": %d, "name": "user %d", "plan": "basic"}\n' % (i, i) for i in range(size // 30))
    return {"text": text[:size], "random": os.urandom(size)}


def measure(server: Any, call: Any, calls: int) -> float:
    """Server CPU per call (us) over ``calls`` calls."""
    before = server.cpu_ticks()
    for _ in range(calls):
        call()
    return ticks_to_us(server.cpu_ticks() - before) / calls


def bench_case(
    server: Any, stub: kv_pb2_grpc.KeyValueStub, case: str, value: bytes, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """PutItems, then GetItems, of ``value``: ``{"put_<case>": ..., "get_<case>": ...}``."""
    put = kv_pb2.PutItemsRequest(namespace=NAMESPACE, id=case, items=[kv_pb2.Item(key=b"k", value=value)])
    get = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id=case)

    def put_item() -> None:
        stub.PutItems(put, timeout=30)

    def get_item() -> None:
        if [i.value for i in stub.GetItems(get, timeout=30).items] != [value]:
            raise SystemExit(f"{case}: GetItems answered another value")

    out: dict[str, dict[str, Any]] = {}
    for op, call in (("put", put_item), ("get", get_item)):
        measure(server, call, 3)  # warm-up
        runs = [measure(server, call, args.calls) for _ in range(args.runs)]
        out[f"{op}_{case}"] = {"cpu_us_per_call": statistics.median(runs), "runs": runs}
        print(f"  {op}_{case}: {statistics.median(runs):,.0f} us/call", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="value bytes (default 1 MiB)")
    parser.add_argument("--calls", type=int, default=50, help="calls per measured run")
    parser.add_argument("--runs", type=int, default=3, help="runs per case; medians reported")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "compression.json")
    args = parser.parse_args(argv)
    two_cpus = len(os.sched_getaffinity(0)) >= 2
    if two_cpus:
        os.sched_setaffinity(0, {1})
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prism-compression-") as tmp:
        server = make_prism("prism", Path(tmp), CONFIG_TOML, (0,) if two_cpus else (), NAMESPACE)
        server.start()
        try:
            server.wait_ready(30)
            for label, value in values(args.size).items():
                for encoding, compression in COMPRESSIONS.items():
                    with grpc.insecure_channel(server.target, compression=compression) as channel:
                        stub = kv_pb2_grpc.KeyValueStub(channel)
                        results.update(bench_case(server, stub, f"{label}_{encoding}", value, args))
        finally:
            server.stop()
    ratios = {
        f"{op}_{label}_gzip/identity": round(
            results[f"{op}_{label}_gzip"]["cpu_us_per_call"]
            / results[f"{op}_{label}_identity"]["cpu_us_per_call"],
            2,
        )
        for op in ("put", "get")
        for label in ("text", "random")
    }
    print("server CPU per call, gzip / identity:", ", ".join(f"{k} {v}" for k, v in ratios.items()))
    report = {
        "machine": machine_info("grpcio"),
        "size": args.size,
        "calls": args.calls,
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
