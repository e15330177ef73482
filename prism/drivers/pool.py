"""A bounded pool of connections, shared by the trio drivers (``pg``, ``resp``).

At most ``size`` connections, opened on first need and reused. A caller that
finds them all busy waits at most ``acquire_timeout_s`` and then gets the
driver's "busy" error (its ``PoolTimeout``, which the backends answer with
RESOURCE_EXHAUSTED): a backend that has stopped answering makes calls fail
fast instead of queueing without bound.
A connection goes back to the pool only if it is not broken.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import trio

from prism.tracing.context import child


class Conn(Protocol):
    broken: bool

    def close(self) -> None: ...


C = TypeVar("C", bound=Conn)


class BoundedPool(Generic[C]):
    """Subclasses say how to open a connection and which errors to raise."""

    def __init__(self, *, size: int, connect_timeout_s: float, acquire_timeout_s: float) -> None:
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        self._slots = trio.Semaphore(size)
        self._idle: list[C] = []
        self.closed = False
        # Told how long each acquire waited for a busy pool (seconds), and
        # when (trio's clock): the gateway's overload shedding listens here.
        self.on_wait: Callable[[float, float], None] | None = None

    async def _open(self) -> C:
        raise NotImplementedError

    def _busy_error(self) -> Exception:
        raise NotImplementedError

    def _closed_error(self) -> Exception:
        raise NotImplementedError

    async def acquire(self) -> C:
        """A connection for this task alone; give it back with ``put_back``."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            began = trio.current_time()
            with child("prism.pool.wait"), trio.move_on_after(self.acquire_timeout_s) as scope:
                await self._slots.acquire()
            if self.on_wait is not None:
                now = trio.current_time()
                self.on_wait(now - began, now)
            if scope.cancelled_caught:
                raise self._busy_error() from None
        try:
            if self.closed:
                raise self._closed_error()
            if self._idle:
                return self._idle.pop()
            return await self._open()
        except BaseException:
            self._slots.release()
            raise

    def put_back(self, conn: C) -> None:
        try:
            if conn.broken:
                return
            if self.closed:
                conn.close()
            else:
                self._idle.append(conn)
        finally:
            self._slots.release()

    def close_nowait(self) -> None:
        """Close idle connections now and busy ones as they come back, without waiting."""
        self.closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    async def aclose(self) -> None:
        """Close idle connections now, busy ones as they come back (waits for them)."""
        self.closed = True
        for _ in range(self.size):
            await self._slots.acquire()
        self.close_nowait()
