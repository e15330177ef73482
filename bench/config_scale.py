"""Configuration scale: ``prism serve`` with many namespaces, against a small config.

For each config (``--namespaces`` over ``--tenants`` memory namespaces, then
one namespace per tenant, then a single namespace) this starts ``prism
serve``, times READY (``/readyz`` answers 200), reloads (SIGHUP with one
namespace added) and times until the new namespace answers, then makes
``--calls`` sequential GetItems on tenant t0's first namespace over a
connection handed to t0 (``:authority`` t0.prism) and reports CPU per call
(utime + stime from ``/proc``) of the whole server tree, which includes
every idle worker's heartbeats, and of t0's worker alone, which serves the
calls. Prints one line per config and writes JSON.

    python bench/config_scale.py --namespaces 10000 --tenants 20 --out bench/results/config_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from prism.proto import kv_pb2, kv_pb2_grpc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def config_text(admin_port: int, tenants: int, per_tenant: int, extra: str = "") -> str:
    parts = [f'admin_listen = "127.0.0.1:{admin_port}"\n']
    for t in range(tenants):
        ns = [f'{{ name = "n{t}_{i}", backend = "memory" }}' for i in range(per_tenant)]
        if t == 0 and extra:
            ns.append(f'{{ name = "{extra}", backend = "memory" }}')
        parts.append(f'[[tenants]]\nname = "t{t}"\nworkers = 1\nnamespaces = [{", ".join(ns)}]\n')
    return "\n".join(parts)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(root: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{root}/task/{root}/children").read_text().split()]
    except OSError:
        return []


def tenant_workers(root: int, tenant: str) -> list[int]:
    """The workers of ``tenant``, by their label ``ID:TENANT@cpuN``: in the
    environment of an exec'd worker (``PRISM_WORKER``), in ``/proc/PID/comm``
    (its first 15 characters) of one the worker template forked."""
    found = []
    for pid in children(root):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        except OSError:
            continue
        label = next((v[len(b"PRISM_WORKER=") :] for v in environ if v.startswith(b"PRISM_WORKER=")), comm)
        if b":" in label and label.split(b":", 1)[1].split(b"@")[0] == tenant.encode():
            found.append(pid)
    return found


def ticks(pids: list[int]) -> int:
    """utime + stime of ``pids``, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def run(tenants: int, per_tenant: int, calls: int, workdir: Path) -> dict[str, float]:
    port, admin_port = free_port(), free_port()
    path = workdir / f"prism-{tenants}x{per_tenant}.toml"
    path.write_text(config_text(admin_port, tenants, per_tenant))
    cmd = [sys.executable, "-m", "prism.cli", "serve", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--data-dir", str(workdir / "data"), "--config", str(path)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        while not ready(admin_port):
            if proc.poll() is not None or time.monotonic() - started > 120:
                raise RuntimeError(f"prism serve did not become ready (exit {proc.poll()})")
            time.sleep(0.02)
        ready_s = time.monotonic() - started
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", [("grpc.default_authority", "t0.prism")])
        stub = kv_pb2_grpc.KeyValueStub(channel)
        # Reload: one namespace more for t0; timed until it answers.
        path.write_text(config_text(admin_port, tenants, per_tenant, extra="added"))
        reloaded = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        while True:
            try:
                stub.GetItems(kv_pb2.GetItemsRequest(namespace="added", id="r"), timeout=5)
                break
            except grpc.RpcError:
                if time.monotonic() - reloaded > 60:
                    raise
                time.sleep(0.02)
        reload_s = time.monotonic() - reloaded
        request = kv_pb2.GetItemsRequest(namespace="n0_0", id="r")
        for _ in range(200):  # warm up
            stub.GetItems(request, timeout=5)
        tree = [proc.pid, *children(proc.pid)]
        serving = tenant_workers(proc.pid, "t0")
        before, before_worker = ticks(tree), ticks(serving)
        for _ in range(calls):
            stub.GetItems(request, timeout=5)
        cpu_us = (ticks(tree) - before) * 1_000_000 / CLK_TCK / calls
        worker_us = (ticks(serving) - before_worker) * 1_000_000 / CLK_TCK / calls
        channel.close()
        return {
            "ready_s": ready_s,
            "reload_s": reload_s,
            "server_cpu_us_per_call": cpu_us,
            "t0_worker_cpu_us_per_call": worker_us,
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--namespaces", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tenants, per_tenant in (
            ("large", args.tenants, args.namespaces // args.tenants),
            ("one_per_tenant", args.tenants, 1),
            ("one", 1, 1),
        ):
            results[label] = {"tenants": tenants, "namespaces": tenants * per_tenant}
            results[label] |= run(tenants, per_tenant, args.calls, Path(tmp))
            print(label, json.dumps(results[label]), flush=True)
    for small in ("one_per_tenant", "one"):
        for measure in ("server_cpu_us_per_call", "t0_worker_cpu_us_per_call"):
            ratio = results["large"][measure] / results[small][measure]
            results[f"{measure}_ratio_large_vs_{small}"] = ratio
            print(f"{measure}, large / {small}: {ratio:.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
