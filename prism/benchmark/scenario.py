"""The scenario file of ``prism bench``: what to serve, what to send, how hard.

A scenario is TOML, decoded strictly (msgspec): an unknown field or a bad
value is refused with one line naming the field (``load.concurrency[2]: 0
must be >= 1``), as ``prism serve`` refuses a bad config. Its parts:

- ``[[namespaces]]``: the same tables as prism.toml's (``prism.config``
  decodes and checks them): name, abstraction, backend, options, cache;
- ``[server]``: how the bench runs ``prism serve`` when it starts its own
  (no ``--target``): workers, the CPUs the server is pinned to, the CPUs
  the load generator is pinned to;
- ``[workload]``: the namespace loaded, the operation mix (weights), value
  sizes, how many records (keys, series, topics) and how keys are picked
  (uniform, or zipf with a skew);
- ``[load]``: a concurrency ladder (closed loop: calls in flight) or an
  offered-rate ladder (open loop: calls/s), a duration per step.

Example (``bench/scenarios/`` has one per backend and abstraction)::

    name = "memory-kv"
    [[namespaces]]
    name = "bench"
    backend = "memory"
    [workload.mix]
    get = 90
    put = 10
    [load]
    concurrency = [1, 8, 32, 128]
    duration_s = 10
"""

from __future__ import annotations

import math
import os
import tomllib
from typing import Any

import msgspec

from prism.config.fields import FieldError
from prism.config.namespaces import NamespaceConfig, validate_namespaces
from prism.config.server import CacheTableConfig
from prism.errors import ConfigError
from prism.validation import one_line, rephrase

# Which abstraction serves each operation.
OPERATIONS: dict[str, str] = {
    "get": "keyvalue",
    "put": "keyvalue",
    "scan": "keyvalue",
    "write_events": "timeseries",
    "read_events": "timeseries",
    "publish": "pubsub",
}
DISTRIBUTIONS = ("uniform", "zipf")
MODES = ("closed", "open")
MAX_VALUE_BYTES = 60_000  # one request fits the default HTTP/2 stream window (65,535)
MAX_RECORDS = 10_000_000
MAX_ZIPF_RECORDS = 1_000_000  # the generator draws zipf keys from a table of cumulative weights
QUICK_DURATION_S = 1.0
QUICK_WARMUP_S = 0.3
QUICK_MAX_STEPS = 3


