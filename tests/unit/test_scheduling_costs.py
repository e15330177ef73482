"""What the scheduler does per connection and per call, counted with a trio
instrument: the costs that grow with the number of connections.

- A storm of new connections is accepted in one pass of the scheduler, not
  one connection per pass: with 1,000 clients connecting at once the last
  one waited 1,000 passes, each longer than the one before.
- A call on a plain socket, answered without waiting, costs its connection
  one task step (the reader's: it reads, answers and writes), not three (a
  schedule point after the read, a wake-up of the writer and a schedule
  point after its write); and one with a handler three, not four and a half.
"""

from __future__ import annotations

import socket

import trio
import trio.lowlevel
from trio.lowlevel import Task

from prism.rpc.server import Connection

from .h2client import H2Client
from .test_accept_limits import serving, settings_with
from .test_rpc_server import CHECK, req


class Counter(trio.abc.Instrument):
    """Passes of the scheduler, and task steps of every task but ``ignored``."""

    def __init__(self, ignored: Task) -> None:
        self.ignored = ignored
        self.passes = 0
        self.steps = 0

    def after_io_wait(self, timeout: float) -> None:
        self.passes += 1

    def before_task_step(self, task: Task) -> None:
        if task is not self.ignored:
            self.steps += 1


async def test_connections_waiting_to_be_accepted_are_taken_in_one_pass() -> None:
    settings = settings_with()
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    # Connected in the kernel (the backlog), not yet accepted: a storm.
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        counter = Counter(trio.lowlevel.current_task())
        async with serving(settings, listener):
            trio.lowlevel.add_instrument(counter)
            try:
                with trio.fail_after(5):
                    while settings.accepted < len(clients):
                        await trio.sleep(0)
            finally:
                trio.lowlevel.remove_instrument(counter)
        assert counter.passes <= 3  # was one per connection: 200
    finally:
        for client in clients:
            client.close()


async def _steps_per_call(service: str) -> float:
    settings = settings_with()
    server_end, client_end = socket.socketpair()
    client = H2Client(trio.SocketStream(trio.socket.from_stdlib_socket(client_end)))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            Connection(trio.SocketStream(trio.socket.from_stdlib_socket(server_end)), settings).serve
        )
        await client.start()
        with trio.fail_after(5):
            for _ in range(5):  # the opening, the handshake: not what is counted
                assert (await client.call(CHECK, req(service))).status == 0
            counter = Counter(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(counter)
            try:
                for _ in range(20):
                    assert (await client.call(CHECK, req(service))).status == 0
            finally:
                trio.lowlevel.remove_instrument(counter)
        nursery.cancel_scope.cancel()
    await client.stream.aclose()
    return counter.steps / 20


async def test_a_call_answered_without_waiting_costs_its_connection_one_task_step() -> None:
    assert await _steps_per_call("now") <= 1.0  # was 2.95


async def test_a_call_with_a_handler_costs_its_connection_three_task_steps() -> None:
    # The reader's, the handler's, the writer's (which writes without a
    # schedule point after): was 4.5.
    assert await _steps_per_call("") <= 3.0
