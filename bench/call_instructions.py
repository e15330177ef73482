"""Instructions per call, counted by valgrind: what a feature costs a call
on a machine too noisy to time it.

    python bench/call_instructions.py [--modes off,on,access] [--calls 500,3000]
        [--tree /path/to/other/checkout]

Each (mode, count) runs a child Python under ``valgrind --tool=cachegrind``
(instruction counts only) that serves ``count`` unary GetItems on a memory
namespace through one in-process ``Connection``: pre-encoded HTTP/2
requests, 64 in flight, answers drained. The difference between the two
counts' instructions, over the difference in calls, is the instructions per
call, start-up cancelled out. Modes: ``off`` (tracing off), ``on``
(``[tracing]`` spans at sample_ratio 0.01, exported to a sink the child
serves), ``access`` (the access log only). ``--tree``: run the children on
another checkout's ``prism`` (its ``off`` is the baseline of an A/B).
Counts are deterministic up to memory layout (``PYTHONHASHSEED=0``); the
figure includes the in-process client's share of each call.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

IN_FLIGHT = 64
MODES = ("off", "on", "access")


def _requests(calls: int) -> list[bytes]:
    """HTTP/2 bytes of ``calls`` GetItems, in batches of ``IN_FLIGHT``."""
    import h2.config
    import h2.connection
    import h2.settings

    from prism.proto import kv_pb2

    message = kv_pb2.GetItemsRequest(namespace="bench", id="user:1").SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/prism.kv.v1.KeyValue/GetItems"),
        (":authority", "bench"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    client.increment_flow_control_window(2**31 - 1 - 65535)
    batches = []
    for first in range(0, calls, IN_FLIGHT):
        for _ in range(min(IN_FLIGHT, calls - first)):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, headers)
            # The server grants window as it reads; this client never reads it.
            client.outbound_flow_control_window = 1 << 30
            client._get_stream_by_id(sid).outbound_flow_control_window = 1 << 20
            client.send_data(sid, body, end_stream=True)
            del client.streams[sid]  # (h2 walks its open streams per new one: quadratic)
        batches.append(client.data_to_send())
    return batches


def _sink() -> str:
    """An OTLP/HTTP endpoint in a thread that accepts every export: its URL."""
    import http.server
    import threading

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1/traces"


def child(calls: int, mode: str) -> None:
    """Serve ``calls`` calls in this process (run under valgrind by ``main``)."""
    import trio
    import trio.testing

    from prism.config import NamespaceConfig, ServerConfig
    from prism.rpc.server import Connection
    from prism.workers.app import App

    extra = {}
    if mode != "off":
        from prism.config.tracing import TracingConfig

        if mode == "on":
            extra["tracing"] = TracingConfig(otlp_endpoint=_sink(), sample_ratio=0.01)
        else:
            extra["tracing"] = TracingConfig(access_log=True)
    namespaces = (NamespaceConfig(name="bench", backend="memory"),)
    config = ServerConfig(data_dir=tempfile.mkdtemp(prefix="prism-calls-"), namespaces=namespaces, **extra)

    async def serve() -> None:
        app = App(config)
        await app.apply(config.namespaces)
        answered = 0
        observe = app.settings.observer
        assert observe is not None

        def count(*args: object) -> None:
            nonlocal answered
            answered += 1
            observe(*args)  # type: ignore[arg-type]

        app.settings.observer = count
        batches = _requests(calls)
        server, client = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Connection(server, app.settings).serve)
            want = 0
            for batch in batches:
                want = min(want + IN_FLIGHT, calls)
                await client.send_all(batch)
                while answered < want:
                    await client.receive_some(1 << 20)
            nursery.cancel_scope.cancel()
        await app.aclose()
        assert answered == calls, (answered, calls)

    trio.run(serve)


def count_instructions(calls: int, mode: str, tree: Path | None) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null"]
    argv += [sys.executable, __file__, "--child", str(calls), mode]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{mode} x {calls}: valgrind failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--calls", default="500,3000", help="two call counts, comma separated")
    parser.add_argument("--tree", type=Path, default=None, help="another checkout whose prism to run")
    parser.add_argument("--child", nargs=2, metavar=("CALLS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: choose from {', '.join(MODES)}")
    try:
        low, high = sorted(int(n) for n in args.calls.split(","))
    except ValueError:
        parser.error("--calls: two call counts, e.g. 500,3000")
    if not 0 < low < high:
        parser.error("--calls: two different counts > 0")
    for mode in modes:
        per_call = (count_instructions(high, mode, args.tree) - count_instructions(low, mode, args.tree)) / (
            high - low
        )
        print(f"{mode:>7}: {per_call:,.0f} instructions per call", flush=True)


if __name__ == "__main__":
    main()
