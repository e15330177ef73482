"""``prism serve``: prepare the data and runtime directories, then run the supervisor.

The metrics directory must be in the environment before anything imports
prometheus-client (it picks its multiprocess value store at import time), so
this module imports the supervisor, and with it the rest of Prism, only after
setting it.

Permissions. The data directory holds the page-token key and SQLite files,
the runtime directory the sockets workers trust each other over (forwarded
calls, hand-offs, the supervisor's control): both are created 0700, the key
0600 (``prism.api.pagetoken``). A directory that already exists is the
user's: one that group or others can use is left as it is, with one warning
line, and so is a key or token file that anyone can read, and an SQLite
namespace's file open to group or others (``prism.backends.sqlite.files``
creates them 0600, in 0700 directories, whatever the umask).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prism.backends import catalog
from prism.backends.sqlite.files import open_to_others
from prism.backends.sqlite.options import SqliteFileOptions
from prism.config import ServerConfig
from prism.errors import ConfigError

log = logging.getLogger("prism.server")

PRIVATE_DIR_MODE = 0o700
_PAGE_TOKEN_KEY = "page-token.key"


def runtime_dir(config: ServerConfig) -> Path:
    """Where a server keeps its sockets, metrics files and pid file.

    systemd's ``RuntimeDirectory=`` (``$RUNTIME_DIRECTORY``) when set, else
    ``DATA_DIR/run``.
    """
    return Path(os.environ.get("RUNTIME_DIRECTORY") or Path(config.data_dir) / "run").absolute()


def pid_file(config: ServerConfig) -> Path:
    """The supervisor's pid, for ``prism reload``."""
    return runtime_dir(config) / "prism.pid"


def private_dir(path: Path, what: str) -> str | None:
    """Create ``path`` with mode 0700 (missing parents get the default mode);
    for an existing one that group or others may use, the warning to log."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
        return None
    except FileExistsError:
        pass
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return None
    return (
        f"{what} {path} is open to group or others (mode {mode:04o}); left as it is, "
        f"but `chmod 700 {path}` keeps what it holds to the service's user"
    )


def readable_by_others(path: str, what: str) -> str | None:
    """The warning to log when the secret file ``path`` is readable by anyone
    (group-readable is fine: ``root:prism 0640`` is how deploy/systemd installs keys)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # preflight reports a file that cannot be read
    if not mode & stat.S_IROTH:
        return None
    return f"{what} {path} is readable by any user (mode {mode:04o}): `chmod o-r {path}`"


def usable_dir(path: Path, what: str, field: str) -> str | None:
    """``private_dir`` for a directory Prism writes in: ConfigError, one line
    naming the config ``field`` and the path, if it cannot be created or
    written to (a file in its place, no permission, a read-only file system)."""
    try:
        warning = private_dir(path, what)
        if not path.is_dir():
            raise ConfigError(f"{field}: {path} is not a directory")
        # Writing is what serving needs: try it (access() is no answer for
        # root, nor for a read-only mount under some kernels).
        fd, probe = tempfile.mkstemp(prefix=".prism-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        probing = str(exc.filename or "").startswith(str(path / ".prism-probe-"))
        shown = path if probing else exc.filename or path
        raise ConfigError(f"{field}: cannot use {shown}: {exc.strerror or exc}") from None
    return warning


def permission_warnings(config: ServerConfig) -> list[str]:
    """What to warn about before serving: shared directories and readable secrets. Creates the
    data directory (0700) if missing; ConfigError naming ``data_dir`` if it cannot be used."""
    warnings = [usable_dir(Path(config.data_dir).absolute(), "data_dir", "data_dir")]
    key = Path(config.data_dir) / _PAGE_TOKEN_KEY
    if key.exists() and stat.S_IMODE(key.stat().st_mode) & 0o077:
        warnings.append(f"{key} is open to group or others: `chmod 600 {key}` (it signs page tokens)")
    secrets = [("tls.key_file", config.tls.key_file if config.tls else "")]
    secrets.append(("admin.tls.key_file", config.admin.tls.key_file if config.admin.tls else ""))
    secrets.append(("admin_token_file", config.admin_token_file))
    warnings += [readable_by_others(path, what) for what, path in secrets if path]
    warnings += [open_to_others(path) for path in sqlite_files(config)]
    return [w for w in warnings if w is not None]


def sqlite_files(config: ServerConfig) -> list[Path]:
    """The database file of each SQLite namespace (KeyValue and TimeSeries)."""
    files = []
    for ns in config.all_namespaces():
        options = catalog.check(ns.abstraction, ns.backend, ns.options)  # as config loading did
        if isinstance(options, SqliteFileOptions):
            files.append(options.file(Path(config.data_dir), ns.name).absolute())
    return files


def prepare_runtime(config: ServerConfig) -> Path:
    """The runtime directory (sockets, metrics files), emptied of a previous run's; ConfigError
    naming ``data_dir`` (or ``RUNTIME_DIRECTORY``) if it cannot be used."""
    runtime = runtime_dir(config)
    what = "RUNTIME_DIRECTORY" if os.environ.get("RUNTIME_DIRECTORY") else "data_dir"
    warning = usable_dir(runtime, "the runtime directory", what)
    if warning is not None:
        log.warning("%s", warning)
    metrics_dir = runtime / "metrics"
    try:
        for stale in runtime.glob("*.ipc"):
            stale.unlink(missing_ok=True)
        for stale in runtime.glob("*.sock"):
            stale.unlink(missing_ok=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot use {exc.filename or runtime}: {exc.strerror or exc}") from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return runtime


def serve(
    config: ServerConfig,
    reload_config: Callable[[], ServerConfig],
    *,
    config_file: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """Run the supervisor until it is stopped; the process exit code.

    ``config_file`` (absolute; "": none) and ``overrides`` (the flags) say how
    ``config`` was loaded: the admin process checks and writes a new config
    (``POST /v1/config``) with them.
    """
    from prism.workers.preflight import check_deployable

    check_deployable(config)
    from prism.log import setup_logging

    setup_logging(config.log_level)
    for warning in permission_warnings(config):
        log.warning("%s", warning)
    runtime = prepare_runtime(config)
    from prism.workers.supervisor import Supervisor

    return Supervisor(config, reload_config, runtime, config_file, overrides).run()
