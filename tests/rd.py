"""Redis helpers for tests: the server the suite uses, unique key prefixes, clean-up.

Tests may delete keys; the product never deletes keys it did not write."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec

from prism.backends.redis.keyvalue import RedisBackend
from prism.backends.redis.options import RedisOptions
from prism.drivers import resp

URL = os.environ.get("PRISM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Every key a test writes starts with this; .ci/run gives each run its own
# (and deletes that run's keys at the end), so runs never see each other's keys.
RUN_PREFIX = os.environ.get("PRISM_TEST_REDIS_PREFIX", "prism_test:")


def new_prefix() -> str:
    """A key prefix no other test (or run) uses."""
    return f"{RUN_PREFIX}{uuid.uuid4().hex}:"


def new_backend(**options: object) -> RedisBackend:
    """An unopened backend whose keys live under a prefix of its own."""
    prefix = new_prefix()
    return RedisBackend(
        msgspec.structs.replace(RedisOptions(url=URL, key_prefix=prefix), **options), namespace="ns"
    )


async def delete_keys(prefix: str) -> None:
    """SCAN + DEL every key under ``prefix`` (which must hold no glob characters)."""
    conn = await resp.connect(resp.Address(URL), timeout_s=5)
    try:
        cursor = b"0"
        while True:
            cursor, keys = await conn.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                await conn.call("DEL", *keys)
            if cursor == b"0":
                break
    finally:
        conn.close()


@asynccontextmanager
async def admin_client() -> AsyncIterator[resp.Connection]:
    """A client outside Prism, to look at keys and pause the server; unpauses at the end."""
    conn = await resp.connect(resp.Address(URL), timeout_s=5)
    try:
        yield conn
    finally:
        if not conn.broken:
            await conn.call("CLIENT", "UNPAUSE")
        conn.close()
