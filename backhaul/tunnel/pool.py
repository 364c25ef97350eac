"""The server's pool of idle links for the one-link-per-user transports (tcp, ws, udp).

Policy only: it keeps links ready by asking the client for what is missing and not yet asked
for, bounds the idle links by ``channel_size``, and forgets requests the client did not answer in
time. A pool that can give links back (tcp, ws, wss: closing an idle link is all it takes, a Go
client just forgets it) follows the users: it asks ahead as fast as they take links and closes
what it asked ahead once they are gone (tunnel/demand.py). The udp pool keeps ``connection_pool``.
What a link is and how it is asked for belong to the transport.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from backhaul.log import Throttles
from backhaul.metrics import METRICS
from backhaul.poolsize import PoolSizer
from backhaul.reactor import Reactor, Timer
from backhaul.tunnel.demand import LinkDemand

log = logging.getLogger("backhaul.tunnel.pool")

REQUEST_TTL = 5.0      # a link asked for and not arrived by then is asked for again
TOP_UP_EVERY = 1.0
TIMESCALE_ENV = "BACKHAUL_POOL_TIMESCALE"   # undocumented: shortens the pool's time constants (tests)

L = TypeVar("L")

IDLE = METRICS.gauge("backhaul_pool_idle_links", "Tunnel links open and waiting for a user (tcp, ws).", ("side",))


def timescale() -> float:
    """The factor of the pool's time constants: 1, or a shorter one from the environment."""
    text = os.environ.get(TIMESCALE_ENV, "")
    if not text:
        return 1.0
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.01 <= value <= 1.0:
        log.warning("ignored %s=%r: not a number from 0.01 to 1", TIMESCALE_ENV, text)
        return 1.0
    return value


class LinkPool(Generic[L]):
    """Idle links in arrival order plus the requests out for more; reactor thread only.

    With ``retire`` (how an idle link is closed) the pool follows its users (``LinkDemand``);
    without it, it keeps ``keep_ready`` links.
    """

    def __init__(self, reactor: Reactor, capacity: int, keep_ready: int, ask: Callable[[int], None],
                 retire: Callable[[L], None] | None = None) -> None:
        self.reactor = reactor
        self.capacity = capacity
        self.keep_ready = keep_ready
        self.ask = ask
        self.retire = retire
        self.idle: collections.deque[L] = collections.deque()
        self.requested: collections.deque[float] = collections.deque()
        self.demand: LinkDemand | None = None
        self.every = TOP_UP_EVERY
        if retire is not None:
            scale = timescale()
            self.demand = LinkDemand(keep_ready, capacity, timescale=scale)
            self.every = TOP_UP_EVERY * scale
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
            # Links answer requests in order as far as the pool can tell: a link the client
            # dialed of its own accord, or a request it skipped, shifts the match by one
            # request, which adds one request's spacing to the arrival time measured.
            asked = self.requested.popleft()
            if self.demand is not None:
                self.demand.arrived(time.monotonic() - asked)
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
        """Ask the client for ``count`` more links."""
        now = time.monotonic()
        for _ in range(min(count, self.capacity - len(self.requested))):
            self.requested.append(now)
        self.ask(count)

    def user_arrived(self) -> None:
        """A user arrived and takes a link (before it is taken): ask for the one that replaces
        it, and for more while the users come faster than links arrive."""
        if self.demand is None:
            self.request(1)
            return
        now = time.monotonic()
        self._forget_unanswered(now)
        self.demand.user(now)
        count = self.demand.to_ask(now, len(self.idle) + len(self.requested) - 1, for_user=True)
        if count:
            self.request(count)

    def _forget_unanswered(self, now: float) -> None:
        while self.requested and now - self.requested[0] > REQUEST_TTL:
            self.requested.popleft()

    def _top_up(self) -> None:
        now = time.monotonic()
        self._forget_unanswered(now)
        if self.demand is None:
            missing = self.keep_ready - len(self.idle) - len(self.requested)
        else:
            stock = len(self.idle) + len(self.requested)
            surplus = self.demand.to_close(now, len(self.idle), stock)
            if surplus:
                self._shrink(surplus)
            missing = self.demand.to_ask(now, stock - surplus)
            if missing <= 0 and not self.requested:
                missing = self.demand.to_probe(now)
        missing = min(missing, self.capacity - len(self.requested))
        if missing > 0:
            self.request(missing)
        self._timer = self.reactor.call_later(self.every, self._top_up)

    def _shrink(self, count: int) -> None:
        """Close ``count`` idle links the load no longer needs, the oldest first: the likeliest to
        have been dropped by a middlebox meanwhile."""
        assert self.retire is not None
        for _ in range(count):
            self.retire(self.idle.popleft())
        log.debug("closed %d idle data connections the load no longer needs; %d idle, %d asked for",
                         count, len(self.idle), len(self.requested))


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
