"""What the supervisor hands a worker at start, and the exit codes they share.

Kept apart from ``prism.workers.worker`` so that the supervisor can build a
spec without importing the worker (and with it trio, the App and every
backend): the supervisor process stays small and loop-free.
"""

from __future__ import annotations

from typing import Final

import msgspec

from prism.config import ServerConfig

SPEC_ENV: Final = "PRISM_WORKER_SPEC"
# A worker (or the admin process) that cannot start serving exits with this
# code; the supervisor halts instead of restarting it in a loop.
EXIT_BOOT_FAILED: Final = 3
# The supervisor's own exit code when it halts (a worker could not boot).
EXIT_HALTED: Final = 3


class WorkerSpec(msgspec.Struct, frozen=True):
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
