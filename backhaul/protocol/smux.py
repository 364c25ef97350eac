"""smux (xtaci/smux v1.5.27), the stream multiplexer under tcpmux and wsmux, as a sans-IO machine.

Bytes from the peer go into ``Session.receive`` and come out as events; frames to send collect in
an outbox that ``Session.outgoing`` empties; time enters only as ``now``. PROTOCOL.md 2.3 has the
wire format. Roles as Backhaul uses them: the Backhaul server is the *opener* (smux Client role,
stream ids 3, 5, 7, ...), the Backhaul client the *acceptor* (smux Server role, never opens).

How a stream ends (docs/stream-ends.md has the whole picture). smux has FIN and nothing else, and the
Go program sends FIN only once it has closed the stream for good: it reads nothing after it. So by
default a peer's FIN ends the stream both ways: we deliver what came before it, discard what we
would still send, and the application closes its socket. Two Python peers can do better, and say so
to each other: each side's first frame is a NOP whose stream id is ``HELLO_SID`` (smux's receivers,
Go's included, ignore a NOP's stream id, so a Go peer is not disturbed). Once the peer said hello:

* its FIN is a half-close: no more data from it, while it still reads what we send;
* a NOP carrying a stream's id is a *reset* of that stream: the peer dropped it before both
  directions had ended cleanly (an error, an abort, a side that stopped reading), so we drop it
  too and the application resets its socket instead of reporting a clean end.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

from backhaul.errors import ProtocolError
from backhaul.protocol.chunks import ChunkQueue
from backhaul.protocol.outbox import ROUND_BYTES, Outbox
from backhaul.protocol.window import StreamWindow, WindowTuner

SYN = 0  # open a stream
FIN = 1  # the sender writes no more on the stream
PSH = 2  # stream data
NOP = 3  # keepalive, stream id 0
UPD = 4  # v2 flow control: u32 consumed, u32 window
COMMAND_NAMES = ("SYN", "FIN", "PSH", "NOP", "UPD")

HEADER_SIZE = 8  # u8 ver, u8 cmd, u16 length, u32 sid, all little-endian
UPD_SIZE = 8
MAX_PAYLOAD = 0xFFFF
HELLO_SID = 0xFFFFFFFF   # NOP with this stream id: "half-close and reset spoken here" (see above)
HELLO_WAIT = 2.0         # seconds an opener waits for the peer's first bytes before ending a stream it cut
MAX_STREAM_ID = HELLO_SID - 1  # our opener never uses HELLO_SID as a stream id
INITIAL_PEER_WINDOW = 262144  # what a v2 sender may have in flight before the first UPD
ACCEPT_BACKLOG = 1024  # smux's accept backlog; our default bound on live streams per session

_U32 = 0xFFFFFFFF
_HEADER = struct.Struct("<BBHI")
_UPD = struct.Struct("<II")


def encode_frame(version: int, cmd: int, sid: int, payload: bytes = b"") -> bytes:
    """One smux frame: the 8-byte header, then the payload."""
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"smux payload of {len(payload)} bytes does not fit a u16 length", remote=False)
    return _HEADER.pack(version, cmd, len(payload), sid) + payload


class Frame(NamedTuple):
    """One decoded frame (the version byte is checked by the decoder and not kept)."""

    cmd: int
    sid: int
    payload: bytes | memoryview


class FrameDecoder:
    """Cuts a byte stream into smux frames, whatever pieces the bytes arrive in.

    A header is checked as soon as its 8 bytes are in, so a broken peer is refused before its
    payload is buffered. An incomplete frame is kept for the next ``feed``.
    """

    __slots__ = ("version", "max_payload", "_pending")

    def __init__(self, version: int, max_payload: int = MAX_PAYLOAD) -> None:
        self.version = version
        self.max_payload = max_payload
        self._pending = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._pending)

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete."""
        frames: list[Frame] = []
        pos = 0
        if self._pending:
            # Complete the frame in progress with just the bytes it lacks, so a large read that
            # ends mid-frame costs a copy of one frame, not of the whole next read.
            pos = self._complete(data, frames)
            if self._pending:
                return frames
        # Payloads are slices of what came in, not copies, when it cannot change under them.
        view = memoryview(data)
        keep = isinstance(data, bytes)
        end = len(view)
        while end - pos >= HEADER_SIZE:
            ver, cmd, length, sid = _HEADER.unpack_from(view, pos)
            self._check(ver, cmd, length, sid)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            if not length:
                payload: bytes | memoryview = b""
            elif keep:
                payload = view[pos + HEADER_SIZE : stop]
            else:
                payload = view[pos + HEADER_SIZE : stop].tobytes()
            frames.append(Frame(cmd, sid, payload))
            pos = stop
        if pos < end:
            # The incomplete tail, as a copy of its own: a large read must not stay allocated
            # for the few bytes of the next header.
            self._pending = bytearray(view[pos:])
        return frames

    def _complete(self, data: bytes, frames: list[Frame]) -> int:
        """Add to the pending frame what it lacks from ``data``; returns the bytes taken."""
        pending = self._pending
        taken = 0
        if len(pending) < HEADER_SIZE:
            taken = HEADER_SIZE - len(pending)
            pending += data[:taken]
            if len(pending) < HEADER_SIZE:
                return taken
        ver, cmd, length, sid = _HEADER.unpack_from(pending, 0)
        self._check(ver, cmd, length, sid)
        lacking = HEADER_SIZE + length - len(pending)
        if lacking > 0:
            pending += data[taken : taken + lacking]
            taken += min(lacking, len(data) - taken)
        if len(pending) == HEADER_SIZE + length:
            frames.append(Frame(cmd, sid, bytes(pending[HEADER_SIZE:]) if length else b""))
            self._pending = bytearray()
        return taken

    def _check(self, ver: int, cmd: int, length: int, sid: int) -> None:
        if ver != self.version:
            if ver in (1, 2):
                raise ProtocolError(
                    f"smux version {ver} frame on a version {self.version} session: the peers' mux_version differ"
                )
            raise ProtocolError(f"not an smux frame: version byte 0x{ver:02x}, expected {self.version}")
        if cmd == PSH:
            if length > self.max_payload:
                raise ProtocolError(
                    f"smux PSH frame of {length} bytes on stream {sid} exceeds the limit of {self.max_payload}"
                )
        elif cmd == UPD:
            if self.version == 1:
                raise ProtocolError(f"smux UPD frame on stream {sid} on a version 1 session (v1 has no flow control)")
            if length != UPD_SIZE:
                raise ProtocolError(f"smux UPD frame on stream {sid} with {length} payload bytes, not {UPD_SIZE}")
        elif cmd < len(COMMAND_NAMES):
            if length:
                raise ProtocolError(
                    f"smux {COMMAND_NAMES[cmd]} frame on stream {sid} carries {length} payload bytes, must be empty"
                )
        else:
            raise ProtocolError(f"unknown smux command {cmd} on stream {sid}")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """Something happened on stream ``sid`` that the application should look at."""

    sid: int


