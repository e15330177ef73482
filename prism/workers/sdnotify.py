"""Tell systemd how the supervisor is doing: the sd_notify datagram protocol.

systemd runs ``prism serve`` as a ``Type=notify`` service and hands it the
address of a datagram socket in ``$NOTIFY_SOCKET``. Each state change is one
datagram of newline-separated ``KEY=VALUE`` lines: ``READY=1`` once the
listeners are bound and the workers are up, ``RELOADING=1`` (with
``MONOTONIC_USEC``) when a SIGHUP reload starts and ``READY=1`` again when it
ends, ``STOPPING=1`` when the drain starts, and ``WATCHDOG=1`` at half the
``WatchdogSec=`` interval while the supervisor loop is alive. The protocol is
simple enough that libsystemd would only add a C dependency.

Only the supervisor talks to systemd. It is a plain synchronous loop, so the
socket is non-blocking: if systemd stops draining its queue we drop a
notification rather than stall the loop that restarts workers. Every send
failure (systemd gone, socket removed, queue full) is logged once at warning
per outage and never raised: losing the service manager must not take the
data plane down with it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

__all__ = ["NOTIFY_ENV_VARS", "SystemdNotifier", "unset_environment"]

log = logging.getLogger("prism.systemd")

#: The variables systemd sets for the notify protocol and the watchdog.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def unset_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """Remove the notify and watchdog variables from ``env``.

    Call this in the supervisor after building its notifier and before
    starting any child. Children inherit the environment; a worker (or any
    library in it, or a program it execs) that saw ``NOTIFY_SOCKET`` could
    send ``READY=1``/``STOPPING=1`` on the service's behalf, or ping the
    watchdog and so hide a hung supervisor. With ``NotifyAccess=main``
    systemd drops such messages but logs a warning for each one; with
    ``NotifyAccess=all`` they would be believed. Same as libsystemd's
    ``sd_notify(unset_environment=1)``.
    """
    for name in NOTIFY_ENV_VARS:
        env.pop(name, None)


def _socket_address(value: str) -> str | None:
    """Map ``$NOTIFY_SOCKET`` to an AF_UNIX address, or None if unusable."""
    if value.startswith("@") and len(value) > 1:
        # An abstract-namespace socket: "@name" is spelled "\0name" on the wire.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # systemd >= 254 may also pass "vsock:CID:PORT" (for VMs); not for us.
    return None


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    """The watchdog timeout granted to process ``pid``, or None if it has none."""
    owner = env.get("WATCHDOG_PID")
    if owner is not None:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _clean(text: str) -> str:
    # A newline would end the STATUS= line and start a key of the caller's choosing.
    return text.replace("\r", " ").replace("\n", " ")


_MAX_PENDING = 16  # state messages kept for a queue that stays full


class SystemdNotifier:
    """Sends sd_notify messages to systemd; every method is a no-op when not under systemd.

    Build it with :meth:`from_env`. Not for use in forked children: a
    notifier copied into a child by ``fork()`` stays silent there, because
    only the main process may speak for the service (``NotifyAccess=main``).
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """Talk to the AF_UNIX datagram socket at ``address`` (``"\\0name"`` if abstract).

        ``address=None`` makes a disabled notifier. ``watchdog_usec`` is the
        watchdog timeout systemd granted this process, if any.
        """
        self._address = address or ""
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._pid = os.getpid()
        self._failing = False
        # State messages (READY=1, RELOADING=1, STOPPING=1, STATUS=) a full
        # queue refused (EAGAIN; not a socket that is gone): sent again, in
        # order, before the next message. A
        # watchdog ping is only dropped: the next one is as good. (A queue of
        # pings the reader had not read yet lost READY=1 for good.)
        self._pending: list[str] = []
        self._sock: socket.socket | None = None
        if address is not None:
            # Non-blocking: a full queue on systemd's side costs one dropped
            # message, never a stalled supervisor loop.
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] = os.environ, *, unset_environment: bool = False
    ) -> SystemdNotifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        With ``unset_environment=True`` those variables are then removed from
        ``env`` (which must be mutable), so that the workers started later do
        not see them; see :func:`unset_environment`.
        """
        raw = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: not a path or an @abstract name", raw)
        watchdog = _watchdog_usec(env, os.getpid())
        if unset_environment:
            if not isinstance(env, MutableMapping):
                raise TypeError("unset_environment=True needs a mutable mapping")
            for name in NOTIFY_ENV_VARS:
                env.pop(name, None)
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to talk to."""
        return self._sock is not None

    def ready(self, status: str | None = None) -> None:
        """Start-up (or a reload) is complete: the service is serving."""
        self._send("READY=1" if status is None else f"READY=1\nSTATUS={_clean(status)}")

    def reloading(self) -> None:
        """A configuration reload has started; send :meth:`ready` when it is done.

        ``MONOTONIC_USEC`` is required by ``Type=notify-reload`` (systemd >= 253)
        to match the message to the reload it asked for; older versions
        ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """The service has begun to shut down (draining)."""
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        """Ping the watchdog; a no-op unless systemd granted this process one."""
        if self._watchdog_usec is not None:
            self._send("WATCHDOG=1", state=False)

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status``."""
        self._send(f"STATUS={_clean(text)}")

    def watchdog_interval_s(self) -> float | None:
        """How often to call :meth:`watchdog`: half the timeout, as systemd recommends.

        None when there is no watchdog for this process.
        """
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        """Close the socket; later calls are no-ops."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._watchdog_usec = None

    def _send(self, message: str, *, state: bool = True) -> None:
        if self._sock is None or os.getpid() != self._pid:
            return
        while self._pending and self._deliver(self._pending[0]) is None:
            del self._pending[0]
        if self._pending:
            full = True
        else:
            failure = self._deliver(message)
            full = isinstance(failure, BlockingIOError)  # else delivered, or systemd is gone
        if full and state and len(self._pending) < _MAX_PENDING:
            self._pending.append(message)

    def _deliver(self, message: str) -> OSError | None:
        """Send one datagram; None, or why it was not delivered."""
        sock = self._sock
        assert sock is not None
        try:
            sock.sendto(message.encode(), self._address)
        except OSError as exc:
            # ECONNREFUSED/ENOENT: systemd is gone or restarting; EAGAIN: its
            # queue is full. Warn once per outage, not once per watchdog ping.
            if not self._failing:
                self._failing = True
                reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                log.warning(
                    "cannot notify systemd at %s (%s: %s); continuing without it",
                    self._address.replace("\0", "@", 1),
                    reason,
                    exc.strerror,
                )
            else:
                log.debug("systemd notification %r not delivered: %s", message, exc)
            return exc
        if self._failing:
            self._failing = False
            log.info("systemd notifications delivered again")
        return None
