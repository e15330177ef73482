"""``grpc.health.v1.Health``: the server ("") and each namespace by name.

``""`` is the gateway's readiness: SERVING once every configured namespace
has a serving worker (``prism.router.readiness``; the worker hands the check
in with :meth:`HealthState.follow`), until the server drains. A namespace is
SERVING while its backend answers; backends that can go away (issue 4)
report through :meth:`HealthState.set`, and a namespace whose remote backend
could not be opened (at boot or on a reload) is NOT_SERVING while its worker
retries it. ``Watch`` streams the
current status and then every change until the client leaves, or until the
server drains: then every service turns NOT_SERVING, watchers hear it, and
their streams end with UNAVAILABLE (so that a load balancer's watch never
holds the drain; it moves to another server).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio
from grpc_health.v1 import health_pb2

from prism.errors import NotFound, Unavailable
from prism.rpc.call import CallContext

SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthState:
    """Status per service name, with a parking lot for watchers."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = trio.lowlevel.ParkingLot()
        self.draining = False
        self._not_ready: Callable[[], str | None] = _always_ready

    def follow(self, not_ready: Callable[[], str | None]) -> None:
        """Answer ``""`` NOT_SERVING while ``not_ready()`` gives a reason. It is
        asked on every read of ``""`` (keep it cheap); call :meth:`poke` when
        its answer may have changed, so that watchers hear it."""
        self._not_ready = not_ready

    def poke(self) -> None:
        """Wake watchers to read their status again (readiness may have moved)."""
        self._changed.unpark_all()

    def enter_drain(self) -> None:
        """Every service NOT_SERVING from now on, whatever backends report."""
        self.draining = True
        for name in self._status:
            self._status[name] = NOT_SERVING
        self._changed.unpark_all()

    def set(self, name: str, status: int) -> None:
        if self.draining:
            status = NOT_SERVING
        if self._status.get(name) != status:
            self._status[name] = status
            self._changed.unpark_all()

    def forget(self, name: str) -> None:
        if self._status.pop(name, None) is not None:
            self._changed.unpark_all()

    def items(self) -> list[tuple[str, int]]:
        return [(name, self._effective(name, status)) for name, status in self._status.items()]

    def get(self, name: str) -> int | None:
        status = self._status.get(name)
        return None if status is None else self._effective(name, status)

    def _effective(self, name: str, status: int) -> int:
        if name == "" and status == SERVING and self._not_ready() is not None:
            return int(NOT_SERVING)
        return status

    async def changed(self) -> None:
        await self._changed.park()


def _always_ready() -> str | None:
    return None


class Health:
    def __init__(self, state: HealthState) -> None:
        self._state = state

    async def Check(
        self, request: health_pb2.HealthCheckRequest, call: CallContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._state.get(request.service)
        if status is None:
            raise NotFound(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, call: CallContext
    ) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in self._state.items():
            response.statuses[name].status = status
        return response

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, call: CallContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            status = self._state.get(request.service)
            current = SERVICE_UNKNOWN if status is None else status
            if current != last:
                yield health_pb2.HealthCheckResponse(status=current)
                last = current
            if self._state.draining:
                raise Unavailable("server draining: watch another server")
            await self._state.changed()
