"""``python -m prism.admin.main``: the admin process the supervisor starts beside the workers.

The supervisor binds the admin socket and creates the routing table before it
starts any child, and hands both down as inherited file descriptors, described
by an ``AdminSpec`` (``prism.workers.spec``) as JSON in an inherited memfd
whose number is in ``PRISM_SPEC_FD``::

    {"listen_fd": 3, "routes_fd": 4, "routes_bytes": 4194304, "log_level": "info",
     "token_file": "/etc/prism/admin.token",
     "tls": {"cert_file": "/etc/prism/admin.pem", "key_file": "/etc/prism/admin.key"}}

Binding in the supervisor means a restarted admin process serves the same
socket without a window where the port is closed or taken by someone else.
``PROMETHEUS_MULTIPROC_DIR`` (also set by the supervisor) names the directory
of the workers' metric files.

The token file and the certificate and key are read when this process
starts (the supervisor checked them already, ``prism.workers.preflight``). A
reload neither restarts this process nor changes those settings (they are
restart-only fields): a new token or certificate takes a restart of ``prism
serve``. With ``tls``, hypercorn serves HTTPS itself (its ``certfile``/``keyfile``).

SIGTERM or SIGINT stops the server gracefully and the process exits 0. A
missing or malformed spec exits ``EXIT_BOOT_FAILED`` with the reason on
stderr. Unlike a worker that cannot boot, this does not halt the server: the
admin process holds no state and no call depends on it, so the supervisor
keeps restarting it while the workers serve.
"""

from __future__ import annotations

import logging
import mmap
import os
import signal
import socket
import sys
from typing import Final, cast

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from prism.admin.app import ASGIApp, make_app
from prism.admin.config_api import ConfigTarget
from prism.admin.migrations_api import MigrationTarget
from prism.errors import ConfigError
from prism.log import setup_logging
from prism.router.table import RoutingTableReader
from prism.workers.lifeline import die_with_parent
from prism.workers.preflight import read_admin_token
from prism.workers.spec import EXIT_BOOT_FAILED, SPEC_FD_ENV, AdminSpec, read_spec

log = logging.getLogger("prism.admin")

# Admin requests are tiny; a scraper holding a keep-alive connection must not
# delay shutdown by hypercorn's default 3 s.
GRACEFUL_TIMEOUT_S: Final = 1.0
# A TLS client that connects and says nothing holds a task until then
# (hypercorn's default is a minute).
TLS_HANDSHAKE_TIMEOUT_S: Final = 10.0


def hypercorn_config(spec: AdminSpec) -> Config:
    """Serve on the inherited socket (over TLS with ``spec.tls``), log through
    prism's JSON logger, no access log."""
    config = Config()
    config.bind = [f"fd://{spec.listen_fd}"]
    # Prometheus scrapes and probes every few seconds: an access log line for
    # each would drown everything else the gateway logs.
    config.accesslog = None
    config.errorlog = logging.getLogger("prism.admin.http")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    config.include_server_header = False
    if spec.tls is not None:
        config.certfile = spec.tls.cert_file
        config.keyfile = spec.tls.key_file
        config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S
    return config


async def run(app: ASGIApp, config: Config) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then let hypercorn shut down gracefully."""
    # The receiver is opened before serving starts, so a signal that arrives
    # during startup is queued for the trigger rather than killing the process.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def stop_on_signal() -> None:
            async for signum in signals:
                log.info("admin process stopping on %s", signal.Signals(signum).name)
                return

        # The app is a plain ASGI callable typed with generic mappings;
        # hypercorn's TypedDict-based alias describes the same protocol.
        await serve(cast(ASGIFramework, app), config, shutdown_trigger=stop_on_signal)


def main() -> int:
    """Run the admin process; returns its exit code."""
    try:
        spec = read_spec(AdminSpec)
    except (KeyError, ValueError, OSError, msgspec.DecodeError) as exc:
        reason = f"bad or missing spec ({SPEC_FD_ENV}): {exc}"
        print(f"prism: admin process cannot boot: {reason}", file=sys.stderr)
        return EXIT_BOOT_FAILED
    if spec.supervisor_pid:
        die_with_parent(spec.supervisor_pid)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reload is the supervisor's, see worker.py
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # so are migration requests
    setup_logging(spec.log_level)
    config = hypercorn_config(spec)
    try:
        _check_listener(spec.listen_fd)
        token = read_admin_token(spec.token_file) if spec.token_file else None
        # Loaded here once to fail with one line: hypercorn would load it
        # again inside its serve loop and end in a traceback.
        config.create_ssl_context()
        # Read-only: the supervisor is the table's only writer, and a stray write
        # from here should fault rather than corrupt what every worker reads.
        buffer = mmap.mmap(spec.routes_fd, spec.routes_bytes, prot=mmap.PROT_READ)
    except (OSError, ValueError, ConfigError) as exc:  # ssl.SSLError is an OSError
        print(f"prism: admin process cannot boot: {exc}", file=sys.stderr)
        return EXIT_BOOT_FAILED
    os.close(spec.routes_fd)  # the mapping holds its own reference
    target = migrating = None
    if spec.supervisor_pid:
        target = ConfigTarget.for_supervisor(
            spec.supervisor_pid, spec.config_file, spec.overrides, spec.routes_bytes, spec.options_key
        )
        if spec.data_dir:
            migrating = MigrationTarget.for_supervisor(spec.supervisor_pid, spec.data_dir)
    app = make_app(RoutingTableReader(buffer), token=token, config_target=target, migration_target=migrating)
    trio.run(run, app, config)
    return 0


def _check_listener(fd: int) -> None:
    """Fail at boot, with the reason, if ``fd`` is not the TCP socket the supervisor meant to pass."""
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"listen_fd {fd} is not a stream socket")
    finally:
        sock.detach()  # hypercorn wraps the same fd again (fd:// bind); this object must not close it


if __name__ == "__main__":
    sys.exit(main())