class Mix(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Relative weights of the operations (0: not sent)."""

    get: float = 0.0
    put: float = 0.0
    scan: float = 0.0
    write_events: float = 0.0
    read_events: float = 0.0
    publish: float = 0.0

    def weights(self) -> dict[str, float]:
        """The operations sent, with their weights, in OPERATIONS' order."""
        return {op: getattr(self, op) for op in OPERATIONS if getattr(self, op) > 0}


class Workload(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What each call does.

    ``records``: KeyValue records (one item each), TimeSeries series, or
    PubSub topics; ``value_bytes``: an item's value, an event's payload, a
    message's payload; ``events_per_series``: events seeded in each series
    that ``read_events`` reads (all of them, in one page); ``scan_limit``:
    records per ``scan`` page.
    """

    namespace: str = ""  # default: the first namespace
    mix: Mix = Mix(get=1.0)
    records: int = 1000
    value_bytes: int = 100
    key_distribution: str = "uniform"
    zipf_skew: float = 0.99
    events_per_series: int = 10
    scan_limit: int = 10


class Load(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ladder: one step per concurrency (closed) or per rate (open).

    Closed loop: ``concurrency`` calls in flight, spread over connections of
    ``streams_per_connection`` streams. Open loop: ``rates`` calls/s, sent on
    a fixed schedule over ``connections`` connections whatever the answers
    do; latency counts from the scheduled time (no coordinated omission).
    """

    mode: str = "closed"
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    rates: tuple[float, ...] = ()
    streams_per_connection: int = 16
    connections: int = 8  # open loop
    duration_s: float = 10.0
    warmup_s: float = 2.0
    processes: int = 0  # load generator processes; 0: one per load CPU


class Server(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``prism serve`` as the bench starts it (ignored with ``--target``).

    ``cpus``: the server's CPUs (default: CPU 0 on a machine with 2 or
    more); ``load_cpus``: the load generator's (default: the others);
    ``cache``: prism.toml's ``[cache]`` table (the shared cache's size), as
    a plan writes it (default: prism serve's).
    """

    workers: int = 1
    cpus: tuple[int, ...] | None = None
    load_cpus: tuple[int, ...] | None = None
    max_concurrent_streams: int = 100
    cache: CacheTableConfig | None = None


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole scenario file."""

    name: str
    namespaces: tuple[NamespaceConfig, ...]
    description: str = ""
    server: Server = Server()
    workload: Workload = Workload()
    load: Load = Load()

    @property
    def namespace(self) -> NamespaceConfig:
        """The namespace the workload loads."""
        wanted = self.workload.namespace or self.namespaces[0].name
        return next(ns for ns in self.namespaces if ns.name == wanted)

    def steps(self, quick: bool) -> tuple[float, ...]:
        """The ladder's values (concurrencies or rates); ``quick`` keeps at most 3."""
        values: tuple[float, ...] = self.load.concurrency if self.load.mode == "closed" else self.load.rates
        if quick and len(values) > QUICK_MAX_STEPS:
            last = len(values) - 1
            values = tuple(values[round(i * last / (QUICK_MAX_STEPS - 1))] for i in range(QUICK_MAX_STEPS))
        return values

    def durations(self, quick: bool) -> tuple[float, float]:
        """(warm-up, measured) seconds per step."""
        if quick:
            return min(self.load.warmup_s, QUICK_WARMUP_S), min(self.load.duration_s, QUICK_DURATION_S)
        return self.load.warmup_s, self.load.duration_s


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """Read, decode and check a scenario file; ConfigError (one line) when it is wrong."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {one_line(str(exc))}") from None
    return parse_scenario(data)


def parse_scenario(data: dict[str, Any]) -> Scenario:
    """Decode and check a scenario from plain data (a parsed TOML document)."""
    try:
        scenario = msgspec.convert(data, Scenario, strict=True)
    except FieldError:
        raise
    except msgspec.ValidationError as exc:
        field, reason = rephrase(str(exc))
        raise ConfigError(f"{field or 'scenario'}: {reason}") from None
    check(scenario)
    return scenario


def check(s: Scenario) -> None:
    """What types alone cannot say; FieldError naming the first bad field."""
    if not s.name.strip():
        raise FieldError("name", "must not be empty")
    if not s.namespaces:
        raise FieldError("namespaces", "at least one namespace is required")
    validate_namespaces(s.namespaces, "namespaces", set())
    _check_workload(s)
    _check_load(s.load)
    _check_server(s.server, s)


def _check_workload(s: Scenario) -> None:
    w = s.workload
    names = [ns.name for ns in s.namespaces]
    if w.namespace and w.namespace not in names:
        raise FieldError("workload.namespace", f"{w.namespace!r} is not one of the namespaces ({names})")
    weights = w.mix.weights()
    for op in OPERATIONS:
        value = getattr(w.mix, op)
        if not (math.isfinite(value) and value >= 0):
            raise FieldError(f"workload.mix.{op}", f"{value} must be a weight >= 0")
    if not weights:
        raise FieldError("workload.mix", "no operation has a weight > 0")
    abstraction = s.namespace.abstraction
    for op in weights:
        if OPERATIONS[op] != abstraction:
            raise FieldError(
                f"workload.mix.{op}",
                f"is a {OPERATIONS[op]} operation; namespace {s.namespace.name!r} is {abstraction}",
            )
    if not 1 <= w.records <= MAX_RECORDS:
        raise FieldError("workload.records", f"{w.records} out of range (1-{MAX_RECORDS})")
    if not 1 <= w.value_bytes <= MAX_VALUE_BYTES:
        raise FieldError("workload.value_bytes", f"{w.value_bytes} out of range (1-{MAX_VALUE_BYTES})")
    if w.key_distribution not in DISTRIBUTIONS:
        raise FieldError(
            "workload.key_distribution", f"{w.key_distribution!r} is not one of {', '.join(DISTRIBUTIONS)}"
        )
    if not (math.isfinite(w.zipf_skew) and 0 < w.zipf_skew <= 5):
        raise FieldError("workload.zipf_skew", f"{w.zipf_skew} out of range (> 0, <= 5)")
    if w.key_distribution == "zipf" and w.records > MAX_ZIPF_RECORDS:
        raise FieldError(
            "workload.records", f"{w.records}: zipf keys are drawn from at most {MAX_ZIPF_RECORDS:,}"
        )
    if not 1 <= w.events_per_series <= 1000:
        raise FieldError("workload.events_per_series", f"{w.events_per_series} out of range (1-1000)")
    if not 1 <= w.scan_limit <= 1000:
        raise FieldError("workload.scan_limit", f"{w.scan_limit} out of range (1-1000)")
    if "read_events" in weights and w.records * w.events_per_series > 1_000_000:
        raise FieldError(
            "workload.records", "read_events seeds records x events_per_series <= 1,000,000 events"
        )


def _check_load(load: Load) -> None:
    if load.mode not in MODES:
        raise FieldError("load.mode", f"{load.mode!r} is not one of {', '.join(MODES)}")
    if load.mode == "closed":
        if not load.concurrency:
            raise FieldError("load.concurrency", "a closed-loop ladder needs at least one step")
        for i, c in enumerate(load.concurrency):
            if not 1 <= c <= 100_000:
                raise FieldError(f"load.concurrency[{i}]", f"{c} out of range (1-100000)")
        if load.rates:
            raise FieldError("load.rates", 'is for mode = "open"')
    else:
        if not load.rates:
            raise FieldError("load.rates", "an open-loop ladder needs at least one rate (calls/s)")
        for i, r in enumerate(load.rates):
            if not (math.isfinite(r) and 0 < r <= 10_000_000):
                raise FieldError(f"load.rates[{i}]", f"{r} out of range (> 0, <= 10000000 calls/s)")
    if not 1 <= load.streams_per_connection <= 1000:
        raise FieldError(
            "load.streams_per_connection", f"{load.streams_per_connection} out of range (1-1000)"
        )
    if not 1 <= load.connections <= 10_000:
        raise FieldError("load.connections", f"{load.connections} out of range (1-10000)")
    if not (math.isfinite(load.duration_s) and 0 < load.duration_s <= 3600):
        raise FieldError("load.duration_s", f"{load.duration_s} out of range (> 0, <= 3600 s)")
    if not (math.isfinite(load.warmup_s) and 0 <= load.warmup_s <= 600):
        raise FieldError("load.warmup_s", f"{load.warmup_s} out of range (0-600 s)")
    if not 0 <= load.processes <= 256:
        raise FieldError("load.processes", f"{load.processes} out of range (0-256; 0: one per load CPU)")


def _check_server(server: Server, s: Scenario) -> None:
    if not 1 <= server.workers <= 1024:
        raise FieldError("server.workers", f"{server.workers} out of range (1-1024)")
    if server.workers > 1 and any(ns.backend == "memory" for ns in s.namespaces):
        raise FieldError("server.workers", "the memory backend holds data in one worker: needs workers = 1")
    for field in ("cpus", "load_cpus"):
        cpus = getattr(server, field)
        if cpus is not None:
            if not cpus:
                raise FieldError(f"server.{field}", "must name at least one CPU (or be left out)")
            if any(cpu < 0 for cpu in cpus):
                raise FieldError(f"server.{field}", "CPU numbers must be >= 0")
    if server.cache is not None:
        if not 512 <= server.cache.slot_bytes <= 16 << 20:
            raise FieldError(
                "server.cache.slot_bytes", f"{server.cache.slot_bytes} out of range (512-16777216)"
            )
        if not server.cache.slot_bytes * 4 <= server.cache.total_bytes <= 64 << 30:
            raise FieldError(
                "server.cache.total_bytes",
                f"{server.cache.total_bytes} out of range (4 slots to 64 GiB)",
            )
    if not 1 <= server.max_concurrent_streams <= 100_000:
        raise FieldError(
            "server.max_concurrent_streams", f"{server.max_concurrent_streams} out of range (1-100000)"
        )
