"""Replay issue 11's abusive clients against a real ``prism serve`` (1 worker).

    python bench/abuse.py [--cases rapid_reset,ping_flood,...] [--out bench/results/abuse.json]

Each case gets a fresh server (1 worker, SQLite namespace ``bench``), pinned
to CPU 0 like the other benchmarks; this process runs on CPU 1. The abuser
is a child process (this file with ``--abuser CASE``) writing raw HTTP/2
frames on plain sockets, so that its own work does not share a GIL with the
neighbour: a grpcio client on its own connection calling ``GetItems`` one
call at a time throughout the case. Per case it records:

- ``worker_cpu_s``: the worker's CPU time (utime + stime) over the case,
  the neighbour's calls included (``neighbour.calls`` says how many);
- ``worker_rss_mb``: its RSS before, at the peak (``VmHWM`` and 20 ms
  samples of ``VmRSS``) and after the abuser's connections closed;
- ``goaway``: the GOAWAY the abuser read (error code, debug data), if any,
  and ``seconds_to_end``: from its first flood byte to that GOAWAY or to the
  server closing the connection (None: still open when the case ended);
- ``neighbour``: calls, errors, p50 and p99 latency during the case.

The cases (issue 11's first section): ``rapid_reset`` (200,000 HEADERS+
RST_STREAM), ``ping_flood`` (1,000,000 PINGs, a call open, never reading),
``settings_flood`` (50,000 SETTINGS), ``empty_data`` (100,000 empty DATA
frames on an open stream), ``half_prefaces`` (2,000 connections sending half
the preface and 2,000 idle after a whole one, held 15 s) and ``slow_bodies``
(100 streams each sending all but the last byte of a 4 MB message, held 5 s).
The last two are other parts of issue 11 (connection timeouts, memory
budgets): they are run and recorded as the code handles them today.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
from bench_load import machine_info
from bench_servers import (
    GET_ITEMS,
    PrismServer,
    ServerFailed,
    make_prism,
    pin_benchmark,
    process_role,
    process_tree,
    seed,
)
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from prism.proto import kv_pb2

SERVER_CPU, LOAD_CPU = 0, 1
NAMESPACE = "bench"
CONFIG = f'workers = 1\n[[namespaces]]\nname = "{NAMESPACE}"\nbackend = "sqlite"\n'
PUT_ITEMS = "/prism.kv.v1.KeyValue/PutItems"
CASES = ("rapid_reset", "ping_flood", "settings_flood", "empty_data", "half_prefaces", "slow_bodies")
CASE_TIMEOUT_S = 30.0
HOLD_S = {"half_prefaces": 15.0, "slow_bodies": 5.0}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def request_headers(path: str = GET_ITEMS) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "bench"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


# ---------------------------------------------------------------- the abuser (child process)


class Raw:
    """A client connection that writes frames as told and reads in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        self.sock.sendall(conn.data_to_send())
        self.encoder = hpack.Encoder()
        self.encoded = 0
        self.block = b""
        self.goaway: dict[str, Any] | None = None
        self.ended_at: float | None = None

    def start_reading(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = bytearray()
        try:
            while data := self.sock.recv(1 << 20):
                buf += data
                pos = 0
                while len(buf) - pos >= 9:
                    length = int.from_bytes(buf[pos : pos + 3], "big")
                    if len(buf) - pos < 9 + length:
                        break
                    if buf[pos + 3] == 0x7 and self.goaway is None:  # GOAWAY
                        body = bytes(buf[pos + 9 : pos + 9 + length])
                        self.goaway = {
                            "error_code": int.from_bytes(body[4:8], "big"),
                            "debug": body[8:].decode("latin-1"),
                            "last_stream_id": int.from_bytes(body[:4], "big") & 0x7FFFFFFF,
                        }
                        self.ended_at = time.monotonic()
                    pos += 9 + length
                del buf[:pos]
        except OSError:
            pass
        if self.ended_at is None:
            self.ended_at = time.monotonic()

    def send(self, data: bytes) -> bool:
        """False once the server has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            if self.ended_at is None:
                self.ended_at = time.monotonic()
            return False

    def headers(self, sid: int, *, end: bool) -> bytes:
        """A GetItems request's HEADERS (the block is the same bytes from the second on)."""
        if self.encoded < 2:
            self.block = self.encoder.encode(request_headers())
            self.encoded += 1
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return HeadersFrame(sid, data=self.block, flags=flags).serialize()


def flood(port: int, case: str) -> dict[str, Any]:
    raw = Raw(port)
    if case != "ping_flood":  # the PING flooder never reads
        raw.start_reading()
    start = time.monotonic()
    if case == "rapid_reset":
        chunk = bytearray()
        sending = True
        for sid in range(1, 400_000, 2):
            chunk += raw.headers(sid, end=True) + RstStreamFrame(sid, error_code=8).serialize()
            if len(chunk) > 1 << 16:
                sending = raw.send(bytes(chunk))
                chunk.clear()
                if not sending:
                    break
        if sending and chunk:
            raw.send(bytes(chunk))
    elif case == "ping_flood":
        raw.send(raw.headers(1, end=False))
        pings = PingFrame(0, opaque_data=b"abusive!").serialize() * 1000
        for _ in range(1000):
            if not raw.send(pings):
                break
    elif case == "settings_flood":
        settings = SettingsFrame(0).serialize() * 1000
        for _ in range(50):
            if not raw.send(settings):
                break
    elif case == "empty_data":
        raw.send(raw.headers(1, end=False))
        empty = DataFrame(1).serialize() * 1000
        for _ in range(100):
            if not raw.send(empty):
                break
    deadline = start + CASE_TIMEOUT_S
    while raw.ended_at is None and time.monotonic() < deadline:
        time.sleep(0.01)
    raw.sock.close()
    return {
        "goaway": raw.goaway,
        "seconds_to_end": None if raw.ended_at is None else round(raw.ended_at - start, 3),
    }


def half_prefaces(port: int) -> dict[str, Any]:
    socks = []
    for i in range(4000):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(PREFACE[:12] if i % 2 else PREFACE + SettingsFrame(0).serialize())
        sock.setblocking(False)
        socks.append(sock)
    start = time.monotonic()
    closed_at: dict[int, float] = {}
    while time.monotonic() - start < HOLD_S["half_prefaces"] and len(closed_at) < len(socks):
        for i, sock in enumerate(socks):
            if i in closed_at:
                continue
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        closed_at[i] = time.monotonic()
                        break
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic()
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    ends = sorted(t - start for t in closed_at.values())
    return {
        "connections": len(socks),
        "closed_by_server": len(ends),
        "seconds_to_end": round(ends[-1], 3) if len(ends) == len(socks) else None,
    }


def slow_bodies(port: int) -> dict[str, Any]:
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    body = (4 * 1024 * 1024).to_bytes(5, "big") + bytes(4 * 1024 * 1024 - 1)  # one byte short
    pending: dict[int, memoryview] = {}
    for _ in range(100):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, request_headers(PUT_ITEMS))
        pending[sid] = memoryview(body)
    start = time.monotonic()
    sock.settimeout(0.05)
    while pending and time.monotonic() - start < CASE_TIMEOUT_S:
        for sid, rest in list(pending.items()):
            n = min(len(rest), conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if n > 0:
                conn.send_data(sid, rest[:n].tobytes())
                pending[sid] = rest[n:]
            if not pending[sid]:
                del pending[sid]
        sock.sendall(conn.data_to_send())
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            break
        conn.receive_data(data)
    sent_s = time.monotonic() - start
    time.sleep(HOLD_S["slow_bodies"])
    sock.close()
    return {
        "streams": 100,
        "bytes_left_unsent": sum(len(v) for v in pending.values()),
        "seconds_to_send": round(sent_s, 3),
    }


def abuser_main(case: str, port: int) -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    if case == "half_prefaces":
        result = half_prefaces(port)
    elif case == "slow_bodies":
        result = slow_bodies(port)
    else:
        result = flood(port, case)
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------- the measurer


def worker_pid(server: PrismServer) -> int:
    for pid in process_tree(server.pid):
        if process_role(pid, server.pid).startswith("worker"):
            return pid
    raise ServerFailed("no worker process")


def proc_status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ServerFailed(f"no {field} for {pid}")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Neighbour:
    """One grpcio client calling GetItems one call at a time on its own connection."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.call = self.channel.unary_unary(GET_ITEMS)
        self.request = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id="user:1").SerializeToString()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            t0 = time.perf_counter()
            try:
                self.call(self.request, timeout=5)
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            self.latencies.append(time.perf_counter() - t0)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        return {
            "calls": len(lat),
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "p50_ms": round(statistics.median(lat) * 1e3, 3) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1e3, 3) if lat else None,
            "max_ms": round(lat[-1] * 1e3, 3) if lat else None,
        }


def run_case(case: str, workdir: Path, pinned: bool) -> dict[str, Any]:
    server = make_prism(case, workdir, CONFIG, (SERVER_CPU,) if pinned else (), NAMESPACE)
    try:
        server.start()
        server.wait_ready(30)
        seed(server.target, NAMESPACE, "user:1", b"profile", b"v" * 100)
        pid = worker_pid(server)
        neighbour = Neighbour(server.target)
        neighbour.thread.start()
        time.sleep(1.0)  # the neighbour's connection up and warm
        neighbour.latencies.clear()
        rss_before = proc_status_kb(pid, "VmRSS")
        cpu_before = cpu_s(pid)
        peak = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc_status_kb(pid, "VmRSS"))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        abuser = subprocess.run(
            [sys.executable, __file__, "--abuser", case, "--port", str(server.port)],
            capture_output=True,
            timeout=CASE_TIMEOUT_S + 60,
            check=False,
        )
        worker_cpu = cpu_s(pid) - cpu_before
        neighbour.stop.set()
        neighbour.thread.join(10)
        time.sleep(1.0)  # the abuser's connections closed: what is given back
        done.set()
        sampler.join()
        row: dict[str, Any] = {
            "worker_cpu_s": round(worker_cpu, 3),
            "worker_rss_mb": {
                "before": round(rss_before / 1024, 1),
                "peak_sampled": round(peak[0] / 1024, 1),
                "peak_hwm": round(proc_status_kb(pid, "VmHWM") / 1024, 1),
                "after_close": round(proc_status_kb(pid, "VmRSS") / 1024, 1),
            },
            "neighbour": neighbour.summary(),
        }
        neighbour.channel.close()
        if abuser.returncode != 0:
            row["error"] = abuser.stderr.decode(errors="replace")[-2000:]
        else:
            row.update(json.loads(abuser.stdout))
        return row
    except (ServerFailed, grpc.RpcError, OSError, subprocess.TimeoutExpired) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "server_log_tail": server.log_tail()}
    finally:
        server.stop()


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'case':<15} {'cpu s':>7} {'rss MB before/peak/after':>26} {'end s':>7} "
        f"{'goaway':<28} {'nb p99 ms':>9} {'nb err':>6}"
    )
    lines = [head, "-" * len(head)]
    for case, row in results.items():
        if "error" in row:
            lines.append(f"{case:<15} ERROR {row['error'][:80]}")
            continue
        rss = row["worker_rss_mb"]
        peak = max(rss["peak_sampled"], rss["peak_hwm"])
        goaway = row.get("goaway")
        what = f"{goaway['error_code']} {goaway['debug']}" if goaway else "-"
        end = row.get("seconds_to_end")
        lines.append(
            f"{case:<15} {row['worker_cpu_s']:>7.2f} "
            f"{rss['before']:>8.1f}/{peak:>7.1f}/{rss['after_close']:>7.1f} "
            f"{'open' if end is None else f'{end:.2f}':>7} {what:<28} "
            f"{row['neighbour']['p99_ms'] or 0:>9.2f} {row['neighbour']['errors']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "abuse.json")
    parser.add_argument("--abuser", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.abuser:
        return abuser_main(opts.abuser, opts.port)
    cases = [c for c in opts.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    pinned = pin_benchmark({SERVER_CPU}, LOAD_CPU)
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="prism-abuse-") as tmp:
        for case in cases:
            print(f"{case} ...", flush=True)
            workdir = Path(tmp) / case
            workdir.mkdir()
            results[case] = run_case(case, workdir, pinned)
    print()
    print(table(results))
    document = {
        "benchmark": "abuse",
        "machine": machine_info("none"),
        "params": {
            "pinned": pinned,
            "server_cpu": SERVER_CPU if pinned else None,
            "load_cpu": LOAD_CPU if pinned else None,
            "config": CONFIG,
            "hold_s": HOLD_S,
            "case_timeout_s": CASE_TIMEOUT_S,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {opts.out}")
    return 1 if any("error" in row for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
