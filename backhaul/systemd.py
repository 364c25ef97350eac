"""systemd's service notifications (sd_notify) without a library: one datagram per message.

Readiness, a status line, reloading/stopping and watchdog pings go to ``$NOTIFY_SOCKET`` (a path,
or an abstract name written with a leading ``@``). Without that variable every call does nothing,
so the program runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("backhaul.systemd")


class Notifier:
    """Sends sd_notify messages; never blocks and never raises (the service must not die because
    systemd went away or its socket is full)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._failed = False
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message; False when it could not be delivered."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            if not self._failed:   # once: a ping every few seconds must not flood the log
                self._failed = True
                log.warning("cannot notify systemd at %s: %s", os.fsdecode(self.address).replace("\0", "@"),
                            exc.strerror or exc)
            return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets a Type=notify-reload service manager match the reload to its request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                         "STATUS=reloading the configuration")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> bytes:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``@name`` for an abstract socket."""
    if not value:
        return b""
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if not value.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying systemd", value)
        return b""
    return os.fsencode(value)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds within which systemd wants a ping, when it wants them from this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or "0")
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 1_000_000
