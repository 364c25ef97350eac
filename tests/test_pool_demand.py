"""The link pool's demand estimate (tunnel/demand.py) on synthetic timelines, without sockets.

A small event simulation plays the pool as tunnel/pool.py drives it: a user asks through
``to_ask(for_user=True)`` before it takes a link, a link asked for arrives ``wait`` seconds later,
and a tick every second closes ``to_close`` idle links (oldest first) and asks ``to_ask`` more.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from backhaul.reactor import Timer
from backhaul.tunnel import pool
from backhaul.tunnel.demand import AHEAD_BURST, AHEAD_PER_SECOND, LinkDemand, RecentCount
from backhaul.tunnel.pool import LinkPool

pytestmark = pytest.mark.timeout(30)

BASE = 8


@dataclass
class Timeline:
    """What happened to one simulated pool."""

    demand: LinkDemand
    wait: float
    idle: int = BASE
    on_way: int = 0
    waiting: int = 0                   # users with no link yet
    served_at_once: int = 0
    users: int = 0
    asked_by_user: int = 0             # links asked for when a user arrived
    asked_by_tick: int = 0
    closed: int = 0
    asks: list[tuple[float, int]] = field(default_factory=list)     # (when, how many)
    idle_at: list[tuple[float, int]] = field(default_factory=list)  # after every tick
    closes: list[tuple[int, int]] = field(default_factory=list)     # per tick: (idle, closed)
    _events: list[tuple[float, int, str]] = field(default_factory=list)
    _seq: int = 0

    def at(self, when: float, what: str) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, what))

    def _ask(self, now: float, count: int) -> None:
        if count:
            self.asks.append((now, count))
            self.on_way += count
            for _ in range(count):
                self.at(now + self.wait, "link")

    def run(self, until: float) -> None:
        while self._events and self._events[0][0] <= until:
            now, _seq, what = heapq.heappop(self._events)
            if what == "user":
                self.users += 1
                self.demand.user(now)
                count = self.demand.to_ask(now, self.idle + self.on_way - 1, for_user=True)
                self.asked_by_user += count
                self._ask(now, count)
                if self.idle:
                    self.idle -= 1
                    self.served_at_once += 1
                else:
                    self.waiting += 1
            elif what == "link":
                self.on_way -= 1
                self.demand.arrived(self.wait)
                if self.waiting:
                    self.waiting -= 1
                else:
                    self.idle += 1
            else:  # tick
                stock = self.idle + self.on_way
                surplus = self.demand.to_close(now, self.idle, stock)
                self.idle -= surplus
                self.closed += surplus
                self.closes.append((self.idle + surplus, surplus))
                count = self.demand.to_ask(now, stock - surplus)
                self.asked_by_tick += count
                self._ask(now, count)
                self.idle_at.append((now, self.idle))
                self.at(now + 1.0, "tick")


def timeline(wait: float, users_per_second: float, load: tuple[float, float], capacity: int = 2048,
             seconds: float = 0.0, own: int = BASE, base: int = BASE) -> Timeline:
    """A pool whose links take ``wait`` s to arrive, starting with the ``own`` links the client
    dialed by itself, users evenly spaced from ``load[0]`` to ``load[1]``, run for ``seconds``
    (default: until the load ends)."""
    tl = Timeline(LinkDemand(base, capacity), wait, idle=own)
    tl.at(1.0, "tick")
    start, end = load
    count = int((end - start) * users_per_second)
    for index in range(count):
        tl.at(start + index / users_per_second, "user")
    tl.run(seconds or end)
    return tl


def test_the_recent_count_is_the_events_of_about_one_span():
    recent = RecentCount()
    for index in range(3000):          # 100 a second for 30 s, counted over 0.2 s spans
        recent.add(index / 100, 0.2)
    assert recent.get(29.99, 0.2) == pytest.approx(20, abs=1)
    assert recent.get(31.0, 0.2) < 20 * math.exp(-4)
    assert recent.get(29.0, 0.2) == recent.get(29.99, 0.2), "a time before the last event reads as it"
    assert recent.get(30.0, 0.0) == 0, "no span (no arrival time known): nothing counted"


def test_without_a_measured_arrival_time_each_user_asks_for_its_replacement_only():
    """Before any requested link arrived the pool behaves like the Go server: one 0x01 per user."""
    demand = LinkDemand(BASE, 2048)
    asks = [demand.to_ask(index / 100, BASE - 1, for_user=True) for index in range(50) if demand.user(index / 100)
            is None]
    assert asks == [1] * 50
    assert demand.target(0.5) == BASE


def test_a_burst_of_users_makes_the_pool_ask_ahead():
    """250 users a second over a path where a link takes 0.2 s: the pool asks for many more
    links than users after the first arrivals, and holds arrival rate x time x headroom."""
    tl = timeline(wait=0.2, users_per_second=250, load=(1.0, 6.0))
    assert tl.asked_by_user + tl.asked_by_tick > tl.users + 50
    # 250/s x 0.2 s x 1.5 = 75 ahead of connection_pool, give or take
    assert 70 <= tl.demand.target(6.0) - BASE <= 85
    # once the estimate has caught up, users find links ready
    late = timeline(wait=0.2, users_per_second=250, load=(1.0, 11.0), seconds=6.0)
    before = late.served_at_once
    late.run(11.0)
    assert late.served_at_once - before >= 0.99 * (late.users - 1250), (late.served_at_once, late.users)


@pytest.mark.parametrize(("wait", "every"), [(0.1, 0.2), (0.2, 0.1), (0.1, 1.0)])
def test_users_in_waves_find_links_and_none_is_closed_between_waves(wait: float, every: float):
    """50 users at once every ``every`` s (ab -c 50: each back one round trip later): the average
    rate undercounts a wave that comes back before its links do; the pool holds a wave's worth
    and, through the gaps between waves, closes nothing it would ask for again."""
    tl = Timeline(LinkDemand(BASE, 2048), wait)
    tl.at(1.0, "tick")
    waves = int(10 / every)
    for wave in range(waves):
        for index in range(50):
            tl.at(1.0 + wave * every + index * 0.0001, "user")
    tl.run(4.5)   # the first waves grow it, as fast as the cap on dials lets them
    users, served = tl.users, tl.served_at_once
    tl.run(11.0)
    assert tl.served_at_once - served >= 0.99 * (tl.users - users), (tl.served_at_once - served, tl.users - users)
    assert tl.closed == 0


def test_one_replacement_per_user_is_what_runs_dry():
    """The same load with the arrival time unknown to the pool (Go's policy): most users wait."""
    tl = Timeline(LinkDemand(BASE, 2048), wait=0.2)
    tl.demand.arrived = lambda waited: None   # type: ignore[method-assign]  # never learns the time
    for index in range(1250):
        tl.at(1.0 + index / 250, "user")
    tl.run(6.0)
    assert tl.served_at_once < 0.1 * tl.users


def test_slower_links_make_it_ask_further_ahead():
    fast = timeline(wait=0.1, users_per_second=200, load=(1.0, 11.0), seconds=6.0)
    slow = timeline(wait=0.4, users_per_second=200, load=(1.0, 11.0), seconds=6.0)
    ahead_fast = fast.demand.target(6.0) - BASE
    ahead_slow = slow.demand.target(6.0) - BASE
    assert ahead_slow == pytest.approx(4 * ahead_fast, rel=0.1), (ahead_fast, ahead_slow)
    users, served = slow.users, slow.served_at_once
    slow.run(11.0)
    assert slow.served_at_once - served >= 0.99 * (slow.users - users)


def test_the_arrival_time_follows_the_path():
    demand = LinkDemand(BASE, 2048)
    demand.arrived(0.1)
    assert demand.wait == pytest.approx(0.1)
    for _ in range(30):
        demand.arrived(0.3)
    assert demand.wait == pytest.approx(0.3, rel=0.01)


def test_the_pool_shrinks_back_to_connection_pool_gradually_after_the_load():
    tl = timeline(wait=0.2, users_per_second=250, load=(1.0, 21.0))
    peak = tl.idle
    assert peak > 4 * BASE
    tl.run(21.0 + 60.0)
    after = [(when, idle) for when, idle in tl.idle_at if when > 21.0]
    assert after[-1][1] == BASE
    back = next(when for when, idle in after if idle == BASE)
    assert back - 21.0 <= 45, f"back to connection_pool {back - 21.0:.0f} s after the load"
    assert min(idle for _when, idle in after) == BASE, "never below connection_pool"
    # gradually: no tick closes more than its share, and the pool takes several ticks to shrink
    assert all(count <= max(8, idle // 4) for idle, count in tl.closes), tl.closes
    assert sum(1 for _idle, count in tl.closes if count) >= 5
    # a pause of a few seconds keeps most of it
    assert next(idle for when, idle in after if when > 24.0) > peak // 2


def test_asking_ahead_respects_the_cap_on_dials():
    """10,000 users a second on a 1 s path: beyond one link per user, at most AHEAD_PER_SECOND
    a second (and AHEAD_BURST at once) are asked for."""
    tl = timeline(wait=1.0, users_per_second=10_000, load=(1.0, 4.0))
    extra = tl.asked_by_user + tl.asked_by_tick - tl.users
    assert extra <= AHEAD_BURST + AHEAD_PER_SECOND * 3 + BASE
    for second in range(1, 4):
        in_it = sum(count for when, count in tl.asks if second <= when < second + 1)
        users = sum(1 for index in range(30_000) if second <= 1.0 + index / 10_000 < second + 1)
        assert in_it - users <= AHEAD_BURST + AHEAD_PER_SECOND + BASE


def test_channel_size_bounds_what_is_asked_for():
    tl = timeline(wait=0.5, users_per_second=1000, load=(1.0, 6.0), capacity=100)
    assert tl.demand.target(6.0) == 100
    # the links on their way beyond those the waiting users take would wait idle: 100 at most
    assert tl.idle + tl.on_way - tl.waiting <= 100


def test_only_idle_links_asked_for_ahead_and_beyond_the_target_are_closed():
    demand = LinkDemand(BASE, 2048)
    assert demand.to_close(0.0, idle=40, stock=40) == 0            # the client's own: none asked ahead
    demand.ahead = 30                                              # as if asked for under a load
    assert demand.to_close(0.0, idle=3, stock=BASE + 20) == 3      # the rest is on its way
    assert demand.ahead == 25                                      # (no more than the stock was ours)
    assert demand.to_close(0.0, idle=40, stock=40) == 10           # a quarter of them at a time
    assert demand.ahead == 15
    assert demand.to_close(0.0, idle=12, stock=12) == 4            # down to the target
    assert demand.to_close(0.0, idle=BASE, stock=BASE) == 0
    assert demand.to_close(0.0, idle=4, stock=4) == 0              # below the target
    assert demand.ahead == 4, "what never arrived is no longer counted"


def test_a_client_that_keeps_more_links_than_connection_pool_keeps_them():
    """v0.7.2 sets connection_pool on the client: a client with 3 x the server's keeps them all,
    idle or after a load, and each user's link is replaced as the Go server does."""
    own = 3 * BASE
    tl = timeline(wait=0.2, users_per_second=2, load=(1.0, 31.0), own=own)
    assert tl.closed == 0 and tl.idle == own
    assert tl.asked_by_user == tl.users
    tl = timeline(wait=0.2, users_per_second=250, load=(1.0, 11.0), own=own)
    tl.run(11.0 + 60.0)
    assert tl.closed > 0 and tl.idle == own


def test_with_no_pool_on_the_server_the_client_keeps_its_own():
    """connection_pool = 0 on the server: it asks ahead under load and gives back only that."""
    tl = timeline(wait=0.2, users_per_second=250, load=(1.0, 11.0), own=2, base=0)
    assert tl.idle > 20
    tl.run(11.0 + 60.0)
    assert tl.idle == 2


def test_the_timescale_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.delenv(pool.TIMESCALE_ENV, raising=False)
    assert pool.timescale() == 1.0
    monkeypatch.setenv(pool.TIMESCALE_ENV, "0.25")
    assert pool.timescale() == 0.25
    for bad in ("0", "fast", "2"):
        monkeypatch.setenv(pool.TIMESCALE_ENV, bad)
        with caplog.at_level(logging.WARNING, logger="backhaul.tunnel.pool"):
            assert pool.timescale() == 1.0
        assert f"ignored {pool.TIMESCALE_ENV}={bad!r}" in caplog.text


# ------------------------------------------------------------------------------------------------
# the pool that drives it (tunnel/pool.py), on a clock of the test's

class Clock:
    """The reactor's timers and the pool's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Timer] = []

    def call_later(self, delay: float, fn: Callable[..., None], *args: object) -> Timer:
        timer = Timer(self.now + delay, fn, args)
        self.timers.append(timer)
        return timer

    def monotonic(self) -> float:
        return self.now

    def run_until(self, when: float) -> None:
        while True:
            due = [timer for timer in self.timers if timer.when <= when and not timer.cancelled]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.fn(*timer.args)
        self.now = when


def test_the_pool_asks_ahead_in_a_burst_and_closes_the_oldest_links_it_asked_for_after(
        monkeypatch: pytest.MonkeyPatch):
    """The pool's glue: requests matched with arrivals, users' links replaced, the links asked
    ahead closed through ``retire`` after the load, the oldest first, down to keep_ready."""
    clock = Clock()
    monkeypatch.setattr(pool.time, "monotonic", clock.monotonic)
    monkeypatch.delenv(pool.TIMESCALE_ENV, raising=False)
    asked: list[int] = []
    closed: list[str] = []
    serial = iter(range(10_000))
    links: LinkPool[str] = LinkPool(clock, capacity=500, keep_ready=2,  # type: ignore[arg-type]
                                    ask=lambda count: ask(count), retire=closed.append)

    def arrive(count: int) -> None:
        for _ in range(count):
            assert links.add(f"link{next(serial)}")

    def ask(count: int) -> None:               # the client: every link asked for comes 0.2 s later
        asked.append(count)
        clock.call_later(0.2, arrive, count)

    links.start()
    try:
        for _ in range(2):                      # the client's own, right after the handshake
            assert links.add(f"own{next(serial)}")
        # a first user: its link replaced, nothing more (no arrival time known yet)
        links.user_arrived()
        assert links.take() == "own0"
        assert asked == [1]
        clock.run_until(0.5)
        # 40 users within 10 ms: each link replaced, and the pool asks ahead
        asked.clear()
        waiting = 0
        for index in range(40):
            clock.now = 0.5 + index * 0.00025
            links.user_arrived()
            waiting += links.take() is None
        assert sum(asked) > 40 + 20, asked
        clock.run_until(0.8)
        for _ in range(waiting):                # the users that waited take theirs
            assert links.take() is not None
        clock.run_until(2.0)
        assert len(links.idle) > 40 and not closed
        grown = list(links.idle)

        # no users any more: back to keep_ready, oldest first, a bounded share a tick
        clock.run_until(60.0)
        assert len(links.idle) == 2
        assert closed == grown[:len(closed)], "the oldest idle links go first"
        assert not links.requested
    finally:
        links.stop()


def test_an_idle_pool_times_one_link_before_its_first_users(monkeypatch: pytest.MonkeyPatch):
    """With no arrival time known, the pool asks for one link ahead at its first top-up, so the
    first wave of users is met with links asked ahead (not one arrival time later); one only."""
    clock = Clock()
    monkeypatch.setattr(pool.time, "monotonic", clock.monotonic)
    monkeypatch.delenv(pool.TIMESCALE_ENV, raising=False)
    asked: list[int] = []
    links: LinkPool[str] = LinkPool(clock, capacity=500, keep_ready=2,  # type: ignore[arg-type]
                                    ask=lambda count: ask(count), retire=lambda link: None)

    def ask(count: int) -> None:               # the client: every link asked for comes 0.2 s later
        asked.append(count)
        clock.call_later(0.2, lambda: [links.add("asked") for _ in range(count)])

    links.start()
    try:
        for name in ("own0", "own1"):          # the client's own, right after the handshake
            assert links.add(name)
        clock.run_until(1.3)                   # asked at the first top-up (1 s), come at 1.2 s
        assert asked == [1]
        assert links.demand is not None and links.demand.wait == pytest.approx(0.2)
        clock.run_until(5.0)
        assert asked == [1]                    # timed once: no more while nobody comes
        asked.clear()
        for _ in range(20):                    # a wave: each replaced, and more asked ahead at once
            links.user_arrived()
            links.take()
        assert sum(asked) > 20, asked
    finally:
        links.stop()


def test_no_idle_link_is_closed_to_make_room_for_the_timing_link():
    """The link asked for to time the arrival is ahead of connection_pool; until it came, the
    idle links stay (a client that never answers it keeps its own), then it is the one closed."""
    demand = LinkDemand(1, 100)
    assert demand.to_probe(0.0) == 1
    assert demand.to_close(1.0, idle=1, stock=2) == 0
    demand.arrived(0.2)
    assert demand.to_probe(1.3) == 0          # timed: no second one
    assert demand.to_close(1.3, idle=2, stock=2) == 1
