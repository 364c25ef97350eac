"""How much of a session's frames the kernel may hold unsent (TCP_NOTSENT_LOWAT, per socket).

On a path with a delay, a frame queued behind megabytes of a download's frames waits for the
path to carry them, whatever stream it is for (2-3 MB sat there at 100 ms / 100 Mbit/s: an
interactive stream of the same session waited 290 ms more per round trip). A small unsent queue
leaves the order to the session's own turns (protocol/outbox.py). Its size follows the rate the
socket paces at: UNSENT_TIME of sending, so what a frame waits behind is the same few
milliseconds at 10 Mbit/s and at 1 Gbit/s, and a reactor late by less than that never leaves
the path idle.

A small queue runs dry whenever the reactor is late, and a send into an empty queue marks the
connection application-limited. bbr leaves its startup only after three round trips of samples
that are not: with a small queue from the first byte, a session's bbr stayed in startup for the
whole of a 10 s download, pacing at 2.9 times the path's rate, and lost a third of its packets
at the path's queue, each loss holding up every stream behind it for a round trip. So a session
keeps the host's queue until its bbr has left startup (bbr never returns there), and a small
one from then on. Other congestion controls never wait: they do not grow their window while
the sender is the limit.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

log = logging.getLogger("backhaul.mux.unsent")

UNSENT_TIME = 0.004          # seconds of sending at the socket's pacing rate
MIN_UNSENT = 16 * 1024
MAX_UNSENT = 512 * 1024
# Where the round trip is shorter than this the kernel's queue drains as fast as it fills, and a
# small one only costs a wake-up per take (on loopback a quarter of a v1 stream's rate).
LOWAT_RTT_US = 2000
LONG_PATH_ENV = "BACKHAUL_LONG_PATH_US"   # undocumented: LOWAT_RTT_US for every process (tests)
# How often a full socket looks at its pacing rate again (and at bbr's state, while in startup).
LOOK_EVERY = 0.1

_RTT = struct.Struct("=I")   # tcp_info.tcpi_rtt (microseconds), at offset 68 of struct tcp_info
_TCP_INFO_RTT = 68
_PACING = struct.Struct("=Q")   # tcp_info.tcpi_pacing_rate (bytes per second), at offset 104
_TCP_INFO_PACING = 104
TCP_CC_INFO = getattr(socket, "TCP_CC_INFO", 26)
# struct tcp_bbr_info (linux/inet_diag.h): bw_lo, bw_hi, min_rtt, pacing_gain, cwnd_gain; gains
# in units of 1/256. Startup paces at 2.89 (bbr v1) or 2.77 (later versions); no other state
# paces above 1.25.
_BBR_INFO = struct.Struct("=5I")
_STARTUP_GAIN = 2 * 256


def bbr_in_startup(cc_info: bytes) -> bool:
    """``cc_info`` (getsockopt TCP_CC_INFO of a bbr socket) says it paces as in startup."""
    if len(cc_info) < _BBR_INFO.size:
        return False
    return _BBR_INFO.unpack_from(cc_info)[3] > _STARTUP_GAIN


def long_path_us() -> int:
    """The round trip from which a path is long: LOWAT_RTT_US, or the environment's (tests)."""
    text = os.environ.get(LONG_PATH_ENV, "")
    return int(text) if text.isdigit() else LOWAT_RTT_US


def unsent_limit(pacing_rate: int) -> int:
    """The unsent bytes a socket pacing at ``pacing_rate`` bytes/s may hold."""
    return max(MIN_UNSENT, min(MAX_UNSENT, int(pacing_rate * UNSENT_TIME)))


class UnsentLimit:
    """One session socket's unsent queue; ``limit`` is 0 while it is the host's."""

    __slots__ = ("sock", "limit", "_long", "_next_look")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.limit = 0
        self._long = False      # a path with a delay: the queue is kept small there
        self._next_look = 0.0

    def start(self) -> None:
        """At the session's start: is this a long path? (A short one keeps the host's queue.)
        The limit itself waits for a full socket: bbr's state and the pacing rate mean nothing
        before the first samples."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_RTT + _RTT.size)
        except OSError as exc:
            log.debug("smux session socket keeps the host's unsent queue: %s", exc)
            return
        rtt_us = _RTT.unpack_from(info, _TCP_INFO_RTT)[0] if len(info) >= _TCP_INFO_RTT + _RTT.size else 0
        self._long = rtt_us >= long_path_us()

    @property
    def long_path(self) -> bool:
        """The path has a delay (``start`` measured it): what waits in order costs a round trip."""
        return self._long

    def full(self) -> int:
        """The socket refused bytes: the limit, set anew at most every LOOK_EVERY (0: none)."""
        if not self._long:
            return 0
        now = time.monotonic()
        if now < self._next_look:
            return self.limit
        self._next_look = now + LOOK_EVERY
        try:
            # Only bbr answers with this many bytes (vegas and dctcp with fewer, cubic with none).
            if not self.limit and bbr_in_startup(self.sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO,
                                                                      _BBR_INFO.size)):
                return 0
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_PACING + _PACING.size)
            if len(info) < _TCP_INFO_PACING + _PACING.size:
                raise OSError("tcp_info has no pacing rate")
            limit = unsent_limit(_PACING.unpack_from(info, _TCP_INFO_PACING)[0])
            if limit != self.limit:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, limit)
                self.limit = limit
        except OSError as exc:
            log.debug("smux session socket keeps the host's unsent queue: %s", exc)
            self._long = False
        return self.limit
