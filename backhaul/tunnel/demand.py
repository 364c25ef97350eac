"""How many links the server keeps asked for ahead of its users (tcp, ws, wss), as arithmetic.

A user takes an idle link the moment it arrives; the link asked for in its place (one 0x01 on the
control channel, the client's dial, for ws its upgrade) arrives a while later: about two round
trips over a long path. Users that come faster than that find the pool empty and each waits for
a link of its own. So the server holds, idle or on their way, as many links as users arrive while
one is on its way (arrival rate x arrival time, Little's law), with headroom, on top of
``connection_pool``. Users come unevenly, some in waves (50 at once, each back one round trip
later, as ``ab -c 50`` does) that want a whole wave's worth at once: so the pool counts the users
of about the last arrival time, holds the most it saw, and lets that fade slowly, which carries
it through pauses and, once the load is gone, shrinks it back.

Only the links asked for beyond one per user are ever closed again: each user's link is replaced
as the Go server does, and the links a client opened of its own accord (its ``connection_pool``,
which v0.7.2 configures on the client alone, and what its pool sizing adds) stay as many as they
were, so a client that keeps more than the server's ``connection_pool`` keeps them.

Nothing here does I/O: time enters as ``now`` (seconds, monotonic), the pool says what happened.
"""

from __future__ import annotations

import math

HEADROOM = 1.5            # links asked for ahead per user expected while one is on its way...
SLACK = 2.0               # ...and kept before any is closed: a pool that just holds its load
#                           (users in waves a second apart) closes nothing to ask for it again
HOLD = 5.0                # s, time constant with which the most users seen fades: it carries the
#                           pool through pauses and shrinks it after the load (in 30-50 s)
WAIT_WEIGHT = 0.25        # weight of a new arrival time in the smoothed one
AHEAD_PER_SECOND = 500.0  # links asked for beyond one per user, at most, a second...
AHEAD_BURST = 100         # ...and at once: 200 users at once at 100 ms want ~300 ahead, and at
#                           200 a second the first seconds of such a load waited (ab -c 200 of
#                           2,000 requests: 1.2x direct rather than 1.5x)
PROBE_WAIT = 5.0          # s a link asked for to time the arrival may take (the pool's request TTL)
SHRINK_LEAST = 8          # a step closes at most this many idle links or a quarter of them, the more
SHRINK_SHARE = 4


class RecentCount:
    """Events of about the last ``span`` seconds: each counts one, fading with constant ``span``
    (which may change from one call to the next)."""

    __slots__ = ("value", "at")

    def __init__(self) -> None:
        self.value = 0.0
        self.at = 0.0

    def add(self, now: float, span: float) -> None:
        self.value = self.get(now, span) + 1
        self.at = max(now, self.at)

    def get(self, now: float, span: float) -> float:
        if not self.value or span <= 0:
            return 0.0
        return self.value * math.exp(-max(0.0, now - self.at) / span)


class LinkDemand:
    """The target of one client's pool of links: ``base`` (connection_pool) plus the links its
    users take while one is on its way, never more than ``capacity`` (channel_size).

    The pool tells it when a user arrives (``user``) and how long each link it asked for took
    (``arrived``); it answers how many links to ask for (``to_ask``) and how many idle links to
    close (``to_close``). ``timescale`` shortens the time constants (tests).
    """

    def __init__(self, base: int, capacity: int, *, timescale: float = 1.0,
                 ahead_per_second: float = AHEAD_PER_SECOND, ahead_burst: int = AHEAD_BURST) -> None:
        self.base = base
        self.capacity = capacity
        self.hold = HOLD * timescale
        self.recent = RecentCount()
        self.peak = 0.0                     # the most users of one arrival time lately...
        self.peak_at = 0.0                  # ...and when, since when it fades
        self.wait = 0.0                     # smoothed s from a request to its link (0: none arrived yet)
        self.ahead_per_second = ahead_per_second
        self.ahead_burst = ahead_burst
        self.tokens = float(ahead_burst)    # links that may be asked for beyond one per user now
        self.refilled: float | None = None
        self.ahead = 0                      # links asked for beyond one per user, not closed since
        self.probe_until = 0.0              # a link asked for to time the arrival: till when it may come

    def user(self, now: float) -> None:
        """A user arrived: it takes a link, now or when one comes."""
        self.recent.add(now, self.wait)
        recent = self.recent.get(now, self.wait)
        if recent >= self.on_the_way(now):
            self.peak, self.peak_at = recent, now

    def arrived(self, waited: float) -> None:
        """A link arrived ``waited`` seconds after it was asked for."""
        waited = max(0.0, waited)
        self.wait = waited if not self.wait else self.wait + WAIT_WEIGHT * (waited - self.wait)

    def on_the_way(self, now: float) -> float:
        """Users to expect while a link is on its way: the most that came in one arrival time
        lately, fading with ``HOLD``."""
        if not self.peak:
            return 0.0
        return self.peak * math.exp(-max(0.0, now - self.peak_at) / self.hold)

    def target(self, now: float, headroom: float = HEADROOM) -> int:
        """Links wanted idle or on their way."""
        ahead = round(self.on_the_way(now) * headroom)
        return min(self.capacity, self.base + ahead)

    def to_ask(self, now: float, stock: int, *, for_user: bool = False) -> int:
        """How many links to ask for now, with ``stock`` links idle or on their way (less the one
        a user who just arrived takes, ``for_user``). That user's link is replaced whatever the
        stock, as the Go server does; the links missing beyond it are asked for only as fast as
        the cap on dials allows."""
        replace = 1 if for_user else 0
        missing = self.target(now) - stock - replace
        if missing <= 0:
            return replace
        self._refill(now)
        extra = min(missing, int(self.tokens))
        self.tokens -= extra
        self.ahead = min(self.ahead + extra, self.capacity)
        return replace + extra

    def to_probe(self, now: float) -> int:
        """1 while no link asked for has arrived yet (the pool asks for it when none is on its
        way): how long a link takes is then known before the first wave of users needs it, not
        one arrival time after it began. It counts as asked ahead, so it is closed again as
        they are, once it came (until then no idle link is closed to make room for it)."""
        if self.wait or self.ahead >= self.capacity:
            return 0
        self.ahead += 1
        self.probe_until = now + PROBE_WAIT
        return 1

    def to_close(self, now: float, idle: int, stock: int) -> int:
        """How many of the ``idle`` links to close now (``stock``: idle and on their way): those
        beyond the target that were asked for ahead, a bounded share at a time, so a pool a load
        left behind goes gradually. The caller closes them."""
        if not self.wait and now < self.probe_until:
            return 0
        # Asked-for links that never came are no longer in the stock: no more of it was ours.
        self.ahead = min(self.ahead, stock)
        surplus = min(idle, stock - self.target(now, SLACK), self.ahead)
        if surplus <= 0:
            return 0
        count = min(surplus, max(SHRINK_LEAST, idle // SHRINK_SHARE))
        self.ahead -= count
        return count

    def _refill(self, now: float) -> None:
        if self.refilled is not None:
            gained = max(0.0, now - self.refilled) * self.ahead_per_second
            self.tokens = min(float(self.ahead_burst), self.tokens + gained)
        self.refilled = now
