"""How prism's modules depend on each other: no circles, and a supervisor without trio.

The supervisor runs no event loop: loading trio, the worker's App or the
backend registry into it would cost every ``prism serve`` start-up time and
memory for nothing, and would tempt code into running loop-bound objects in
a process that must never fork from inside a running loop.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import pytest

PRISM = Path(__file__).resolve().parents[2] / "prism"

# What `prism serve` loads in the supervisor process.
SUPERVISOR_MODULES = (
    "prism.cli",
    "prism.server",
    "prism.workers.supervisor",
    "prism.workers.preflight",
    "prism.log",
    "prism.metrics",
)
# Modules the supervisor shares with the workers; none may pull trio in.
LIGHT_MODULES = (
    "prism.cache.shared",
    "prism.router.table",
    "prism.router.messages",
    "prism.metrics",
    "prism.workers.sdnotify",
    "prism.workers.spec",
    "prism.workers.slot",
    "prism.workers.plan",
    "prism.workers.resources",
    "prism.workers.forked",
    "prism.workers.tenant_table",
    "prism.nng",
    "prism.metrics_files",
)
HEAVY = ("trio", "prism.workers.app", "prism.backends.registry")
# Drivers, engines and libraries only some configs need: a worker (or the
# supervisor) that does not need them must not pay their memory.
DRIVERS = ("sqlite3", "psycopg", "psycopg_pool", "hiredis", "nats", "jwt", "cryptography")


def _loaded_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Run ``code`` in a fresh interpreter; which of ``heavy`` it left in ``sys.modules``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    # Without coverage.py, which CI starts in every child Python: it imports
    # sqlite3 (its data file) itself.
    env = {
        k: v for k, v in os.environ.items() if k not in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START")
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=PRISM.parent, env=env
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_the_supervisor_process_loads_neither_trio_nor_the_app() -> None:
    assert _loaded_after("\n".join(f"import {m}" for m in SUPERVISOR_MODULES)) == []


def test_the_supervisor_process_loads_no_driver() -> None:
    assert _loaded_after("\n".join(f"import {m}" for m in SUPERVISOR_MODULES), DRIVERS) == []


def test_a_memory_only_worker_loads_no_driver(tmp_path: Path) -> None:
    code = f"""
import prism.workers.worker
from pathlib import Path
from prism.backends import registry
for abstraction in ("keyvalue", "timeseries", "pubsub"):
    registry.create_any(abstraction, "memory", {{}}, data_dir=Path({str(tmp_path)!r}), namespace="n")
"""
    assert _loaded_after(code, DRIVERS) == []


def test_each_driver_is_loaded_by_the_namespace_that_needs_it(tmp_path: Path) -> None:
    code = f"""
import prism.workers.worker
from pathlib import Path
from prism.backends import registry
registry.create_any("keyvalue", "sqlite", {{}}, data_dir=Path({str(tmp_path)!r}), namespace="n")
"""
    assert _loaded_after(code, DRIVERS) == ["sqlite3"]  # so the probe above can see a driver


def test_no_process_loads_asyncio_for_pynng() -> None:
    # pynng imports asyncio for its asyncio support, ~1.5 MB of every
    # worker's PSS: prism.nng stands in for it until something uses it.
    real = ("asyncio.events", "asyncio.base_events")
    assert _loaded_after("import prism.workers.worker\nimport prism.workers.supervisor", real) == []
    used = "import prism.nng, asyncio\nasyncio.get_event_loop_policy()\nfrom asyncio import sleep"
    assert _loaded_after(used, real) == list(real)  # and whoever uses it gets all of it


def test_no_process_of_prism_serve_loads_prometheus_client_but_the_admin(tmp_path: Path) -> None:
    # Its HTTP exposition alone is ~2.7 MB of PSS: prism.metrics_files writes
    # its files instead, wherever prism serve has set PROMETHEUS_MULTIPROC_DIR.
    code = f"import os\nos.environ['PROMETHEUS_MULTIPROC_DIR'] = {str(tmp_path)!r}\n" + "\n".join(
        f"import {m}" for m in (*SUPERVISOR_MODULES, "prism.workers.worker", "prism.workers.zygote")
    )
    assert _loaded_after(code, ("prometheus_client",)) == []
    assert _loaded_after(code + "\nimport prism.admin.main", ("prometheus_client",)) == ["prometheus_client"]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_modules_shared_with_the_supervisor_pull_in_no_trio(module: str) -> None:
    assert _loaded_after(f"import {module}") == []


def test_the_start_up_checks_load_no_backend(tmp_path: Path) -> None:
    """``prism serve`` loads and checks the config in the supervisor, at start and on every reload."""
    config = tmp_path / "prism.toml"
    config.write_text(
        """
[[namespaces]]
name = "kv"
backend = "sqlite"

[[namespaces]]
name = "events"
abstraction = "timeseries"
backend = "sqlite"

[[tenants]]
name = "t"
namespaces = [
    { name = "mem", backend = "memory" },
    { name = "topic", abstraction = "pubsub", backend = "memory" },
]
"""
    )
    code = f"""
from prism.config import load_config
from prism.workers.preflight import check_deployable
check_deployable(load_config({str(config)!r}, {{}}, {{}}))
"""
    assert _loaded_after(code) == []


# -- import cycles -------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PRISM.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """prism module -> the prism modules it imports anywhere in its text.

    Imports inside functions and under ``TYPE_CHECKING`` count: a lazy import
    that closes a circle only hides it from the interpreter, not from the
    design. ``from package import name`` counts as importing the submodule
    ``package.name`` when there is one, else the package. Importing
    ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and
    ``a.b`` that Python initialises on the way.
    """
    files = {_module_name(p): p for p in PRISM.rglob("*.py")}
    graph: dict[str, set[str]] = {}

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(m for a in node.names if (m := known(a.name)))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                for alias in node.names:
                    target = f"{module}.{alias.name}"
                    found = target if target in files else known(module)
                    if found:
                        deps.add(found)
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> Iterator[list[str]]:
    """One shortest circle through each group of mutually importing modules."""
    for group in _strongly_connected(graph):
        start = min(group)
        paths = {start: [start]}
        queue = deque([start])
        while queue:  # breadth first, inside the group, back to start
            v = queue.popleft()
            ahead = sorted(graph[v] & group)
            if start in ahead:
                yield [*paths[v], start]
                break
            for w in ahead:
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the groups of more than one module that all reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    assert "prism.workers.supervisor" in graph["prism.server"]  # imported inside serve()
    assert "prism.workers.slot" in graph["prism.workers.supervisor"]
    assert list(cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})) == [["a", "b", "c", "a"]]
    assert list(cycles({"a": {"b"}, "b": set()})) == []


def test_no_import_cycle_in_prism() -> None:
    found = [" -> ".join(c) for c in cycles(import_graph())]
    assert not found, "import cycles in prism/:\n" + "\n".join(found)
