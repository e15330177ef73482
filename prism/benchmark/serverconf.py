"""The ``prism serve`` a scenario asks for: its config file, and who runs on which CPU."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from prism.benchmark.scenario import Scenario
from prism.benchmark.servers import PrismServer, make_prism
from prism.config.namespaces import NamespaceConfig


@dataclass(frozen=True)
class Placement:
    """The server's CPUs and the load generator's (None: not pinned)."""

    server: tuple[int, ...] | None
    load: tuple[int, ...] | None
    warning: str | None = None


def place(scenario: Scenario, own_server: bool) -> Placement:
    """Where the server and the load run: the scenario's CPUs, else CPU 0 for the
    server and the rest for the load (on a machine with 2 CPUs or more).

    When the CPUs asked for are not all available, nothing is pinned and the
    warning says so (the numbers are then not comparable with pinned runs).
    """
    available = os.sched_getaffinity(0)
    server = scenario.server.cpus if own_server else None
    load = scenario.server.load_cpus
    if server is None and own_server and len(available) >= 2:
        server = (min(available),)
    if load is None:
        rest = tuple(sorted(available - set(server or ())))
        load = rest or None
    wanted = set(server or ()) | set(load or ())
    if not wanted <= available:
        missing = ",".join(str(c) for c in sorted(wanted - available))
        return Placement(None, None, f"CPUs {missing} are not available to this process: nothing pinned")
    if server is None:
        return Placement(
            None, load, None if own_server is False else "one CPU only: server and load share it"
        )
    return Placement(tuple(server), load)


def config_body(scenario: Scenario) -> str:
    """The TOML of ``prism serve``'s config (admin port and drain are added by ``make_prism``)."""
    lines = [
        f"workers = {scenario.server.workers}",
        f"max_concurrent_streams = {scenario.server.max_concurrent_streams}",
    ]
    cache = scenario.server.cache
    if cache is not None:
        lines += ["", "[cache]", f"total_bytes = {cache.total_bytes}", f"slot_bytes = {cache.slot_bytes}"]
    for ns in scenario.namespaces:
        lines += namespace_toml(ns)
    return "\n".join(lines) + "\n"


def namespace_toml(ns: NamespaceConfig) -> list[str]:
    """``[[namespaces]]`` with its sub-tables, as prism.toml writes it."""
    table: dict[str, Any] = msgspec.to_builtins(ns)
    lines = ["", "[[namespaces]]"]
    subtables = []
    for key, value in table.items():
        if value is None:
            continue
        if isinstance(value, dict):
            subtables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in subtables:
        lines.append(f"[namespaces.{key}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None]
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def start_server(scenario: Scenario, workdir: Path, cpus: tuple[int, ...] | None) -> PrismServer:
    """Start ``prism serve`` for the scenario, pinned to ``cpus``; wait until it serves."""
    server = make_prism("prism", workdir, config_body(scenario), cpus or (), scenario.namespace.name)
    server.start()
    try:
        server.wait_ready(60.0)
    except BaseException:
        server.stop()
        raise
    return server


def pin_self(cpus: tuple[int, ...] | None) -> None:
    """Move this process (and so the load processes and h2load it starts) to ``cpus``."""
    if cpus:
        try:
            os.sched_setaffinity(0, set(cpus))
        except OSError as exc:
            print(f"prism bench: cannot pin the load generator to {cpus}: {exc}", file=sys.stderr)
