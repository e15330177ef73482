"""Fallback load generator: grpc.aio clients, for machines without h2load.

It is far slower than h2load (Python on one CPU), so at high concurrency it,
not the server, may be the limit; results say which generator measured them.
Each connection is its own channel with a local subchannel pool, so that
grpcio really opens ``--connections`` TCP connections. Requests and answers
are raw bytes (no protobuf work in the client); an answer counts as a
success only if it equals ``--expect-hex`` byte for byte.

Writes an h2load-format log (``start_us<TAB>status<TAB>latency_us``, status
-1 for a failed call) and prints one JSON line of totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

import grpc


@dataclass
class Totals:
    """Shared by all workers of one run (one event loop: no locking needed)."""

    remaining: int | None
    deadline: float | None
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    data_bytes: int = 0
    elapsed_s: float = 0.0
    rows: list[str] = field(default_factory=list)

    def take(self) -> bool:
        """Claim the next call, if the run is not over."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        if self.remaining is not None:
            if self.remaining <= 0:
                return False
            self.remaining -= 1
        self.started += 1
        return True


async def worker(
    call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, expect: bytes, totals: Totals
) -> None:
    """Issue calls back to back until the run is over."""
    while totals.take():
        start_ns = time.time_ns()
        t0 = time.perf_counter_ns()
        try:
            answer = await call(request)
            ok = answer == expect
        except grpc.aio.AioRpcError:
            ok = False
        latency_us = (time.perf_counter_ns() - t0) // 1000
        if ok:
            totals.succeeded += 1
            totals.data_bytes += 5 + len(answer)
        else:
            totals.failed += 1
        totals.rows.append(f"{start_ns // 1000}\t{200 if ok else -1}\t{latency_us}\n")


async def run(args: argparse.Namespace) -> Totals:
    """Open the connections, run all workers, close the connections."""
    request, expect = bytes.fromhex(args.request_hex), bytes.fromhex(args.expect_hex)
    options: list[tuple[str, str | int]] = [("grpc.use_local_subchannel_pool", 1)]
    if args.authority:
        options.append(("grpc.default_authority", args.authority))
    channels = [grpc.aio.insecure_channel(args.target, options=options) for _ in range(args.connections)]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=10)
        deadline = time.monotonic() + args.duration if args.duration else None
        totals = Totals(remaining=args.requests, deadline=deadline)
        calls = [channel.unary_unary(args.method) for channel in channels]
        t0 = time.perf_counter()  # after connecting, as h2load's timing
        await asyncio.gather(
            *(worker(call, request, expect, totals) for call in calls for _ in range(args.streams))
        )
        totals.elapsed_s = time.perf_counter() - t0
        return totals
    finally:
        for channel in channels:
            await channel.close()


def main() -> None:
    """Parse arguments, run, write the log and print the totals."""
    parser = argparse.ArgumentParser(description="grpc.aio load generator (h2load fallback)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--request-hex", required=True)
    parser.add_argument("--expect-hex", required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--log-file", required=True)
    parser.add_argument("--authority", help=":authority to send (default: the target)")
    args = parser.parse_args()
    if (args.requests is None) == (args.duration is None):
        parser.error("give exactly one of --requests and --duration")
    totals = asyncio.run(run(args))
    with open(args.log_file, "w") as log:
        log.writelines(totals.rows)
    report = {
        "started": totals.started,
        "succeeded": totals.succeeded,
        "failed": totals.failed,
        "data_bytes": totals.data_bytes,
        "elapsed_s": totals.elapsed_s,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
