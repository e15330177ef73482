"""What the supervisor hands its children at start, and the exit codes they share.

A worker gets a ``WorkerSpec`` and the admin process an ``AdminSpec``, each as
JSON in an environment variable, with the file descriptors they name passed
down. Kept apart from ``prism.workers.worker`` and ``prism.admin.main`` so that
the supervisor can build both without importing either (and with them trio,
the App and every backend): the supervisor process stays small and loop-free.
"""

from __future__ import annotations

from typing import Final

import msgspec

from prism.config import ServerConfig
from prism.config.security import AdminTlsConfig

SPEC_ENV: Final = "PRISM_WORKER_SPEC"
ADMIN_SPEC_ENV: Final = "PRISM_ADMIN_SPEC"
# A worker that cannot start serving exits with this code; the supervisor
# halts instead of restarting it in a loop. The admin process exits with it
# too, but is restarted: no call depends on it.
EXIT_BOOT_FAILED: Final = 3
# The supervisor's own exit code when it halts (a worker could not boot).
EXIT_HALTED: Final = 3


class WorkerSpec(msgspec.Struct, frozen=True):
    """What the supervisor hands a worker (``PRISM_WORKER_SPEC``)."""

    worker_id: int
    tenant: str
    cpu: int | None
    listen_fd: int
    routes_fd: int
    routes_bytes: int
    cache_fd: int  # -1: no shared cache
    cache_bytes: int
    control_address: str
    events_address: str
    forward_address: str
    handoff_address: str
    config: ServerConfig
    supervisor_pid: int


class AdminSpec(msgspec.Struct, frozen=True):
    """What the supervisor hands the admin process (``PRISM_ADMIN_SPEC``)."""

    listen_fd: int  # a bound (and usually listening) TCP socket
    routes_fd: int  # the routing table's memfd
    routes_bytes: int  # its size, as the supervisor created it
    log_level: str = "info"
    supervisor_pid: int = 0  # 0: do not tie our life to a parent (tests)
    # The file of the bearer token every /v1 route needs ("": none needed).
    # The path, not the token: a secret in the environment would outlive its
    # use in /proc and in anything that dumps the environment.
    token_file: str = ""
    tls: AdminTlsConfig | None = None  # serve HTTPS with this certificate and key
