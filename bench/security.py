"""Benchmark what security costs a call: TLS, and a JWT on every call.

    python bench/security.py [--duration 6] [--runs 3] [--out bench/results/security.json]

Three ``prism serve`` processes, each one worker pinned to CPU 0 with a
memory namespace, answer the same ``GetItems`` (one 100-byte item) to h2load
on CPU 1, 128 calls in flight on long-lived connections (``-c 8 -m 16``):

- ``plain``: plaintext HTTP/2, no authentication;
- ``tls``: TLS (certificates made by trustme for the run), no authentication;
- ``tls_jwt``: TLS, ``[auth] jwt`` and an ``[[access]]`` rule; every call
  carries the same ES256 bearer token (``authorization: Bearer ...``), which
  the worker verifies once and then finds in its token cache.

The three run side by side: the servers start together and their measured
runs alternate (plain, tls, tls_jwt, plain, ...), so that a drift of the
machine affects all alike. CPU per call is the server's whole process tree
(``/proc``), as in ``gateway.py``; every answer is checked by length and the
first and last by content. The ratios: ``tls_vs_plain`` (target at most
1.25) and ``jwt_vs_tls`` (at most 1.1).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import trustme
from bench_load import (
    Concurrency,
    LoadFailed,
    LoadFn,
    Target,
    add_run_options,
    check_run_options,
    grpc_frame,
    load_function,
    machine_info,
    measure_run,
    summarize,
    warm_up,
)
from bench_servers import (
    GET_ITEMS,
    GrpcAccess,
    PrismServer,
    ServerFailed,
    fetch_checked_answer,
    make_prism,
    pin_benchmark,
    seed,
)
from cryptography.hazmat.primitives.asymmetric import ec

from prism.proto import kv_pb2

HERE = Path(__file__).resolve().parent
NAMESPACE, RECORD_ID, ITEM_KEY = "bench", "user:1", b"profile"
SEED_VALUE = bytes((i * 37 + 11) % 256 for i in range(100))
EXPECTED = [(ITEM_KEY, SEED_VALUE)]
CONCURRENCY = Concurrency("c128", 8, 16)
SERVER_CPU, LOAD_CPU = 0, 1
SERVER_NAME = "prism.bench"  # the name in the server certificate
ISSUER, AUDIENCE, PRINCIPAL = "https://idp.bench", "prism", "bench-client"
SCENARIOS = ("plain", "tls", "tls_jwt")
TARGETS = {"tls_vs_plain": 1.25, "jwt_vs_tls": 1.1}


@dataclass(frozen=True)
class Secrets:
    """What the run made for itself: the CA, the server's files, the JWKS and a token."""

    ca_pem: bytes
    cert_file: Path
    key_file: Path
    jwks_file: Path
    token: str


def make_secrets(workdir: Path) -> Secrets:
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME)
    cert_file, key_file = workdir / "server.pem", workdir / "server.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks_file = workdir / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [{**public, "kid": "bench", "alg": "ES256", "use": "sig"}]}))
    claims = {"sub": PRINCIPAL, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 24 * 3600}
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"})
    return Secrets(ca.cert_pem.bytes(), cert_file, key_file, jwks_file, token)


def config(scenario: str, secrets: Secrets) -> str:
    """The TOML body of a scenario's server (``make_prism`` adds the admin port)."""
    body = f'workers = 1\n[[namespaces]]\nname = "{NAMESPACE}"\nbackend = "memory"\n'
    if scenario in ("tls", "tls_jwt"):
        body += f'[tls]\ncert_file = "{secrets.cert_file}"\nkey_file = "{secrets.key_file}"\n'
    if scenario == "tls_jwt":
        body += (
            f'[auth]\njwt = {{ jwks_file = "{secrets.jwks_file}", issuer = "{ISSUER}", '
            f'audience = "{AUDIENCE}" }}\n'
            f'[[access]]\nprincipals = ["{PRINCIPAL}"]\nnamespaces = ["{NAMESPACE}"]\n'
            'allow = ["read", "write"]\n'
        )
    return body


def access(scenario: str, secrets: Secrets) -> GrpcAccess | None:
    if scenario == "plain":
        return None
    metadata = (("authorization", f"Bearer {secrets.token}"),) if scenario == "tls_jwt" else ()
    return GrpcAccess(secrets.ca_pem, SERVER_NAME, metadata)


@dataclass
class Phase:
    scenario: str
    server: PrismServer
    access: GrpcAccess | None
    load: LoadFn | None = None
    frame_len: int = 0
    requests: int = 0
    runs: list[dict[str, float]] = field(default_factory=list)
    loadgen_us: list[float] = field(default_factory=list)


