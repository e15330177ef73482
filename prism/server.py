"""``prism serve`` in one process: bind, serve, drain on SIGTERM.

The socket is bound before trio starts (the supervisor of DESIGN.md binds
before it forks, and hands the same socket to its workers); the trio loop then
serves gRPC on it until a signal says stop.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import trio

from prism.app import open_app
from prism.config import ServerConfig
from prism.errors import ConfigError
from prism.log import setup_logging
from prism.rpc.server import ServerSettings, serve_listeners

log = logging.getLogger("prism.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEADDR, ready to hand to workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def run(config: ServerConfig, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGTERM (drain) or SIGINT (stop now)."""
    app = await open_app(config)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_listeners, [listener], app.settings)
                log.info("serving gRPC on %s", config.listen)
                async for signum in signals:
                    if signum == signal.SIGTERM:
                        await drain(app.settings, config.graceful_timeout_s)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        await app.aclose()


async def drain(settings: ServerSettings, timeout_s: float) -> None:
    """GOAWAY everywhere, then wait for in-flight calls, at most ``timeout_s``."""
    settings.start_drain()
    with trio.move_on_after(timeout_s):
        while settings.active_calls:
            await trio.sleep(0.01)


def serve(config: ServerConfig) -> int:
    """Run the server in this process; the exit code for the CLI."""
    setup_logging(config.log_level)
    host, port = config.listen_host_port()
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        print(f"prism: cannot listen on {config.listen}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        trio.run(run, config, sock)
    except ConfigError as exc:
        print(f"prism: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0
