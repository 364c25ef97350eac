"""The client's end of one control channel and the links it opens: the skeleton every transport
shares. The control channel runs on the carrier the handshake left (tunnel/control.py); the links
are opened as the server asks and as v0.7's pool sizing says (tunnel/pool.py ``ClientPool``); a
lost channel ends the session, and the client (client.py) is told once. What a link is, how it is
dialed, read, counted and closed is the transport's: a subclass supplies those four methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from backhaul.tunnel.carrier import Carrier
from backhaul.tunnel.control import ClientChannel
from backhaul.tunnel.core import ClientCore
from backhaul.tunnel.pool import ClientPool


class TunnelSession(ABC):
    """One control channel and its links; built on the client's supervising thread, run on the
    reactor from ``start``. ``what`` names a link in log lines, ``most`` caps the links open or
    opening; ``rtt_echo`` and ``heartbeat_echo`` are the control channel's, as the transport's
    server expects."""

    def __init__(self, core: ClientCore, carrier: Carrier, *, what: str, most: int, rtt_echo: bool,
                 heartbeat_echo: bool = False) -> None:
        self.core = core
        self.config = core.config
        self.reactor = core.reactor
        self.closed = False
        self.channel = ClientChannel(self.reactor, carrier, rtt_echo=rtt_echo, heartbeat_echo=heartbeat_echo,
                                     on_links=self._links_requested, on_lost=self._lost)
        self.pool = ClientPool(self.reactor, self.config.connection_pool, self.config.aggressive_pool, most, what,
                               self.dial_link, idle=self.idle_links, open_now=self.open_links)

    def start(self) -> None:
        if self.closed:
            return
        self.channel.start()
        if not self.closed:
            self.pool.start(self.first_links())

    def first_links(self) -> int:
        """Links opened at the start, before the server asks for any."""
        return self.config.connection_pool

    def _links_requested(self, count: int) -> None:
        self.pool.requested(count)

    def _lost(self, reason: str, _goodbye: bool) -> None:
        self.close(reason, notify=False)

    def close(self, reason: str, *, notify: bool) -> None:
        """End the control channel (the server hears the closing signal when ``notify``), stop
        opening links and close those not carrying a user; the client is told once."""
        if self.closed:
            return
        self.closed = True
        self.channel.close(notify=notify)
        self.pool.stop()
        self.close_links()
        self.core.session_ended(self, reason)

    # --- the transport's part ----------------------------------------------------------------
    @abstractmethod
    def dial_link(self) -> None:
        """Open one more link; report to ``self.pool.opened`` once, with the reason on failure."""

    @abstractmethod
    def idle_links(self) -> int:
        """Links open and waiting for a user."""

    @abstractmethod
    def open_links(self) -> int:
        """Links open now, idle or not, as the pool sizing counts them."""

    @abstractmethod
    def close_links(self) -> None:
        """The session ended: close what it holds that no user's relay has taken over."""
