"""Whether bulk crosses an smux session, from the bytes it moves.

A stream opened on a session that carries a download waits behind the download's frames, and on
a real path behind each of its lost packets for a round trip (TCP delivers in order). The server
keeps new streams off such sessions; it must see them first. On a long path a download arrives
paced at the path's rate, so reads never fill the buffer and the socket never refuses bytes: only
the rate tells. Interactive traffic (a shell, a game, requests and their answers) stays far below
BULK_BYTES in a BULK_WINDOW.
"""

from __future__ import annotations

BULK_BYTES = 256 * 1024   # bytes moved (either way) within one window that make a session busy
BULK_WINDOW = 0.25        # seconds
BULK_HOLD = 1.0           # a session stays busy this long after its last busy window


class BulkGauge:
    """Counts a session's bytes in windows of BULK_WINDOW seconds (time is given, not read)."""

    __slots__ = ("_start", "_bytes", "_until")

    def __init__(self) -> None:
        self._start = float("-inf")
        self._bytes = 0
        self._until = float("-inf")

    def moved(self, count: int, now: float) -> bool:
        """``count`` bytes went in or out at ``now``; True when that makes a quiet session busy."""
        if now - self._start > BULK_WINDOW:
            self._start, self._bytes = now, 0
        self._bytes += count
        if self._bytes < BULK_BYTES:
            return False
        began = now >= self._until
        self._until = now + BULK_HOLD
        self._start, self._bytes = now, 0
        return began

    def busy(self, now: float) -> bool:
        return now < self._until
