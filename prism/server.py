"""``prism serve``: prepare the runtime directory, then run the supervisor.

The metrics directory must be in the environment before anything imports
prometheus-client (it picks its multiprocess value store at import time), so
this module imports the supervisor, and with it the rest of Prism, only after
setting it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from prism.config import ServerConfig


def runtime_dir(config: ServerConfig) -> Path:
    """Where a server keeps its sockets, metrics files and pid file.

    systemd's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``) when set, else
    ``DATA_DIR/run``.
    """
    return Path(os.environ.get("RUNTIME_DIRECTORY") or Path(config.data_dir) / "run").absolute()


def pid_file(config: ServerConfig) -> Path:
    """The supervisor's pid, for ``prism reload``."""
    return runtime_dir(config) / "prism.pid"


def prepare_runtime(config: ServerConfig) -> Path:
    """The runtime directory (sockets, metrics files), emptied of a previous run's."""
    runtime = runtime_dir(config)
    runtime.mkdir(parents=True, exist_ok=True)
    for stale in runtime.glob("*.ipc"):
        stale.unlink(missing_ok=True)
    for stale in runtime.glob("*.sock"):
        stale.unlink(missing_ok=True)
    metrics_dir = runtime / "metrics"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return runtime


def serve(config: ServerConfig, reload_config: Callable[[], ServerConfig]) -> int:
    """Run the supervisor until it is stopped; the process exit code."""
    from prism.workers.preflight import check_deployable

    check_deployable(config)
    runtime = prepare_runtime(config)
    from prism.log import setup_logging
    from prism.workers.supervisor import Supervisor

    setup_logging(config.log_level)
    return Supervisor(config, reload_config, runtime).run()
