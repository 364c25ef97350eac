"""The control channel after the handshake, as sans-IO state machines (PROTOCOL.md 1.3, 2.1, 3.2).

Bytes in, events out, bytes to send collected in an outbox; time enters only as ``now``. The
same machines serve every transport: a carrier feeds them raw TCP bytes or one-byte messages.
"""

from __future__ import annotations

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import SG_CHAN, SG_CLOSED, SG_HB, SG_RTT


class PeerClosing:
    """The peer sent SG_CLOSED: it is shutting down or restarting."""

    __slots__ = ()


class RttMeasured:
    """The client echoed the RTT probe (tcp and udp transports)."""

    __slots__ = ("ms",)

    def __init__(self, ms: float) -> None:
        self.ms = ms


class LinksRequested:
    """The server asked for ``count`` more links (one SG_CHAN each)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


class Heartbeat:
    """A heartbeat arrived from the server."""

    __slots__ = ()


Event = PeerClosing | RttMeasured | LinksRequested | Heartbeat
PEER_CLOSING = PeerClosing()
HEARTBEAT = Heartbeat()


class _Outbox:
    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out = bytearray()

    def outgoing(self) -> bytes:
        """Everything to send now, in order; empties the outbox."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def close(self) -> None:
        """Say goodbye: SG_CLOSED is the last byte this side sends."""
        self._out.append(SG_CLOSED)


class ServerControl(_Outbox):
    """The server's end: heartbeats on a fixed period, one SG_CHAN per wanted link, an RTT probe
    right after the handshake (tcp and udp only), and the client's SG_CLOSED and RTT echo."""

    __slots__ = ("heartbeat", "_next_beat", "_rtt_sent")

    def __init__(self, heartbeat: float, now: float, *, rtt_probe: bool) -> None:
        super().__init__()
        self.heartbeat = heartbeat
        self._next_beat = now + heartbeat
        self._rtt_sent: float | None = None
        if rtt_probe:
            self._out.append(SG_RTT)
            self._rtt_sent = now

    def receive(self, data: bytes, now: float) -> list[Event]:
        """The Go server acts on SG_CLOSED and SG_RTT only and ignores every other byte."""
        events: list[Event] = []
        rtt = data.find(SG_RTT)
        closing = data.find(SG_CLOSED)
        if rtt >= 0 and self._rtt_sent is not None and (closing < 0 or rtt < closing):
            events.append(RttMeasured((now - self._rtt_sent) * 1e3))
            self._rtt_sent = None
        if closing >= 0:
            events.append(PEER_CLOSING)
        return events

    def request_links(self, count: int = 1) -> None:
        self._out += bytes((SG_CHAN,)) * count

    def tick(self, now: float) -> None:
        """Queue a heartbeat when one is due."""
        if now >= self._next_beat:
            self._out.append(SG_HB)
            self._next_beat = now + self.heartbeat

    def next_deadline(self) -> float:
        return self._next_beat


class ClientControl(_Outbox):
    """The client's end: acts on every byte (an unknown one is a protocol error, as in Go), echoes
    the RTT probe where the transport has one, and watches for a server gone silent.

    The silence limit follows the cadence the server keeps, learned from the heartbeats that
    arrive, never a period of our own: Go servers choose their heartbeat freely (any value of
    1 s and up) and a Go client never times out. Until a first heartbeat shows the cadence, silence
    alone never ends the session (TCP keepalive still finds a dead peer).
    """

    __slots__ = ("rtt_echo", "heartbeat_echo", "beats", "floor", "_last_heard", "_last_beat", "cadence", "_started")

    def __init__(self, now: float, *, rtt_echo: bool, beats: int, floor: float, heartbeat_echo: bool = False) -> None:
        """``beats``: heartbeat periods of silence that end the session; ``floor``: seconds of
        silence that never do, whatever cadence the server keeps. ``heartbeat_echo``: answer each
        heartbeat with one (the ws transports do)."""
        super().__init__()
        self.rtt_echo = rtt_echo
        self.heartbeat_echo = heartbeat_echo
        self.beats = beats
        self.floor = floor
        self._started = now
        self._last_heard = now
        self._last_beat = now
        self.cadence: float | None = None   # longest period seen between heartbeats

    def receive(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        if not data:
            return events
        self._last_heard = now
        requests = 0
        for byte in data:  # control bytes: one per heartbeat or request, never bulk data
            if byte == SG_CHAN:
                requests += 1
                continue
            if requests:
                events.append(LinksRequested(requests))
                requests = 0
            if byte == SG_HB:
                period = now - self._last_beat
                self._last_beat = now
                self.cadence = period if self.cadence is None else max(self.cadence, period)
                if self.heartbeat_echo:
                    self._out.append(SG_HB)
                events.append(HEARTBEAT)
            elif byte == SG_RTT and self.rtt_echo:
                self._out.append(SG_RTT)
            elif byte == SG_CLOSED:
                events.append(PEER_CLOSING)
                return events
            else:
                raise ProtocolError(f"unexpected control byte 0x{byte:02x} from the server")
        if requests:
            events.append(LinksRequested(requests))
        return events

    @property
    def silence_limit(self) -> float | None:
        """Seconds of silence after which the server counts as gone; None while unknown."""
        if self.cadence is None:
            return None
        return max(self.beats * self.cadence, self.floor)

    def silent_for(self, now: float) -> float:
        return now - self._last_heard

    def check(self, now: float) -> None:
        """ProtocolError when the server has been silent past the limit its cadence sets."""
        limit = self.silence_limit
        silent = now - self._last_heard
        if limit is not None and silent > limit:
            raise ProtocolError(f"the server has been silent for {silent:.0f} s "
                                f"({self.beats} of its {self.cadence:.0f} s heartbeats)")

    def next_deadline(self) -> float | None:
        limit = self.silence_limit
        return None if limit is None else self._last_heard + limit
