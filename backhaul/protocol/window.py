"""smux v2 receive windows that follow the path, as a sans-IO tuner (time enters as ``now``).

A v2 sender has at most one window per round trip in flight, and smux grants every stream the
same window (``mux_streambuffer``, 64 KiB by default): 64 KiB per 100 ms is 5 Mbit/s whatever the
link. Here a stream starts at that window and, like Linux's receive buffer autotuning, its grant
follows what its reader takes per round trip: while the reader keeps up, the grant grows toward
twice the bytes read in one round trip (twice the bandwidth-delay product once the path, not the
window, limits the sender); when the reader falls behind, the grant shrinks to what the reader
takes, never below ``mux_streambuffer``. The grants of a session's streams add up to at most its
``mux_recievebuffer``, and one stream takes at most seven eighths of it, so one stream can never
fill the session's receive buffer alone (which would stop the reads of every stream): an eighth
(512 KiB of the default 4 MiB, eight first grants) stays for the others. A grant must cover what
the sender's TCP has in flight (bbr: up to twice its BDP estimate, with a 25 ms queue on top at
100 ms and 100 Mbit/s) and the UPD's way back: half of 4 MiB moved 0.8x of that path, three
quarters 0.78-0.92x from run to run, seven eighths 0.86-0.95x (16 MiB: 0.93-0.96x).

The round trip is measured by the receiver alone: a UPD that moves the granted edge (consumed +
window) beyond every earlier one lets the sender send bytes it could not send before; the first
such byte arrives no sooner than one round trip after the UPD left. The smallest of these samples
is the round trip (a sender that had nothing to send only makes a sample larger).

The wire is smux's own: UPD(consumed, window), with our window in place of the fixed one.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

MAX_WINDOW = 1 << 30  # a Go sender keeps windows in int32 arithmetic: stay far from its sign bit
STALL_FLOOR = 0.05  # seconds: unread bytes older than this and than one round trip: the reader is behind
ARRIVAL_MARKS = 64  # when bytes arrived, kept per stream (bounded; the last mark takes what comes after)
MARK_SPAN = 0.005   # seconds: arrivals this close share a mark (how exact the age of a byte is)


class StreamWindow:
    """The grant of one stream and what is measured to tune it. Byte counts are totals since
    the stream opened (Python integers, never wrapped; the wire's u32 counters wrap)."""

    __slots__ = ("size", "advertised", "edge", "received", "read", "rtt", "probe_at", "probe_edge", "mark_at",
                 "mark_read", "arrivals", "lagged")

    def __init__(self, size: int, edge: int, now: float) -> None:
        self.size = size        # the window our next UPD grants
        self.advertised = edge  # the window our last UPD granted (before any: the initial one, from 0)
        self.edge = edge        # the furthest byte any grant of ours let the sender send
        self.received = 0
        self.read = 0
        self.rtt = 0.0          # smallest round trip sampled; 0: none yet
        self.probe_at: float | None = None  # when the UPD that moved the edge left (None: no sample running)
        self.probe_edge = 0     # the edge before it: a byte beyond it completes the sample
        self.mark_at = now      # start of the current measurement of the read rate
        self.mark_read = 0
        # (total received after the arrival, when) of the unread bytes, oldest first: how long the
        # bytes a read takes have waited (a stream read promptly may still never be empty).
        self.arrivals: collections.deque[tuple[int, float]] = collections.deque()
        self.lagged = False     # a read in this measurement took bytes that had waited too long

    @property
    def unread(self) -> int:
        return self.received - self.read


class WindowTuner:
    """Sizes the v2 windows of one session's streams.

    ``stream_buffer`` is the smallest grant and the first one; ``receive_buffer`` bounds the sum
    of a session's grants; ``initial_edge`` is what a sender may send before our first UPD (smux's
    fixed initial window, whatever we configure).
    """

    def __init__(self, stream_buffer: int, receive_buffer: int, initial_edge: int) -> None:
        self.base = stream_buffer
        self.limit = receive_buffer
        self.cap = min(max(stream_buffer, receive_buffer * 7 // 8), MAX_WINDOW)
        self.initial_edge = initial_edge

    def open(self, now: float) -> StreamWindow:
        return StreamWindow(self.base, self.initial_edge, now)

    def received(self, w: StreamWindow, n: int, now: float) -> bool:
        """``n`` bytes arrived; False when they go beyond every grant (the peer ignores the window)."""
        w.received += n
        marks = w.arrivals
        if marks and (len(marks) >= ARRIVAL_MARKS or now - marks[-1][1] < MARK_SPAN):
            marks[-1] = (w.received, marks[-1][1])   # older than they are: errs toward "behind"
        else:
            marks.append((w.received, now))
        if w.probe_at is not None and w.received > w.probe_edge:
            sample = max(now - w.probe_at, 1e-6)  # a clock that did not move still proves a trip
            w.rtt = sample if not w.rtt else min(w.rtt, sample)
            w.probe_at = None
        return w.received <= w.edge

    def update_due(self, w: StreamWindow, since_update: int) -> bool:
        """Enough was read since the last UPD to send the next one. smux's rule is half the
        stream buffer; a grown window waits for an eighth of itself (a UPD is 12 bytes per
        hundreds of KiB, and the sender keeps seven eighths of the window when the UPD leaves)."""
        return since_update >= max(self.base // 2, w.size // 8)

    def read(self, w: StreamWindow, n: int, now: float, granted_total: Callable[[], int]) -> bool:
        """The reader took ``n`` bytes. Once per round trip, resize the grant from what was read in
        it; True when it grew (a UPD should tell the sender now). ``granted_total`` gives the sum of
        the session's grants, asked only when a grant may grow."""
        # The last byte read waited longer than a round trip (and than the floor, below which a
        # busy machine's scheduling is noise): a reader behind, not one that reads as bytes arrive.
        w.read += n
        marks = w.arrivals
        last = None
        while marks and marks[0][0] <= w.read:
            last = marks.popleft()
        if last is not None and last[0] == w.read:
            arrived = last[1]
        else:
            arrived = marks[0][1] if marks else now
        if now - arrived > max(w.rtt, STALL_FLOOR):
            w.lagged = True
        if not w.rtt or now - w.mark_at < w.rtt:
            return False
        # Bytes read per round trip over this interval (an interval may span several).
        per_round_trip = (w.read - w.mark_read) * w.rtt / (now - w.mark_at)
        w.mark_at, w.mark_read = now, w.read
        target = int(2 * per_round_trip)
        if per_round_trip >= w.size * 3 // 4:
            # The sender used most of the grant in a round trip while the reader kept up:
            # the grant may be what limits it. A grant's effect shows a round trip after its UPD,
            # so each step here spans two: grow fourfold rather than wait two more.
            target = max(target, 4 * w.size)
        behind, w.lagged = w.lagged, False
        if behind:
            # The reader, not the path, sets the pace: grant what it takes, so a reader that stalls
            # again pins little. What the sender sent under the larger grant is still accepted
            # (the edge never moves back).
            w.size = max(self.base, min(w.size, target))
            return False
        wanted = min(target, self.cap)
        if wanted <= w.size:
            return False
        room = self.limit - granted_total()  # a look at every stream, once per round trip at most
        grown = min(wanted, w.size + max(0, room))
        if grown <= w.size:
            return False
        w.size = grown
        return True

    def granted(self, w: StreamWindow, now: float) -> None:
        """A UPD granting ``w.size`` beyond what was read leaves now: move the edge, and time the
        first byte beyond the old edge when it moved and no sample is running.

        A Go sender stores a UPD's consumed and window one after the other, and its writer may
        load them in between: the new consumed with the previous window. After a shrink that
        lets it send up to consumed + the previous window, so that is what we accept."""
        edge = w.read + max(w.size, w.advertised)
        w.advertised = w.size
        # Timed only when this grant itself goes beyond the old edge: the bytes the sender then
        # has queued ahead of the timed one (which make the sample longer) are fewer.
        if w.probe_at is None and w.read + w.size > w.edge:
            w.probe_at = now
            w.probe_edge = w.edge
        w.edge = max(w.edge, edge)
