"""Failed handshakes counted per source address: past a limit within a window, the address's new
connections are closed unread until its window ends.

Token guessing and floods of junk cost the server a read, a judgement and a log line each; an
address that keeps failing gets one line a window and costs an accept and a close afterwards.
Addresses the owner exempts (those of its clients, whose own links fail in numbers when a
control channel drops) are never refused: their failures are still judged one by one, and the
line at the limit says so instead of claiming a refusal. The table of addresses is bounded,
oldest first out.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from backhaul.log import Throttle
from backhaul.metrics import METRICS

log = logging.getLogger("backhaul.tunnel.limiter")

HANDSHAKE_FAILURES = METRICS.counter("backhaul_handshake_failures_total", "Connections to the tunnel port turned "
                                     "away, by reason (token, timeout, garbage, closed, foreign, ...).", ("reason",))

FAILURES = 20        # failed handshakes one address may cause in a window
WINDOW = 10.0        # seconds
MAX_SOURCES = 4096   # addresses remembered at once


class _Source:
    __slots__ = ("start", "failures", "refused")

    def __init__(self, start: float) -> None:
        self.start = start
        self.failures = 0
        self.refused = 0


class FailureLimiter:
    """Counts failures by address in fixed windows; reactor thread only."""

    def __init__(self, limit: int = FAILURES, window: float = WINDOW, max_sources: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.monotonic,
                 exempt: Callable[[str], bool] = lambda _ip: False) -> None:
        self.limit = limit
        self.exempt = exempt
        self.window = window
        self.max_sources = max_sources
        self.clock = clock
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()
        self._lines = Throttle(log)   # many addresses crossing at once still cost a line a second

    def _current(self, ip: str, now: float) -> _Source | None:
        source = self._sources.get(ip)
        if source is not None and now - source.start >= self.window:
            del self._sources[ip]
            source = None
        return source

    def failed(self, ip: str) -> None:
        """One more failed handshake from ``ip``; the one that reaches the limit is logged."""
        now = self.clock()
        source = self._current(ip, now)
        if source is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
            source = self._sources[ip] = _Source(now)
        source.failures += 1
        if source.failures == self.limit:
            held = self._lines.allow()
            if held is None:
                return
            more = f" ({held} more addresses like it)" if held else ""
            if self.exempt(ip):
                log.warning("%d failed handshakes within %g s from %s, the address of a client of this tunnel: "
                            "not refused, each is judged%s", self.limit, self.window, ip, more)
            else:
                log.warning("refusing connections from %s for %g s: %d failed handshakes within %g s%s", ip,
                            self.window - (now - source.start), self.limit, self.window, more)

    def refuses(self, ip: str) -> bool:
        """True (and counted) when ``ip`` reached the limit in its current window and is not exempt."""
        source = self._current(ip, self.clock())
        if source is None or source.failures < self.limit or self.exempt(ip):
            return False
        source.refused += 1
        HANDSHAKE_FAILURES.inc(1, "limited")
        return True

    def __len__(self) -> int:
        return len(self._sources)