@dataclass(frozen=True, slots=True)
class StreamOpened(StreamEvent):
    """The peer opened a stream (acceptor only): accept it, then read its target header."""


@dataclass(frozen=True, slots=True)
class StreamData(StreamEvent):
    """Bytes arrived on the stream and wait in the session until ``read`` takes them."""


@dataclass(frozen=True, slots=True)
class StreamEnded(StreamEvent):
    """The peer sent FIN: reads return EOF (None) once the buffered bytes are read."""


@dataclass(frozen=True, slots=True)
class StreamWritable(StreamEvent):
    """v2: a UPD opened the peer's window after a write was cut short by it: write again."""


@dataclass(frozen=True, slots=True)
class StreamReset(StreamEvent):
    """The peer reset the stream (a peer that said hello only): it is gone, unread bytes too."""


class _Stream:
    """Receive buffer (received payloads as they came, see ChunkQueue) and the counters of one
    live stream."""

    __slots__ = (
        "inbox", "fin_received", "fin_sent",
        "num_read", "since_update", "num_written", "peer_consumed", "peer_window", "blocked", "window",
    )

    def __init__(self) -> None:
        self.inbox = ChunkQueue()  # received, not read yet
        self.fin_received = False
        self.fin_sent = False
        self.num_read = 0  # u32, wraps: what our UPDs report as consumed
        self.since_update = 0  # bytes read since our last UPD
        self.num_written = 0  # u32, wraps
        self.peer_consumed = 0
        self.peer_window = INITIAL_PEER_WINDOW
        self.blocked = False  # a write was cut short by the peer's window
        self.window: StreamWindow | None = None  # v2: our grant, made on the first bytes received