def run(opts: argparse.Namespace, loadgen: str, pinned: bool, workdir: Path) -> dict[str, dict[str, Any]]:
    """Start the three servers, check and measure them alternately, stop them."""
    secrets = make_secrets(workdir)
    request = kv_pb2.GetItemsRequest(namespace=NAMESPACE, id=RECORD_ID).SerializeToString()
    body_file = workdir / "get_items.body"
    body_file.write_bytes(grpc_frame(request))
    cpus = (SERVER_CPU,) if pinned else ()
    phases = []
    for scenario in SCENARIOS:
        scenario_dir = workdir / scenario
        scenario_dir.mkdir()
        grpc_access = access(scenario, secrets)
        server = make_prism(scenario, scenario_dir, config(scenario, secrets), cpus, NAMESPACE, grpc_access)
        phases.append(Phase(scenario, server, grpc_access))
    results: dict[str, dict[str, Any]] = {p.scenario: {} for p in phases}
    try:
        for phase in phases:
            phase.server.start()
        for phase in phases:
            server = phase.server
            server.wait_ready(opts.ready_timeout)
            seed(server.target, NAMESPACE, RECORD_ID, ITEM_KEY, SEED_VALUE, access=phase.access)
            answer = fetch_checked_answer(server.target, request, EXPECTED, access=phase.access)
            headers = (
                tuple(f"{name}: {value}" for name, value in phase.access.metadata) if phase.access else ()
            )
            scheme = "https" if phase.access else "http"
            target = Target("127.0.0.1", server.port, GET_ITEMS, request, body_file, None, scheme, headers)
            phase.load = load_function(loadgen, target, answer)
            phase.frame_len = 5 + len(answer)
            log = workdir / f"{phase.scenario}.log"
            phase.requests = warm_up(phase.load, CONCURRENCY, log, opts.warmup, opts.duration)
        for _ in range(opts.runs):
            for phase in phases:
                assert phase.load is not None
                log = workdir / f"{phase.scenario}.log"
                metrics, details = measure_run(
                    phase.server, phase.load, CONCURRENCY, log, phase.requests, phase.frame_len, {LOAD_CPU}
                )
                phase.runs.append(metrics)
                phase.loadgen_us.append(details.loadgen_cpu_us_per_call)
        for phase in phases:  # still right after the load
            fetch_checked_answer(phase.server.target, request, EXPECTED, access=phase.access)
            results[phase.scenario] = summarize(CONCURRENCY, phase.requests, phase.runs)
            results[phase.scenario]["loadgen_cpu_us_per_call"] = statistics.median(phase.loadgen_us)
    except (ServerFailed, LoadFailed, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"FAILED: {error}", file=sys.stderr, flush=True)
        for phase in phases:
            results[phase.scenario] = {"error": error, "server_log_tail": phase.server.log_tail()}
    finally:
        for phase in phases:
            phase.server.stop()
    return results


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def ratio(ours: str, base: str) -> float | None:
        a, b = results.get(ours, {}).get("cpu_us_per_call"), results.get(base, {}).get("cpu_us_per_call")
        return round(a / b, 3) if a and b else None

    return {"tls_vs_plain": ratio("tls", "plain"), "jwt_vs_tls": ratio("tls_jwt", "tls")}


def table(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None]) -> str:
    fmt = "{:<8} {:>9} {:>8} {:>8} {:>12} {:>9}"
    lines = [fmt.format("scenario", "calls/s", "p50 us", "p99 us", "CPU us/call", "others %")]
    for name, row in results.items():
        if "cpu_us_per_call" not in row:
            lines.append(f"{name:<8} (failed: {row.get('error', '?')})")
            continue
        lines.append(
            fmt.format(
                name,
                f"{row['calls_per_s']:,.0f}",
                f"{row['p50_us']:,.0f}",
                f"{row['p99_us']:,.0f}",
                f"{row['cpu_us_per_call']:,.1f}",
                f"{row['other_on_server_cpu_pct']:.0f}",
            )
        )
    for name, target in TARGETS.items():
        value = ratio_values[name]
        if value is None:
            lines.append(f"ratio {name}: n/a (target <= {target:g})")
        else:
            verdict = "met" if value <= target else f"MISSED by {value / target - 1:.0%}"
            lines.append(f"ratio {name}: {value:.2f} (target <= {target:g}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_run_options(parser, out=HERE / "results" / "security.json", duration_s=6.0, unit="run")
    args = parser.parse_args(argv)
    loadgen = check_run_options(parser, args)
    if loadgen != "h2load":
        parser.error("needs h2load (apt-get install nghttp2-client): the Python client speaks no TLS here")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    pinned = pin_benchmark({SERVER_CPU}, LOAD_CPU)
    started = time.time()
    print(
        f"measuring {', '.join(SCENARIOS)} ({args.runs} x {args.duration:g}s each, alternating)", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="prism-security-") as tmp:
        results = run(args, loadgen, pinned, Path(tmp))
    ratio_values = ratios(results)
    print()
    print(table(results, ratio_values))
    document = {
        "benchmark": "security",
        "machine": machine_info(loadgen),
        "params": {
            "duration_s": args.duration, "runs": args.runs, "warmup_s": args.warmup, "method": GET_ITEMS,
            "namespace": NAMESPACE, "backend": "memory", "value_bytes": len(SEED_VALUE), "pinned": pinned,
            "concurrency": {"clients": CONCURRENCY.clients, "streams": CONCURRENCY.streams},
            "token_algorithm": "ES256",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
        },
        "results": results,
        "ratios": ratio_values,
        "targets": TARGETS,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if any("error" in row for row in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
