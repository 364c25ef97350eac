"""Pipes for ``os.splice``, shared by every relay of one reactor.

A relay direction holds a pipe only while bytes sit in it, so idle connections cost no pipe and
the number of pipes follows the number of busy directions, not of connections. Bytes left in the
pipe of a direction whose receiver stopped reading are *pinned* kernel memory: they are counted
against a budget, and past it a direction reads only what its receiver has room for (at least a
small bite), so a crowd of stalled readers cannot pin a mebibyte each while receivers that read
still take a pipe's worth at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
import threading

log = logging.getLogger("backhaul.pipes")

CHUNK = 1024 * 1024              # the pipe size we ask for
SMALL = 64 * 1024                # a bite while the pinned budget is spent (the kernel's default pipe)
PINNED_BUDGET = 64 * 1024 * 1024  # bytes that stalled directions may hold in pipes, in all
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_SIOCOUTQ = termios.TIOCOUTQ   # the same request: bytes in a socket's send queue


class Pipe:
    """Both ends of one pipe and the size the kernel actually gave it."""

    __slots__ = ("r", "w", "size")

    def __init__(self, r: int, w: int, size: int) -> None:
        self.r = r
        self.w = w
        self.size = size

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Pipes shared by all connections, and the account of the bytes pinned in them."""

    def __init__(self, keep: int = 64, size: int = CHUNK, budget: int = PINNED_BUDGET) -> None:
        self._free: list[Pipe] = []
        self._keep = keep
        self._size = size
        self._lock = threading.Lock()
        self.budget = budget
        self.pinned = 0            # bytes held by stalled directions (metric-ready)
        self.refused = 0           # pipes the kernel would not enlarge (metric-ready)

    def get(self) -> Pipe:
        with self._lock:
            if self._free:
                return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, self._size)
        except OSError as exc:
            # Typically the per-user pipe budget (fs.pipe-user-pages-soft) of an unprivileged
            # service: the default pipe still works, the relay just takes smaller bites.
            with self._lock:
                self.refused += 1
                first = self.refused == 1
            if first:
                log.warning("the kernel refused a %d KiB pipe (%s); relays use the pipe size it gives",
                            self._size // 1024, (exc.strerror or str(exc)).lower())
        return Pipe(r, w, fcntl.fcntl(w, _F_GETPIPE_SZ))

    def put(self, pipe: Pipe) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(pipe)
                return
        pipe.close()

    def discard(self, pipe: Pipe) -> None:
        """A pipe that may still hold bytes of a dead connection is never reused."""
        pipe.close()

    def bite(self, pipe: Pipe, dst: socket.socket) -> int:
        """How much a direction may splice into ``pipe`` now, on its way to ``dst``. Past the
        budget, what ``dst`` has room for: a receiver that stopped reading has none, and its
        direction takes a small bite (which pins nothing: see Direction.park), while one that
        reads takes what it can at once, a pipe's worth, instead of paying for the stalled."""
        if self.pinned < self.budget:
            return pipe.size
        return min(pipe.size, max(SMALL, send_room(dst)))

    def pin(self, count: int) -> None:
        with self._lock:
            self.pinned += count

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for pipe in free:
            pipe.close()


def send_room(sock: socket.socket) -> int:
    """Bytes ``sock`` can surely take now, as far as its send buffer tells (0 when it does not
    say): the buffer's size less what waits in it, and less a sixteenth of the size for the
    kernel's own overhead, which it counts in that size (a loopback socket that just refused a
    write still shows 50-70 KiB free of 4 MiB)."""
    try:
        size = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0
    return size - size // 16 - queued
