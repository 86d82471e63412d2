"""systemd's notify protocol (``sd_notify``), spoken directly: no libsystemd, no extra dependency.

The protocol is one datagram per message, sent to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` for an abstract socket), holding newline-separated ``KEY=VALUE`` assignments. fpolicyd sends
``READY=1`` once the listener is bound and the sinks have started, ``STATUS=…`` at each stage, ``STOPPING=1`` when
the drain begins, and ``WATCHDOG=1`` from the event loop every ``WATCHDOG_USEC / 2``: a loop stuck for longer
than ``WatchdogSec=`` stops the pings and systemd restarts the service.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=exec``) every call is a no-op. A message that cannot be
sent is logged, never raised: a missed notification must not stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from fpolicyd.obs.log import get_logger

log = get_logger("fpolicyd.systemd")

#: Longest message sent; systemd reads at most one page-sized datagram per message.
MAX_MESSAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class NotifyConfig:
    """What the environment asks for: where to notify, and how often to ping the watchdog (None: never)."""

    #: Address as ``socket.sendto`` takes it (an abstract name starts with a NUL byte); None = no-op.
    address: str | None
    watchdog_interval_s: float | None


def notify_config(environ: Mapping[str, str], pid: int) -> NotifyConfig:
    """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` as sd_notify(3) and sd_watchdog_enabled(3)
    define them. The watchdog applies to us only if ``WATCHDOG_PID`` is absent or is our pid."""
    raw_address = environ.get("NOTIFY_SOCKET", "")
    address: str | None
    if raw_address.startswith("/"):
        address = raw_address
    elif raw_address.startswith("@") and len(raw_address) > 1:
        address = "\0" + raw_address[1:]
    else:
        if raw_address:
            log.warning(
                "systemd_notify_socket_unsupported",
                notify_socket=raw_address,
                detail="only a path or an @abstract name is supported; notifications are off",
            )
        address = None
    return NotifyConfig(address=address, watchdog_interval_s=_watchdog_interval(environ, pid))


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    usec_text = environ.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = environ.get("WATCHDOG_PID", "")
    if pid_text and pid_text != str(pid):
        return None
    try:
        usec = int(usec_text)
    except ValueError:
        log.warning("systemd_watchdog_usec_invalid", watchdog_usec=usec_text)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Sends notify messages over one non-blocking datagram socket (opened on first use, closed by ``close``)."""

    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        self._socket: socket.socket | None = None
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_environment(cls) -> SystemdNotifier:
        return cls(notify_config(os.environ, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.config.address is not None

    def notify(self, **fields: str) -> bool:
        """Send one message (``notify(READY="1", STATUS="…")``); True if it was sent. No-op when disabled."""
        address = self.config.address
        if address is None:
            return False
        message = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode()
        if len(message) > MAX_MESSAGE_BYTES:
            message = message[:MAX_MESSAGE_BYTES]
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, address)
        except OSError as exc:
            self.failed += 1
            log.warning("systemd_notify_failed", fields=sorted(fields), error=str(exc))
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status)

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def stopping(self, status: str) -> bool:
        return self.notify(STOPPING="1", STATUS=status)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog from the event loop until cancelled (returns at once if no watchdog is asked for).
        Running on the loop is the point: a blocked loop stops the pings, and systemd notices."""
        interval = self.config.watchdog_interval_s
        if not self.enabled or interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


def _one_line(value: str) -> str:
    """A value cannot contain a newline (it would start a new assignment)."""
    return value.replace("\n", " ")
