"""The last hour of traffic of each port and each peer, for the status page's graphs: bytes each
way per ten seconds in a fixed ring per name, fed from the usage totals by the page's sampler.

Bounded: 360 samples a direction per series, at most ``MAX_SERIES`` series per history (a name
past it is not graphed until one whose name is gone makes room), so a history costs at most
about 400 KiB however many ports a range opens or clients come and go.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping

STEP = 10                 # seconds per sample
SPAN = 3600               # seconds kept
MIN_SPAN = 300            # seconds a graph spans at least, so a young process's traffic is not a sliver
POINTS = SPAN // STEP
MAX_SERIES = 64           # names graphed: a page of more graphs would be slow to build and to read

Totals = Mapping[str, tuple[int, int]]   # name -> (bytes to the target, bytes to the user) since start
Point = tuple[float, float, float, float]  # seconds ago at its end, seconds long, bytes/s to target, to user


class Series:
    """One name's ring: bytes to the target and to the user per ``STEP``, oldest first from
    ``head``; ``base`` holds the totals at the last step, from which the next one is counted."""

    __slots__ = ("to_target", "to_user", "head", "filled", "base")

    def __init__(self) -> None:
        self.to_target = array("q", bytes(8 * POINTS))
        self.to_user = array("q", bytes(8 * POINTS))
        self.head = 0
        self.filled = 0
        self.base = (0, 0)

    def push(self, to_target: int, to_user: int) -> None:
        at = (self.head + self.filled) % POINTS
        self.to_target[at] = to_target
        self.to_user[at] = to_user
        if self.filled < POINTS:
            self.filled += 1
        else:
            self.head = (self.head + 1) % POINTS

    def moved(self, totals: tuple[int, int]) -> tuple[int, int]:
        """Bytes each way since ``base``; totals below it began anew (a peer forgotten by the
        usage and back since) and count from 0."""
        if totals[0] < self.base[0] or totals[1] < self.base[1]:
            return totals
        return totals[0] - self.base[0], totals[1] - self.base[1]

    def samples(self) -> list[tuple[int, int]]:
        """The completed steps, oldest first."""
        return [(self.to_target[(self.head + i) % POINTS], self.to_user[(self.head + i) % POINTS])
                for i in range(self.filled)]


class History:
    """The rings of every name of one kind (ports, or peers); one thread (the reactor)."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.stepped_at = 0.0     # monotonic time of the last completed step (the first update before one)
        self.began: float | None = None   # monotonic time of the first update
        self._turned_away = False   # a name found no room once: names adopted later may have counted before

    def update(self, now: float, totals: Totals) -> None:
        """Called often (every second): completes a step every ``STEP`` seconds. A late call
        (the reactor was busy) spreads the bytes over the steps it missed, at most an hour's."""
        self._adopt(totals)   # a new name is graphed at once, with the step under way
        if self.began is None:
            self.stepped_at = self.began = now
            return
        steps = int((now - self.stepped_at) // STEP)
        if steps <= 0:
            return
        self.stepped_at += steps * STEP
        for name, series in list(self.series.items()):
            now_totals = totals.get(name, series.base)
            moved_target, moved_user = series.moved(now_totals)
            for index in range(max(0, steps - POINTS), steps):
                series.push(_share(moved_target, steps, index), _share(moved_user, steps, index))
            series.base = now_totals

    def _adopt(self, totals: Totals) -> None:
        """A series for each new name while there is room; one whose name is gone from the
        totals makes room for a new one. A name's bytes count from its first update (its
        totals begin at 0 when it appears); those of names there before the history began
        (the page was turned on by a reload), or that may have waited for room, from now."""
        counted_before = self.began is None or self._turned_away
        for name in totals:
            if name in self.series:
                continue
            if len(self.series) >= MAX_SERIES:
                gone = next((old for old in self.series if old not in totals), None)
                if gone is None:
                    self._turned_away = True
                    return
                del self.series[gone]
            series = self.series[name] = Series()
            if counted_before:
                series.base = totals[name]

    def span(self, now: float) -> int:
        """The seconds a graph of this history spans: as far back as it goes, in whole minutes,
        at least ``MIN_SPAN`` and at most ``SPAN``."""
        covered = now - self.began if self.began is not None else 0.0
        return int(min(SPAN, max(MIN_SPAN, -(-covered // 60) * 60)))

    def rates(self, name: str, now: float, totals: Totals) -> list[Point] | None:
        """Per step, oldest first: (seconds from its end to ``now``, its length in seconds,
        bytes/s to the target, bytes/s to the user); the step under way last, its rate so far.
        None when ``name`` is not graphed."""
        series = self.series.get(name)
        if series is None:
            return None
        done = series.samples()
        since = now - self.stepped_at
        points = [(since + (len(done) - 1 - i) * STEP, float(STEP), to_target / STEP, to_user / STEP)
                  for i, (to_target, to_user) in enumerate(done)]
        if since >= 1.0:
            to_target, to_user = series.moved(totals.get(name, series.base))
            points.append((0.0, since, to_target / since, to_user / since))
        return points


def _share(total: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal integer shares of ``total`` (they sum to it)."""
    return total * (index + 1) // parts - total * index // parts
