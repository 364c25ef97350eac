"""A client's idle links on the server, for the one-link-per-user transports (tcp, ws, wss, udp):
the skeleton each of them shares around the pool's policy (tunnel/pool.py).

A link is kept while the pool has room (``channel_size``) and refused with one line otherwise,
watched while idle by the transport (a link that speaks or dies before its user leaves the
pool), pinged every heartbeat where the transport has no other sign of life, and handed out in
arrival order. What a link is, how it is watched and pinged, and how it is closed belong to the
transport, which subclasses this with its own ``add`` for what arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from backhaul.log import Throttles
from backhaul.reactor import Timer
from backhaul.tunnel.core import ServerCore
from backhaul.tunnel.pool import LinkPool

L = TypeVar("L")


class IdleLinks(Generic[L]):
    """One client's idle links; reactor thread only.

    ``close`` closes a link; with ``follow_demand`` the pool also closes, with it, idle links the
    users no longer need (a link that can be given back: tcp, ws). ``watch`` starts watching a
    pooled link, ``peer`` names it in the line that refuses it. ``ping`` is sent to each idle link
    every heartbeat. ``stale`` tells a link that ended on its own and is never handed out.
    """

    def __init__(self, core: ServerCore, ask: Callable[[int], None], logger: logging.Logger, what: str, *,
                 close: Callable[[L], None], watch: Callable[[L], None], peer: Callable[[L], str],
                 follow_demand: bool, ping: Callable[[L], None] | None = None,
                 stale: Callable[[L], bool] | None = None) -> None:
        self.core = core
        self.reactor = core.reactor
        self.what = what             # "data connection", "UDP link": for log lines
        self.close = close
        self.watch = watch
        self.peer = peer
        self.ping = ping
        self.stale = stale
        self.pool: LinkPool[L] = LinkPool(self.reactor, core.config.channel_size, core.config.connection_pool,
                                          ask, retire=close if follow_demand else None)
        self._timer: Timer | None = None
        self._warn = Throttles(logger)

    def start(self) -> None:
        self.pool.start()
        if self.ping is not None:
            self._timer = self.reactor.call_later(self.core.config.heartbeat, self._ping)

    def stop(self) -> None:
        self.pool.stop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for link in self.pool.drain():
            self.close(link)

    def keep(self, link: L) -> None:
        """A new link: pooled and watched (before a user can take it), or closed when
        ``channel_size`` links wait already."""
        if not self.pool.add(link):
            self._warn.warning("links", "closed %s from %s: %d idle already (channel_size)", self.what,
                               self.peer(link), len(self.pool.idle))
            self.close(link)
            return
        self.watch(link)
        self.core.link_available()

    def _ping(self) -> None:
        assert self.ping is not None
        for link in list(self.pool.idle):   # a send may end a link, which leaves the pool
            self.ping(link)
        self._timer = self.reactor.call_later(self.core.config.heartbeat, self._ping)

    def idle(self) -> int:
        return len(self.pool.idle)

    def enough(self) -> int:
        return max(1, self.pool.keep_ready)

    def user_arrived(self) -> None:
        self.pool.user_arrived()

    def take(self) -> L | None:
        while True:
            link = self.pool.take()
            if link is None or self.stale is None or not self.stale(link):
                return link
