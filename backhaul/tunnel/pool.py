"""The server's pool of idle links for the one-link-per-user transports (tcp, ws, udp).

Policy only: it keeps ``connection_pool`` links ready by asking the client for what is missing
and not yet asked for, bounds the idle links by ``channel_size``, and forgets requests the client
did not answer in time. What a link is and how it is asked for belong to the transport.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from backhaul.log import Throttles
from backhaul.metrics import METRICS
from backhaul.poolsize import PoolSizer
from backhaul.reactor import Reactor, Timer

log = logging.getLogger("backhaul.client")

REQUEST_TTL = 5.0      # a link asked for and not arrived by then is asked for again
TOP_UP_EVERY = 1.0

L = TypeVar("L")

IDLE = METRICS.gauge("backhaul_pool_idle_links", "Tunnel links open and waiting for a user (tcp, ws).", ("side",))


class LinkPool(Generic[L]):
    """Idle links in arrival order plus the requests out for more; reactor thread only."""

    def __init__(self, reactor: Reactor, capacity: int, keep_ready: int, ask: Callable[[int], None]) -> None:
        self.reactor = reactor
        self.capacity = capacity
        self.keep_ready = keep_ready
        self.ask = ask
        self.idle: collections.deque[L] = collections.deque()
        self.requested: collections.deque[float] = collections.deque()
        self._timer: Timer | None = None
        self._unwatch: Callable[[], None] | None = None

    def start(self) -> None:
        """Begin topping up, a moment from now: a client dials its own pool right after the
        handshake, and asking at once would double it."""
        self._timer = self.reactor.call_later(TOP_UP_EVERY, self._top_up)
        if self._unwatch is None:
            self._unwatch = IDLE.watch(lambda: [(("server",), len(self.idle))])

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.requested.clear()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def add(self, link: L) -> bool:
        """Keep ``link`` ready; False when ``capacity`` links already wait (the caller refuses it)."""
        if len(self.idle) >= self.capacity:
            return False
        if self.requested:
            self.requested.popleft()
        self.idle.append(link)
        return True

    def take(self) -> L | None:
        return self.idle.popleft() if self.idle else None

    def remove(self, link: L) -> bool:
        """An idle link died or spoke; False when it was not idle here."""
        try:
            self.idle.remove(link)
        except ValueError:
            return False
        return True

    def drain(self) -> list[L]:
        """Every idle link, handed back for closing."""
        links = list(self.idle)
        self.idle.clear()
        return links

    def request(self, count: int = 1) -> None:
        """Ask the client for ``count`` more links (a user arrived)."""
        now = time.monotonic()
        for _ in range(min(count, self.capacity - len(self.requested))):
            self.requested.append(now)
        self.ask(count)

    def _top_up(self) -> None:
        now = time.monotonic()
        while self.requested and now - self.requested[0] > REQUEST_TTL:
            self.requested.popleft()
        missing = self.keep_ready - len(self.idle) - len(self.requested)
        missing = min(missing, self.capacity - len(self.requested))
        if missing > 0:
            self.request(missing)
        self._timer = self.reactor.call_later(TOP_UP_EVERY, self._top_up)


class ClientPool:
    """The client's side of the pool, for every transport: opens links (or sessions) when the
    server asks and as v0.7's auto-sizing says, never more than ``cap`` open or opening.

    What a link is and how one is opened belong to the transport: ``open_one`` starts one and
    the transport calls ``opened`` when that attempt ended, however it ended.
    """

    def __init__(self, reactor: Reactor, base: int, aggressive: bool, cap: int, what: str,
                 open_one: Callable[[], None], idle: Callable[[], int], open_now: Callable[[], int]) -> None:
        self.reactor = reactor
        self.sizer = PoolSizer(base, aggressive)
        self.cap = cap
        self.what = what                  # "data connection", "smux session": for log lines
        self.open_one = open_one
        self.idle = idle                  # links waiting for a user (sampled for the sizing)
        self.open_now = open_now          # links or sessions open, in use or not
        self.opening = 0
        self.closed = False
        self._timer: Timer | None = None
        self.warn = Throttles(log)
        self._unwatch: Callable[[], None] | None = None

    def start(self, initial: int) -> None:
        self._timer = self.reactor.call_later(1.0, self._sample)
        if self.what == "data connection":   # sessions are counted by the mux metrics
            self._unwatch = IDLE.watch(lambda: [(("client",), self.idle())])
        for _ in range(initial):
            self.open()

    def stop(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    def requested(self, count: int) -> None:
        """The server asked for ``count`` more (one SG_CHAN each)."""
        for _ in range(count):
            if self.sizer.take_request():
                self.open()

    def open(self) -> None:
        if self.closed:
            return
        if self.open_now() + self.opening >= self.cap:
            self.warn.warning("cap", "not opening another %s: %d already open or opening", self.what, self.cap)
            return
        self.opening += 1
        self.open_one()

    def opened(self, error: str = "") -> None:
        """One attempt of ``open_one`` ended; ``error`` says why it failed."""
        self.opening -= 1
        if error:
            self.warn.warning("failed", "%s failed: %s", self.what, error)

    def _sample(self) -> None:
        if self.sizer.sample(self.idle(), self.open_now() + self.opening):
            self.open()
        self._timer = self.reactor.call_later(1.0, self._sample)
