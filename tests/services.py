"""The network services some tests need, and whether each answers.

A test module that needs one says so with
``pytestmark = pytest.mark.services("postgres", ...)``; before any test runs,
tests/conftest.py checks the services the selected tests need and stops the
run with one line naming a missing one and how to start it, instead of a page
of connection errors from every test that needs it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

START_ALL = "scripts/services.sh"


@dataclass(frozen=True)
class Service:
    title: str
    host: str
    port: int
    start: str  # the command that starts it on this kind of machine

    def answers(self, timeout_s: float = 1.0) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout_s):
                return True
        except OSError:
            return False


def _postgres() -> Service:
    params = conninfo_to_dict(os.environ.get("PRISM_TEST_PG_DSN", "postgresql://127.0.0.1/test"))
    host = str(params.get("host") or "127.0.0.1")
    return Service(
        "PostgreSQL",
        host,
        int(params.get("port") or 5432),
        'pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start',
    )


def _from_url(title: str, env: str, default: str, port: int, start: str) -> Service:
    url = urlsplit(os.environ.get(env, default))
    return Service(title, url.hostname or "127.0.0.1", url.port or port, start)


def known() -> dict[str, Service]:
    return {
        "postgres": _postgres(),
        "redis": _from_url(
            "Redis",
            "PRISM_TEST_REDIS_URL",
            "redis://127.0.0.1:6379/0",
            6379,
            'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
        ),
        "nats": _from_url(
            "NATS",
            "PRISM_TEST_NATS_URL",
            "nats://127.0.0.1:4222",
            4222,
            "nats-server -a 127.0.0.1 -p 4222 -js &",
        ),
    }
