"""How many links the server keeps asked for ahead of its users (tcp, ws, wss), as arithmetic.

A user takes an idle link the moment it arrives; the link asked for in its place (one 0x01 on the
control channel, the client's dial, for ws its upgrade) arrives a while later: about two round
trips over a long path. Users that come faster than that find the pool empty and each waits for
a link of its own. So the server holds, idle or on their way, as many links as users arrive while
one is on its way (arrival rate x arrival time, Little's law), with headroom, on top of
``connection_pool``; when the load is gone the rate decays and the pool shrinks back.

Only the links asked for beyond one per user are ever closed again: each user's link is replaced
as the Go server does, and the links a client opened of its own accord (its ``connection_pool``,
which v0.7.2 configures on the client alone, and what its pool sizing adds) stay as many as they
were, so a client that keeps more than the server's ``connection_pool`` keeps them.

Nothing here does I/O: time enters as ``now`` (seconds, monotonic), the pool says what happened.
"""

from __future__ import annotations

import math

HEADROOM = 1.5            # links ahead per link the measured rate and arrival time call for
RISE = 0.5                # s, time constant of the rate that follows a rising load
HOLD = 6.0                # s, time constant of the rate that carries the pool through pauses and
#                           shrinks it after the load (back to connection_pool within about 30 s)
WAIT_WEIGHT = 0.25        # weight of a new arrival time in the smoothed one
AHEAD_PER_SECOND = 200.0  # links asked for beyond one per user, at most, a second...
AHEAD_BURST = 50          # ...and at once
SHRINK_LEAST = 8          # a step closes at most this many idle links or a quarter of them, the more
SHRINK_SHARE = 4


class DecayingRate:
    """Events per second, each event counted for a time that decays with constant ``tau``: under
    a steady rate it converges to that rate; without events it decays to nothing."""

    __slots__ = ("tau", "value", "at")

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.value = 0.0
        self.at = 0.0

    def add(self, now: float, count: int = 1) -> None:
        self.value = self.get(now) + count / self.tau
        self.at = max(now, self.at)

    def get(self, now: float) -> float:
        if not self.value:
            return 0.0
        return self.value * math.exp(-max(0.0, now - self.at) / self.tau)


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
        self.rise = DecayingRate(RISE * timescale)
        self.hold = DecayingRate(HOLD * timescale)
        self.wait = 0.0                     # smoothed s from a request to its link (0: none arrived yet)
        self.ahead_per_second = ahead_per_second
        self.ahead_burst = ahead_burst
        self.tokens = float(ahead_burst)    # links that may be asked for beyond one per user now
        self.refilled: float | None = None
        self.ahead = 0                      # links asked for beyond one per user, not closed since

    def user(self, now: float) -> None:
        """A user arrived: it takes a link, now or when one comes."""
        self.rise.add(now)
        self.hold.add(now)

    def arrived(self, waited: float) -> None:
        """A link arrived ``waited`` seconds after it was asked for."""
        waited = max(0.0, waited)
        self.wait = waited if not self.wait else self.wait + WAIT_WEIGHT * (waited - self.wait)

    def rate(self, now: float) -> float:
        """Users a second: the faster of the two rates, so the pool grows as fast as the load does
        and shrinks only as fast as the slow one forgets it."""
        return max(self.rise.get(now), self.hold.get(now))

    def target(self, now: float) -> int:
        """Links wanted idle or on their way."""
        ahead = round(self.rate(now) * self.wait * HEADROOM)
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

    def to_close(self, now: float, idle: int, stock: int) -> int:
        """How many of the ``idle`` links to close now (``stock``: idle and on their way): those
        beyond the target that were asked for ahead, a bounded share at a time, so a pool a load
        left behind goes gradually. The caller closes them."""
        # Asked-for links that never came are no longer in the stock: no more of it was ours.
        self.ahead = min(self.ahead, stock)
        surplus = min(idle, stock - self.target(now), self.ahead)
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
