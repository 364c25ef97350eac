"""Pipes for ``os.splice``, shared by every relay of one reactor.

A relay direction holds a pipe only while bytes sit in it, so idle connections cost no pipe and
the number of pipes follows the number of busy directions, not of connections.
"""

from __future__ import annotations

import fcntl
import os
import threading

CHUNK = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Pipes shared by all connections: a direction holds one only while bytes sit in it."""

    def __init__(self, keep: int = 64) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep
        self._lock = threading.Lock()

    def get(self) -> tuple[int, int]:
        with self._lock:
            if self._free:
                return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass  # the default 64 KiB pipe still works, just with more rounds
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])

    def discard(self, pipe: tuple[int, int]) -> None:
        """A pipe that may still hold bytes of a dead connection is never reused."""
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for pipe in free:
            self.discard(pipe)


_PIPES = PipePool()
