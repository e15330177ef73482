"""What the supervisor hands its children at start, and the exit codes they share.

A worker gets a ``WorkerSpec`` and the admin process an ``AdminSpec``, each as
JSON in an anonymous memory file (a memfd) whose descriptor is passed down with
the ones the spec names; only that descriptor's number travels, in
``SPEC_FD_ENV``. Never the spec itself in the environment or on the command
line: it holds the whole config, DSN passwords included, which
``/proc/PID/environ`` and ``cmdline`` would show, and a large config would not
fit in ``execve``'s argument limit (E2BIG).

Kept apart from ``prism.workers.worker`` and ``prism.admin.main`` so that
the supervisor can build both without importing either (and with them trio,
the App and every backend): the supervisor process stays small and loop-free.
"""

from __future__ import annotations

import os
from typing import Any, Final, TypeVar

import msgspec

from prism.config import ServerConfig
from prism.config.security import AdminTlsConfig
from prism.config.server import DEFAULT_TENANT

# The number of the inherited descriptor to read the spec from.
SPEC_FD_ENV: Final = "PRISM_SPEC_FD"
# Who a worker is, for tools reading /proc (bench/): "ID:TENANT@cpuCPU"; nothing secret.
# Also its /proc/PID/comm (prism.workers.lifeline.name_process), which is
# where to read it for a worker the template forked (it has the template's environment).
WORKER_LABEL_ENV: Final = "PRISM_WORKER"
# A worker that cannot start serving exits with this code; the supervisor
# halts instead of restarting it in a loop. The admin process exits with it
# too, but is restarted: no call depends on it.
EXIT_BOOT_FAILED: Final = 3
# The supervisor's own exit code when it halts (a worker could not boot).
EXIT_HALTED: Final = 3


class WorkerSpec(msgspec.Struct, frozen=True):
    """What the supervisor hands a worker (read with ``read_spec``)."""

    worker_id: int
    tenant: str
    cpu: int | None
    listen_fd: int
    routes_fd: int
    routes_bytes: int
    namespaces_fd: int  # its tenant's own namespace table (prism.workers.tenant_table)
    namespaces_bytes: int
    cache_fd: int  # -1: no shared cache
    cache_bytes: int
    control_address: str
    events_address: str
    forward_address: str
    handoff_address: str
    config: ServerConfig
    supervisor_pid: int
    # The table of connections each worker holds (prism.rpc.accept_share); -1: none.
    accepts_fd: int = -1


class AdminSpec(msgspec.Struct, frozen=True):
    """What the supervisor hands the admin process (read with ``read_spec``)."""

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
    # How the supervisor loads its config, so that POST /v1/config checks a new
    # one the same way: the file (absolute; "": none) and the flags given.
    config_file: str = ""
    overrides: dict[str, Any] = {}
    options_key: str = ""  # hex: the key of the routing table's option digests
    data_dir: str = ""  # absolute: where migration requests go (prism.migrate.requests)


class ZygoteSpec(msgspec.Struct, frozen=True):
    """What the supervisor hands the worker template (``prism.workers.zygote``)."""

    supervisor_pid: int
    socket_fd: int  # its end of the request socket (prism.workers.forked)


def config_for_tenant(config: ServerConfig, tenant: str) -> ServerConfig:
    """``config`` with only ``tenant``'s namespaces, for that tenant's workers.

    A worker opens the namespaces of its tenant's own table
    (``prism.workers.tenant_table``), never another tenant's: the other
    tenants' namespaces (and their DSNs) must not reach it, and with 10,000
    namespaces they would be megabytes to decode in every worker.
    """
    if tenant == DEFAULT_TENANT and config.namespaces:
        return msgspec.structs.replace(config, tenants=())
    own = tuple(t for t in config.tenants if t.name == tenant)
    return msgspec.structs.replace(config, namespaces=(), tenants=own)


S = TypeVar("S", WorkerSpec, AdminSpec, ZygoteSpec)


def spec_fd(spec: WorkerSpec | AdminSpec | ZygoteSpec) -> int:
    """A memfd holding ``spec`` as JSON, for a child to inherit; the caller closes it once the child runs.

    A memfd, not a pipe: the whole spec is written before the child starts,
    whatever its size, and its descriptor is only readable by our own user
    (``/proc/PID/fd`` needs ptrace rights on the process).
    """
    data = msgspec.json.encode(spec)
    fd = os.memfd_create("prism-spec", os.MFD_CLOEXEC)  # pass_fds makes it inheritable in the child only
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_spec(kind: type[S]) -> S:
    """Read and close the spec the supervisor passed down (``SPEC_FD_ENV``).

    Raises KeyError or ValueError (no descriptor named), OSError (not
    readable) or msgspec.DecodeError (not a spec).
    """
    fd = int(os.environ.pop(SPEC_FD_ENV))
    try:
        chunks = []
        offset = 0
        while chunk := os.pread(fd, 1 << 20, offset):
            chunks.append(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    return msgspec.json.decode(b"".join(chunks), type=kind)
