"""UDP datagrams on a tcp data connection (accept_udp, PROTOCOL.md 4.1), as pure codecs.

Server to client a datagram is ``u16 BE length | payload``; client to server it is
``u32 BE timestamp | u16 BE length | payload``, the timestamp being the sender's unix time in ms
modulo ten minutes. A receiver refuses a length above MAX_DATAGRAM, as the Go program does.
"""

from __future__ import annotations

import struct

from backhaul.errors import ProtocolError

MAX_DATAGRAM = 16384        # the Go receivers' buffer: a longer frame ends the data connection
TS_WINDOW = 600_000         # the timestamp is unix ms modulo ten minutes
DEFAULT_RTT_MS = 100        # what the Go server assumes while it has no RTT (or measured 0 ms)
CONGESTION_RTTS = 3         # a datagram older than this many RTTs marks its flow congested...
CONGESTION_FLOOR_MS = 1000  # ...but never one less than this late

_U16 = struct.Struct(">H")
_TS_U16 = struct.Struct(">IH")


def encode_down(payload: bytes) -> bytes:
    """One server-to-client frame: ``u16 length | payload``."""
    _check(len(payload))
    return _U16.pack(len(payload)) + payload


def encode_up(payload: bytes, now_ms: int) -> bytes:
    """One client-to-server frame: ``u32 timestamp | u16 length | payload`` (``now_ms``: unix ms)."""
    _check(len(payload))
    return _TS_U16.pack(now_ms % TS_WINDOW, len(payload)) + payload


def _check(size: int) -> None:
    if size > MAX_DATAGRAM:
        raise ProtocolError(f"datagram of {size} bytes is longer than the {MAX_DATAGRAM} a peer accepts",
                            remote=False)


class FrameDecoder:
    """Splits a byte stream into datagrams; ``timestamped`` for the client-to-server direction.

    ``feed`` returns the payloads completed by the bytes given, and the timestamps of their frames
    land in ``timestamps`` (same order) when timestamped. A length above ``max_length`` is a
    ProtocolError: the stream can no longer be trusted, the flow ends.
    """

    __slots__ = ("timestamped", "max_length", "_buf", "timestamps")

    def __init__(self, timestamped: bool, max_length: int = MAX_DATAGRAM) -> None:
        self.timestamped = timestamped
        self.max_length = max_length
        self._buf = bytearray()
        self.timestamps: list[int] = []

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        out: list[bytes] = []
        stamps = self.timestamps
        stamps.clear()
        head = 6 if self.timestamped else 2
        at, end = 0, len(buf)
        view = memoryview(buf)
        while end - at >= head:
            if self.timestamped:
                stamp, size = _TS_U16.unpack_from(buf, at)
            else:
                (size,) = _U16.unpack_from(buf, at)
            if size > self.max_length:
                view.release()
                self._buf = bytearray()
                raise ProtocolError(f"frame says {size} bytes, more than the {self.max_length} a datagram "
                                    "may have")
            if end - at - head < size:
                break
            out.append(view[at + head:at + head + size].tobytes())
            if self.timestamped:
                stamps.append(stamp)
            at += head + size
        view.release()
        if at:
            del buf[:at]
        return out


def frame_age(stamp: int, now_ms: int) -> int:
    """Milliseconds between a frame's timestamp and ``now_ms`` (unix ms), across the ten-minute
    wrap: the result lies in (-TS_WINDOW/2, TS_WINDOW/2]."""
    age = (now_ms - stamp) % TS_WINDOW
    return age - TS_WINDOW if age > TS_WINDOW // 2 else age


class CongestionWatch:
    """The server's congestion flag of one accept_udp flow (PROTOCOL.md 4.1).

    Go flags a flow when a frame is older than 3 RTTs by the two hosts' clocks, so any clock
    skew past that flags every flow (or none). We measure the age above the smallest age this flow
    has shown: queueing delay, whatever the skew. ``rtt_ms`` is the control channel's measured
    RTT in whole ms. Go takes 0 as 100 ms but 1 ms as 1 ms, so on a LAN a few ms of queueing
    split a flow in two, and its answers then reorder. We never flag less than 1 s late: a peer
    process that waited that long for a core is no congested network either.
    """

    __slots__ = ("limit", "base")

    def __init__(self, rtt_ms: int) -> None:
        self.limit = max(CONGESTION_RTTS * (rtt_ms or DEFAULT_RTT_MS), CONGESTION_FLOOR_MS)
        self.base: int | None = None

    def congested(self, stamp: int, now_ms: int) -> bool:
        """True when the frame stamped ``stamp`` arrived more than 3 RTTs later than the
        fastest one of this flow."""
        age = frame_age(stamp, now_ms)
        if self.base is None or age < self.base:
            self.base = age
            return False
        return age - self.base > self.limit