Event = StreamOpened | StreamData | StreamEnded | StreamWritable | StreamReset


class Session:
    """One smux session: its streams, their receive buffers and v2 windows, and the keepalive.

    Feed received bytes to ``receive``, send what ``outgoing`` returns, stop reading the socket
    while ``wants_input`` is False, and call ``tick`` at ``next_deadline()``.
    """

    def __init__(
        self,
        version: int,
        opener: bool,
        frame_size: int,
        receive_buffer: int,
        stream_buffer: int,
        *,
        max_streams: int = ACCEPT_BACKLOG,
        keepalive_interval: float = 20.0,
        keepalive_timeout: float = 40.0,
        outbox_cap: int = 1 << 20,
        max_receive_frame: int = MAX_PAYLOAD,
        hello: bool = True,
        now: float = 0.0,
    ) -> None:
        # The same limits smux's VerifyConfig enforces; the config layer reports them to the user.
        if version not in (1, 2):
            raise ValueError(f"smux version must be 1 or 2, not {version}")
        if not 0 < frame_size <= MAX_PAYLOAD:
            raise ValueError(f"smux frame size must be 1..{MAX_PAYLOAD}, not {frame_size}")
        if not 0 < stream_buffer <= min(receive_buffer, 0x7FFFFFFF):
            raise ValueError(f"smux stream buffer {stream_buffer} must be 1..receive buffer ({receive_buffer})")
        if not 0 < keepalive_interval <= keepalive_timeout:
            raise ValueError(f"keepalive interval {keepalive_interval} must be >0 and <= timeout {keepalive_timeout}")
        if max_streams < 1 or outbox_cap < 1:
            raise ValueError("max_streams and outbox_cap must be positive")
        self.version = version
        self.opener = opener
        self.frame_size = frame_size
        self.receive_buffer = receive_buffer
        self.stream_buffer = stream_buffer
        self.max_streams = max_streams
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.outbox_cap = outbox_cap
        # A Go receiver takes any u16 length whatever its own MaxFrameSize, so peers with different
        # mux_framesize interoperate: by default we do the same.
        self._decoder = FrameDecoder(version, max_receive_frame)
        self._streams: dict[int, _Stream] = {}
        self._last_opened = 1  # opener: the smux Client role starts at 1 and adds 2 before each open
        self._highest_syn = -1  # acceptor: ids at or below it were opened (and may be forgotten)
        # v2: the windows we grant follow each stream's path and reader (protocol/window.py).
        self._windows = WindowTuner(stream_buffer, receive_buffer, INITIAL_PEER_WINDOW) if version == 2 else None
        self._now = now  # the latest time given to us: the clock of a read that brings none
        self.buffered = 0  # received and not yet read, all streams
        # smux sends control frames ahead of queued data; we do so for NOP and UPD only, and keep
        # SYN and FIN in order with the data so a FIN can never overtake its stream's last PSH.
        # Streams take turns (protocol/outbox.py): none waits behind another's backlog.
        self._outbox = Outbox()
        self._control = self._outbox.control
        self.last_received = now
        self._received_since_check = False
        self._next_ping = now + keepalive_interval
        self._next_check = now + keepalive_timeout
        # The peer said hello: its FIN is a half-close and it understands resets (module text).
        self.peer_half_closes = False
        self._reset: set[int] = set()  # streams the peer reset that the application still holds
        # The opener says hello at once; the acceptor once the peer spoke (a Backhaul client
        # sends nothing on a new session before the server does: PROTOCOL.md 2.1).
        self._hello_due = hello and not opener
        if hello and opener:
            self._control.append(_HEADER.pack(version, NOP, 0, HELLO_SID))
        # The opener learns whether the peer says hello from the peer's first bytes. A stream it
        # must end before then waits for them (at most HELLO_WAIT): a FIN sent meanwhile would
        # read as the clean end of an upload its user cut, where a Python peer takes a reset.
        self._peer_spoke = not (hello and opener)
        self._undecided: dict[int, bool] = {}   # sid -> our FIN was sent already
        self._decide_by = math.inf

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        """Live streams (forgotten ones hold no state and do not count)."""
        return len(self._streams)

    def __contains__(self, sid: int) -> bool:
        return sid in self._streams

    @property
    def wants_input(self) -> bool:
        """False while the unread bytes fill the receive buffer: stop reading the socket.

        smux stops its receive loop once its token bucket (receive buffer minus unread) is <= 0.
        """
        return self.buffered < self.receive_buffer

    @property
    def has_outgoing(self) -> bool:
        return bool(self._outbox)

    def outgoing(self) -> bytes:
        """Every queued frame as one bytes object; the outbox is empty afterwards."""
        return b"".join(self._outbox.take(self._outbox.bytes))

    def outgoing_buffers(self, budget: int = ROUND_BYTES) -> list[bytes | memoryview]:
        """The next round of frames (control frames, then the streams' data in turn, ``budget``
        bytes or more) as a list of buffers for one gathered write (``sendmsg``), so payloads are
        not copied again to join them. Take the next round once this one is sent: a frame queued
        meanwhile waits for one round, not for everything queued before it."""
        return self._outbox.take(budget)

    def next_deadline(self) -> float:
        """When ``tick`` must next be called (same clock as ``now``)."""
        return min(self._next_ping, self._next_check, self._decide_by)

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Take bytes from the peer; return what happened, in order.

        At most one StreamData and one StreamWritable per stream and call: one look at the stream
        serves all the frames that arrived together.
        """
        self._now = now
        if data:
            # Bytes arriving prove the peer alive, even a large frame still incomplete.
            self._received_since_check = True
            self.last_received = now
            if self._hello_due:
                self._hello_due = False
                self._control.insert(0, _HEADER.pack(self.version, NOP, 0, HELLO_SID))
        events: list[Event] = []
        readable: set[int] = set()
        writable: set[int] = set()
        for cmd, sid, payload in self._decoder.feed(data):
            if cmd == PSH:
                self._on_push(sid, payload, events, readable)
            elif cmd == UPD:
                self._on_update(sid, payload, events, writable)
            elif cmd == SYN:
                self._on_syn(sid, events)
            elif cmd == FIN:
                self._on_fin(sid, events)
            elif sid:
                self._on_signal(sid, events)
            # NOP on stream 0: liveness only, noted above
        if data and not self._peer_spoke:
            self._peer_spoke = True   # a Python peer's first frame is its hello
            self._end_undecided()
        return events

    def _on_push(self, sid: int, payload: bytes, events: list[Event], readable: set[int]) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            self._check_opened(PSH, sid)  # closed earlier: the peer had not seen our FIN yet
            return
        if stream.fin_received:
            raise ProtocolError(f"smux PSH on stream {sid} after the peer's FIN")
        if not payload:
            return
        stream.inbox.append(payload)
        self.buffered += len(payload)
        tuner = self._windows
        if tuner is not None:
            window = stream.window or self._open_window(tuner, stream)
            if not tuner.received(window, len(payload), self._now):
                raise ProtocolError(
                    f"smux peer ignored the window: {stream.inbox.size} unread bytes on stream {sid}, "
                    f"more than the {window.edge - window.read} granted"
                )
        if sid not in readable:
            readable.add(sid)
            events.append(StreamData(sid))

    def _on_update(self, sid: int, payload: bytes, events: list[Event], writable: set[int]) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            self._check_opened(UPD, sid)
            return
        consumed, window = _UPD.unpack(payload)
        # Modular arithmetic as in smux: the counters wrap at 2**32; "negative" in flight is a lie.
        inflight = (stream.num_written - consumed) & _U32
        if inflight > 0x7FFFFFFF:
            raise ProtocolError(
                f"smux UPD on stream {sid} acknowledges {consumed} bytes, only {stream.num_written} were sent"
            )
        stream.peer_consumed = consumed
        stream.peer_window = window
        if stream.blocked and window > inflight:
            stream.blocked = False
            if sid not in writable:
                writable.add(sid)
                events.append(StreamWritable(sid))

    def _on_syn(self, sid: int, events: list[Event]) -> None:
        if self.opener:
            raise ProtocolError(f"smux SYN for stream {sid} from the accepting side: only the Backhaul server opens")
        # The Backhaul server opens streams one after another, so ids only grow: an id at or below
        # the highest one seen is a duplicate, live or long closed.
        if sid <= self._highest_syn:
            return
        if len(self._streams) >= self.max_streams:
            raise ProtocolError(
                f"smux SYN for stream {sid} with {len(self._streams)} streams open, the limit is "
                f"{self.max_streams}: SYN flood"
            )
        self._highest_syn = sid
        self._streams[sid] = _Stream()
        events.append(StreamOpened(sid))

    def _on_fin(self, sid: int, events: list[Event]) -> None:
        stream = self._streams.get(sid)
        if stream is None:
            self._check_opened(FIN, sid)
            return
        if stream.fin_received:
            return
        stream.fin_received = True
        events.append(StreamEnded(sid))
        self._forget_if_done(sid, stream)

    def _on_signal(self, sid: int, events: list[Event]) -> None:
        """A NOP with a stream id: the peer's hello, or (after its hello) the reset of ``sid``."""
        if sid == HELLO_SID:
            self.peer_half_closes = True
            return
        if not self.peer_half_closes:
            return  # smux ignores a NOP's stream id; so do we, from a peer that never said hello
        stream = self._streams.pop(sid, None)
        if stream is None:
            self._check_opened(NOP, sid)  # closed here already: both sides dropped it at once
            return
        self.buffered -= stream.inbox.size
        self._reset.add(sid)  # reads and writes fail from now on, not end: until close_stream
        events.append(StreamReset(sid))

    def _was_opened(self, sid: int) -> bool:
        if self.opener:
            return sid & 1 == 1 and 3 <= sid <= self._last_opened
        return sid <= self._highest_syn

    def _check_opened(self, cmd: int, sid: int) -> None:
        """A frame for a stream we do not hold: fine if it was open once (a race), else an error."""
        if not self._was_opened(sid):
            raise ProtocolError(f"smux {COMMAND_NAMES[cmd]} for stream {sid}, which was never opened")

    def _check_local(self, sid: int) -> None:
        if sid in self._reset:
            raise ConnectionResetError(f"smux stream {sid} was reset by the peer")
        if not self._was_opened(sid):
            raise ProtocolError(f"smux stream {sid} was never opened", remote=False)

    def _forget_if_done(self, sid: int, stream: _Stream) -> None:
        if stream.fin_sent and stream.fin_received and not stream.inbox.size:
            del self._streams[sid]

    # ------------------------------------------------------------------ application side

    def open_stream(self) -> int:
        """Open a stream (opener only): queue its SYN and return its id."""
        if not self.opener:
            raise ProtocolError("the accepting side of an smux session cannot open streams", remote=False)
        sid = self._last_opened + 2
        if sid > MAX_STREAM_ID:
            raise ProtocolError("smux stream ids of this session are used up: open a new session", remote=False)
        if len(self._streams) >= self.max_streams:
            raise ProtocolError(f"smux session already has {len(self._streams)} streams open", remote=False)
        self._last_opened = sid
        self._streams[sid] = _Stream()
        self._queue_data(_HEADER.pack(self.version, SYN, 0, sid))
        return sid

    def write(self, sid: int, data: bytes, *, whole: bool = False) -> int:
        """Queue as much of ``data`` as the outbox cap and (v2) the peer's window allow; return it.
        With ``whole``, all of it past the outbox cap (a small header), or ProtocolError when the
        peer's window cannot take it all."""
        stream = self._streams.get(sid)
        if stream is None or stream.fin_sent:
            self._check_local(sid)
            raise ProtocolError(f"write on smux stream {sid} after it was shut down or closed", remote=False)
        if not data:
            return 0
        if stream.fin_received and not self.peer_half_closes:
            # Its FIN closed the stream for good at the peer, which discards what still comes:
            # so do we, before it costs the link anything (and a v2 window that never opens).
            return len(data)
        n = len(data) if whole else min(len(data), self._outbox_room(sid))
        if self.version == 2:
            room = stream.peer_window - ((stream.num_written - stream.peer_consumed) & _U32)
            if room < n:
                if whole:
                    raise ProtocolError(f"smux stream {sid}: the peer's window has room for {room} bytes, "
                                        f"not {n}", remote=False)
                stream.blocked = True  # report StreamWritable when a UPD opens the window
                n = room
        if n <= 0:
            return 0
        header = _HEADER.pack
        version = self.version
        size = self.frame_size
        push = self._outbox.push
        # Frames are slices of what was accepted: bytes are immutable and kept as they are, any
        # other buffer is copied once (its owner may reuse it).
        if isinstance(data, bytes):
            payload = memoryview(data)
        else:
            with memoryview(data) as view:
                payload = memoryview(view[:n].tobytes())
        for start in range(0, n, size):
            stop = min(start + size, n)
            push(sid, header(version, PSH, stop - start, sid), payload[start:stop])
        stream.num_written = (stream.num_written + n) & _U32
        return n

    def window_blocked(self, sid: int) -> bool:
        """A write on ``sid`` was cut short by the peer's window (v2): StreamWritable follows."""
        stream = self._streams.get(sid)
        return stream is not None and stream.blocked

    def read(self, sid: int, limit: int, now: float | None = None) -> bytes | None:
        """Up to ``limit`` received bytes; b"" when none are buffered yet, None at end of stream.
        ``now`` times the read for the v2 window (default: the time of the latest receive)."""
        stream = self._streams.get(sid)
        if stream is None:
            self._check_local(sid)
            return None
        if not stream.inbox.size:
            return None if stream.fin_received else b""
        if limit <= 0:
            return b""
        data = stream.inbox.take(limit)
        self.buffered -= len(data)
        if self._windows is not None:
            self._count_read(self._windows, sid, stream, len(data), self._now if now is None else now)
        self._forget_if_done(sid, stream)
        return data

    def _count_read(self, tuner: WindowTuner, sid: int, stream: _Stream, n: int, now: float) -> None:
        # smux stream.go tryReadv2: tell the peer after the first read that returned data
        # (numRead == n) and whenever half the stream buffer was read since the last UPD; also
        # at once when the tuner grew the window, and less often once it is large.
        stream.num_read = (stream.num_read + n) & _U32
        stream.since_update += n
        window = stream.window or self._open_window(tuner, stream)
        grew = tuner.read(window, n, now, self._granted_total)
        if grew or tuner.update_due(window, stream.since_update) or stream.num_read == n:
            stream.since_update = 0
            if stream.num_read:  # smux skips a zero "consumed" (wrapped to exactly 0)
                self._control.append(
                    _HEADER.pack(self.version, UPD, UPD_SIZE, sid) + _UPD.pack(stream.num_read, window.size)
                )
                tuner.granted(window, now)

    def _open_window(self, tuner: WindowTuner, stream: _Stream) -> StreamWindow:
        stream.window = tuner.open(self._now)
        return stream.window

    def _granted_total(self) -> int:
        """What the session's live streams are granted now (their windows' sizes)."""
        return sum(s.window.size for s in self._streams.values() if s.window is not None)

    def shutdown_stream(self, sid: int) -> None:
        """Queue FIN: our side writes no more; reading goes on until the peer's FIN."""
        stream = self._streams.get(sid)
        if stream is None:
            self._check_local(sid)
            return
        if stream.fin_sent:
            return
        stream.fin_sent = True
        self._queue_data(_HEADER.pack(self.version, FIN, 0, sid))
        self._forget_if_done(sid, stream)

    def ended_cleanly(self, sid: int) -> bool:
        """Both directions of ``sid`` ended with a FIN (what is unread is all there is): the
        stream can be read to its end even if the session goes now."""
        stream = self._streams.get(sid)
        return stream is not None and stream.fin_sent and stream.fin_received

    def final_fin(self, sid: int) -> bool:
        """The peer's FIN on ``sid`` closed the stream both ways (a peer that never said hello)."""
        stream = self._streams.get(sid)
        return stream is not None and stream.fin_received and not self.peer_half_closes

    def close_stream(self, sid: int) -> None:
        """Forget the stream, dropping what was not read. If both directions had ended with a
        FIN, that was its clean end. Otherwise a peer that said hello gets a reset (a FIN would
        read as a clean end of data that did not all arrive, or as a half-close while we no
        longer read); any other peer a FIN, unless sent already: its FIN closes both ways."""
        stream = self._streams.pop(sid, None)
        if stream is None:
            if sid in self._reset:
                self._reset.discard(sid)  # the peer dropped it first: nothing to tell
                return
            self._check_local(sid)
            return
        self.buffered -= stream.inbox.size
        if stream.fin_sent and stream.fin_received:
            return
        if not self._peer_spoke:
            self._undecided[sid] = stream.fin_sent
            self._decide_by = min(self._decide_by, self._now + HELLO_WAIT)
            return
        self._end_unclean(sid, stream.fin_sent)

    def _end_unclean(self, sid: int, fin_sent: bool) -> None:
        if self.peer_half_closes:
            self._queue_data(_HEADER.pack(self.version, NOP, 0, sid))
        elif not fin_sent:
            self._queue_data(_HEADER.pack(self.version, FIN, 0, sid))

    def _end_undecided(self) -> None:
        """The peer spoke (or HELLO_WAIT passed): end the streams that waited for it."""
        undecided, self._undecided = self._undecided, {}
        self._decide_by = math.inf
        for sid, fin_sent in undecided.items():
            self._end_unclean(sid, fin_sent)

    def _queue_data(self, frame: bytes) -> None:
        self._outbox.push(_HEADER.unpack_from(frame)[3], frame)

    def _outbox_room(self, sid: int) -> int:
        """What a write on ``sid`` may queue. A stream with nothing queued gets a frame in past
        the cap (up to twice the cap): a backlog of other streams must not keep its frame out of
        the next round."""
        room = self.outbox_cap - self._outbox.bytes
        if room < self.frame_size and not self._outbox.holds(sid):
            room = min(self.frame_size, 2 * self.outbox_cap - self._outbox.bytes)
        return room

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        """Queue the keepalive NOP when due; raise ProtocolError when the peer has gone silent.

        As in smux: one ticker sends NOP every interval, another checks every timeout whether any
        frame came since the previous check. No check fails while the receive buffer is full,
        because then we are the ones not reading.
        """
        if now >= self._next_ping:
            self._control.append(_HEADER.pack(self.version, NOP, 0, 0))
            self._next_ping = _next_tick(self._next_ping, self.keepalive_interval, now)
        if now >= self._decide_by:
            self._peer_spoke = True   # silent so long: no Python peer, whose hello comes at once
            self._end_undecided()
        if now >= self._next_check:
            if not self._received_since_check and self.wants_input:
                raise ProtocolError(f"no smux frame from the peer for {self.keepalive_timeout:g} s (keepalive timeout)")
            self._received_since_check = False
            self._next_check = _next_tick(self._next_check, self.keepalive_timeout, now)


def _next_tick(due: float, period: float, now: float) -> float:
    """The first tick of a ticker with this phase after ``now`` (missed ticks are dropped, like Go's)."""
    return due + period * (math.floor((now - due) / period) + 1)
