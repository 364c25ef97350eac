"""The control channel at run time: a protocol state machine driven over a carrier by the reactor.

The machines (protocol/control.py) decide what to send and what an incoming byte means; this
module only moves their bytes, runs their timers and reports what ended the channel.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from backhaul.errors import ProtocolError
from backhaul.protocol.control import ClientControl, LinksRequested, PeerClosing, RttMeasured, ServerControl
from backhaul.reactor import Reactor, Timer
from backhaul.tunnel.carrier import Carrier

log = logging.getLogger("backhaul.tunnel.control")

SILENCE_BEATS = 3      # a client gives up after this many of the server's heartbeat periods of silence
MIN_SILENCE = 5.0      # ...but never sooner than this, whatever cadence the server keeps

# on_lost(reason, peer_said_goodbye)
OnLost = Callable[[str, bool], None]


class _Channel:
    """How either end of a control channel ends: once, saying goodbye (SG_CLOSED) when asked."""

    carrier: Carrier
    machine: ServerControl | ClientControl
    on_lost: OnLost
    closed: bool
    _timer: Timer | None

    def _lost(self, reason: str) -> None:
        self._end(reason, notify=False)

    def _end(self, reason: str, *, notify: bool, goodbye: bool = False) -> None:
        if self.closed:
            return
        self.close(notify=notify)
        self.on_lost(reason, goodbye)

    def close(self, *, notify: bool) -> None:
        """End the channel; with ``notify`` the peer hears SG_CLOSED first."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if notify:
            self.machine.close()
        self.carrier.send(self.machine.outgoing())
        self.carrier.close()


class ServerChannel(_Channel):
    """The server's end of an established control channel."""

    def __init__(self, reactor: Reactor, carrier: Carrier, heartbeat: float, *, rtt_probe: bool,
                 on_lost: OnLost) -> None:
        self.reactor = reactor
        self.carrier = carrier
        self.peer = carrier.peer
        self.machine = ServerControl(heartbeat, time.monotonic(), rtt_probe=rtt_probe)
        self.on_lost = on_lost
        self.closed = False
        self.rtt_ms = 0      # whole ms, as the Go server keeps it (accept_udp's congestion flag)
        self._timer: Timer | None = None
        self._flush_queued = False

    def start(self, first: bytes = b"") -> None:
        """Send ``first`` (the handshake reply) and what the machine opens with, then listen."""
        self.carrier.start(self._data, self._lost)
        self.carrier.send(first + self.machine.outgoing())
        if not self.closed:
            self._schedule()

    def request_links(self, count: int = 1) -> None:
        """Ask the client for ``count`` more links. Requests made during one batch of events leave
        in one write after it (the reactor runs its own call_soon after the events at hand)."""
        if self.closed:
            return
        self.machine.request_links(count)
        if not self._flush_queued:
            self._flush_queued = True
            self.reactor.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_queued = False
        if not self.closed:
            self.carrier.send(self.machine.outgoing())

    def _beat(self) -> None:
        self.machine.tick(time.monotonic())
        self._flush()
        if not self.closed:
            self._schedule()

    def _schedule(self) -> None:
        delay = max(0.0, self.machine.next_deadline() - time.monotonic())
        self._timer = self.reactor.call_later(delay, self._beat)

    def _data(self, data: bytes) -> None:
        for event in self.machine.receive(data, time.monotonic()):
            if isinstance(event, RttMeasured):
                self.rtt_ms = int(event.ms)
                log.debug("rtt to %s: %.1f ms", self.peer, event.ms)
            elif isinstance(event, PeerClosing):
                self._end(f"{self.peer} is shutting down or restarting", notify=False, goodbye=True)
                return



class ClientChannel(_Channel):
    """The client's end of an established control channel."""

    def __init__(self, reactor: Reactor, carrier: Carrier, *, rtt_echo: bool, heartbeat_echo: bool = False,
                 on_links: Callable[[int], None], on_lost: OnLost) -> None:
        self.reactor = reactor
        self.carrier = carrier
        self.machine = ClientControl(time.monotonic(), rtt_echo=rtt_echo, heartbeat_echo=heartbeat_echo,
                                     beats=SILENCE_BEATS, floor=MIN_SILENCE)
        self.on_links = on_links
        self.on_lost = on_lost
        self.closed = False
        self._timer: Timer | None = None

    def start(self, first: bytes = b"") -> None:
        """Listen; ``first`` holds bytes that arrived together with the handshake reply."""
        self.carrier.start(self._data, self._lost)
        if first:
            self._data(first)

    def _data(self, data: bytes) -> None:
        try:
            events = self.machine.receive(data, time.monotonic())
        except ProtocolError as exc:
            self._end(str(exc), notify=True)
            return
        reply = self.machine.outgoing()
        if reply:
            self.carrier.send(reply)
        for event in events:
            if self.closed:
                return
            if isinstance(event, LinksRequested):
                self.on_links(event.count)
            elif isinstance(event, PeerClosing):
                self._end("the server is shutting down or restarting", notify=False, goodbye=True)
                return
            else:
                log.debug("heartbeat from the server")
        self._schedule()

    def _schedule(self) -> None:
        deadline = self.machine.next_deadline()
        # The deadline only moves later (time heard and cadence only grow): a running check
        # re-arms itself from the latest one when it fires.
        if deadline is None or self.closed or self._timer is not None:
            return
        self._timer = self.reactor.call_later(max(0.0, deadline - time.monotonic()), self._check)

    def _check(self) -> None:
        self._timer = None
        try:
            self.machine.check(time.monotonic())
        except ProtocolError as exc:
            self._end(str(exc), notify=True)
            return
        self._schedule()

