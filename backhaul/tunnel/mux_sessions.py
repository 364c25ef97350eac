"""smux sessions as a tunnel's links, for tcpmux and wsmux (PROTOCOL.md 2, 3.4): every link
connection from the client is an smux session; the server opens one stream per user connection,
sends the LV target header (and PROXY v2 when asked) and relays. How a session connection is
dialed and judged (a plain TCP connection after the tcp handshake, or an HTTP upgrade) is the
transport's; everything from the session on is here.

Roles are inverted as in Backhaul: the server opens streams (smux client role, ids 3, 5, 7, ...),
the client only accepts them.
"""

from __future__ import annotations

import collections
import logging
import math
import socket
import time
from collections.abc import Callable

from backhaul.config import ClientConfig, ServerConfig
from backhaul.errors import ProtocolError
from backhaul.links.smux_stream import StreamLink
from backhaul.log import Throttles
from backhaul.mux.session import MuxConnection, MuxSettings, MuxStream
from backhaul.net import peer_of, tune
from backhaul.protocol.framing import FrameReader
from backhaul.protocol.smux import ACCEPT_BACKLOG
from backhaul.tunnel.carrier import Carrier
from backhaul.tunnel.core import Arrival, ClientCore, ServerCore
from backhaul.tunnel.dialer import LinkDialed
from backhaul.tunnel.pool import REQUEST_TTL
from backhaul.tunnel.session import TunnelSession

log = logging.getLogger("backhaul.tunnel.mux_sessions")

MAX_CLIENT_SESSIONS = 1024    # sessions open or opening on the client
HEADER_LIMIT = 0xFFFF
BACKLOG = ACCEPT_BACKLOG      # client: streams opened whose target header has not arrived yet
CLIENT_MAX_STREAMS = 65536    # client: live streams of one session (memory bound; Go has none)
QUIET_SESSIONS_PER_POOL = 2   # server: sessions asked for so one stays quiet, at most this x connection_pool

# opens one more session connection and calls back once with it (a plain TCP connection after
# a link proof for tcpmux, an upgraded one for wsmux)
DialSession = Callable[[LinkDialed], object]   # what it returns is not used


def settings(cfg: ServerConfig | ClientConfig, max_streams: int) -> MuxSettings:
    return MuxSettings(cfg.mux_version, cfg.mux_framesize, cfg.mux_recievebuffer, cfg.mux_streambuffer,
                       max_streams)


# ------------------------------------------------------------------------------------------------
# server side

class SessionLinks:
    """tcpmux's links: streams opened on the client's sessions, at most mux_con per session.

    When every session is full the server asks for another one (0x01), once per mux_con users
    still waiting, as the Go server does; a request not answered in REQUEST_TTL is asked again.
    When bulk crosses every session with room, it asks for one more too, so that the next user
    finds a quiet session: on a session that carries a download, each packet the path loses holds
    every other stream's frames for a round trip (TCP delivers in order). Those sessions are
    bounded by QUIET_SESSIONS_PER_POOL x connection_pool.
    """

    def __init__(self, core: ServerCore, ask: Callable[[int], None], talking: Callable[[socket.socket], None]) -> None:
        self.core = core
        self.reactor = core.reactor
        self.config = core.config
        self.ask = ask
        self.settings = settings(core.config, max(ACCEPT_BACKLOG, core.config.mux_con))
        self.sessions: list[MuxConnection] = []
        self.requested: collections.deque[float] = collections.deque()
        self.demand = 0          # users that found every session full since the last request
        # Hints, checked on use, so a user costs a look or two and not one at every session:
        # sessions that had no stream, and sessions that had room, in the order they got so.
        self._empty: dict[MuxConnection, None] = {}
        self._with_room: dict[MuxConnection, None] = {}
        self._warn = Throttles(log)

    def start(self) -> None:
        """The client dials its own sessions right after the handshake."""

    def stop(self) -> None:
        """The client went (or told us it goes): its sessions take no new stream, and each one
        ends once the streams it carries have ended (within drain_timeout), so that a user whose
        last bytes are still on their way gets them all."""
        sessions, self.sessions = self.sessions, []
        for conn in sessions:
            conn.finish(self.config.drain_timeout)
        self.requested.clear()
        self.demand = 0
        self._empty.clear()
        self._with_room.clear()

    def add(self, arrival: Arrival) -> None:
        """A new session from the client; ``arrival.first``: its bytes read already (wsmux)."""
        sock = arrival.sock
        self.reactor.forget(sock)  # its demux thread and its own callbacks take it from here
        peer = peer_of(sock)
        if len(self.sessions) >= self.config.channel_size:
            self._warn.warning("sessions", "closed smux session from %s: %d open already (channel_size)",
                               peer, len(self.sessions))
            sock.close()
            return
        # Frames are coalesced into one write per flush already; Nagle would only add delay.
        tune(sock, nodelay=True)
        conn = MuxConnection(self.reactor, sock, peer, self.settings, opener=True, on_stream=None,
                             on_lost=self._lost)
        conn.on_stream_closed = self._room
        conn.on_busy = self._bulk_began
        self.sessions.append(conn)
        self._empty[conn] = self._with_room[conn] = None
        if self.requested:
            self.requested.popleft()
        self.demand = max(0, self.demand - self.config.mux_con)
        conn.start(arrival.first)
        log.debug("smux session from %s: %d open", peer, len(self.sessions))
        self.core.link_available()

    def _lost(self, conn: MuxConnection, why: str) -> None:
        if conn in self.sessions:
            self.sessions.remove(conn)
        self._empty.pop(conn, None)
        self._with_room.pop(conn, None)
        self._warn.warning("lost", "smux session from %s ended: %s", conn.peer, why)

    def _room(self, conn: MuxConnection) -> None:
        self._note_room(conn)
        self.core.link_available()

    def _note_room(self, conn: MuxConnection) -> None:
        """One of ``conn``'s streams ended."""
        if not conn.closed and not conn.finishing:
            count = len(conn.streams)
            if count < self.config.mux_con:
                self._with_room[conn] = None
                if not count:
                    self._empty[conn] = None

    def _forget_unanswered(self, now: float) -> None:
        while self.requested and now - self.requested[0] > REQUEST_TTL:
            self.requested.popleft()

    def _bulk_began(self, _conn: MuxConnection) -> None:
        """A session turned busy: ask for one more if no quiet session with room is left."""
        now = time.monotonic()
        self._forget_unanswered(now)
        most = min(self.config.channel_size, QUIET_SESSIONS_PER_POOL * max(1, self.config.connection_pool))
        if self.requested or len(self.sessions) >= most:
            return  # one is on its way already (or asked by a waiting user), or enough are open
        free = self._free()   # the best session for a new stream: busy only if all with room are
        if free is not None and (not free.streams or not free.busy_at(now)):
            return
        self.requested.append(now)
        self.ask(1)

    def _free(self) -> MuxConnection | None:
        """The session for the next stream: one with no stream (empty the longest) if there is
        one, else the one with the fewest streams below mux_con (streams counted as Go does),
        a session that bulk crosses only when every other is full or busy too (a new stream's
        frames would wait behind the bulk in its socket); None when every session is full."""
        empty = self._empty
        while empty:
            conn = next(iter(empty))
            if not conn.streams and not conn.closed and not conn.finishing:
                return conn
            del empty[conn]
        mux_con = self.config.mux_con
        best, rank, full = None, (True, mux_con), []
        now = time.monotonic()
        for conn in self._with_room:
            count = len(conn.streams)
            if count >= mux_con or conn.closed or conn.finishing:
                full.append(conn)
                continue
            if count >= rank[1] and not rank[0]:
                continue  # a quiet session with as few streams is chosen already
            here = (conn.busy_at(now), count)
            if here < rank:
                best, rank = conn, here
                if here <= (False, 1):
                    break  # none is empty: one stream on a quiet session is the best there is
        for conn in full:
            del self._with_room[conn]
        return best

    def idle(self) -> int:
        """Streams the sessions may still open (as many users as that, without asking)."""
        mux_con = self.config.mux_con
        return sum(max(0, mux_con - len(conn.streams)) for conn in self.sessions)

    def enough(self) -> int:
        return max(1, self.config.connection_pool) * self.config.mux_con

    def user_arrived(self) -> None:
        if self._free() is not None:
            return
        now = time.monotonic()
        self._forget_unanswered(now)
        self.demand += 1
        wanted = math.ceil(self.demand / self.config.mux_con)
        if len(self.requested) < min(wanted, self.config.channel_size):
            self.requested.append(now)
            self.ask(1)

    def take(self) -> StreamLink | None:
        while True:
            conn = self._free()
            if conn is None:
                return None
            try:
                stream = conn.open_stream()
            except ProtocolError as exc:  # ids used up or streams full: this session is done
                conn.fail(str(exc))
                continue
            self._empty.pop(conn, None)
            if len(conn.streams) >= self.config.mux_con:
                self._with_room.pop(conn, None)
            return StreamLink(self.reactor, stream)


# ------------------------------------------------------------------------------------------------
# client side

class HeaderReader:
    """Reads the LV target header at the start of a new stream, then hands the stream on."""

    __slots__ = ("session", "stream", "reader", "waiting")

    def __init__(self, session: MuxClientSession, stream: MuxStream) -> None:
        self.session = session
        self.stream = stream
        self.reader = FrameReader(typed=False, max_length=HEADER_LIMIT)
        self.waiting = True   # counted in the session's backlog

    def stream_readable(self) -> None:
        try:
            while not self.reader.done:
                data = self.stream.read(self.reader.needed())
                if data is None:
                    self._drop()  # ended before its header
                    return
                if not data:
                    return
                self.reader.feed(data)
        except (OSError, ProtocolError) as exc:
            log.debug("stream %d dropped before its header: %s", self.stream.sid, exc)
            self._drop()
            return
        self._leave_backlog()
        target = (self.reader.payload or b"").decode("utf-8", "replace")
        self.stream.listener = None
        self.session.core.carry(StreamLink(self.session.reactor, self.stream), target)

    def stream_writable(self) -> None:
        """Nothing is written before the header is read."""

    def stream_failed(self, reason: str) -> None:
        self._drop()

    def _drop(self) -> None:
        self._leave_backlog()
        self.stream.close()

    def _leave_backlog(self) -> None:
        if self.waiting:
            self.waiting = False
            self.session.header_done(self.stream)


class MuxClientSession(TunnelSession):
    """The client's end of one control channel and the smux sessions it opened, each on a
    connection ``dial_session`` opens."""

    def __init__(self, core: ClientCore, carrier: Carrier, dial_session: DialSession, *,
                 heartbeat_echo: bool = False) -> None:
        super().__init__(core, carrier, what="smux session", most=MAX_CLIENT_SESSIONS, rtt_echo=False,
                         heartbeat_echo=heartbeat_echo)
        self.dial_session = dial_session
        self.settings = settings(self.config, CLIENT_MAX_STREAMS)
        self.backlog: dict[MuxConnection, int] = {}
        self.sessions: list[MuxConnection] = []

    def first_links(self) -> int:
        return max(self.config.connection_pool, self.config.mux_session)

    def dial_link(self) -> None:
        self.dial_session(self._dialed)

    def idle_links(self) -> int:
        return sum(1 for conn in self.sessions if not len(conn))

    def open_links(self) -> int:
        return len(self.sessions)

    def close_links(self) -> None:
        """The smux sessions go once the streams they carry have ended (within drain_timeout): a
        reload or a fail-back must not cut a user's last bytes."""
        sessions, self.sessions = self.sessions, []
        for conn in sessions:
            conn.finish(self.config.drain_timeout)

    def _dialed(self, sock: socket.socket | None, error: str, first: bytes) -> None:
        self.pool.opened(error)
        if sock is None:
            return
        self.reactor.forget(sock)  # its demux thread reads it from now on
        if self.closed:
            sock.close()
            return
        cfg = self.config
        # Frames are coalesced into one write per flush already; Nagle would only add delay.
        tune(sock, nodelay=True, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf, congestion=cfg.congestion)
        conn = MuxConnection(self.reactor, sock, "the server", self.settings, opener=False,
                             on_stream=self._stream_opened, on_lost=self._session_lost)
        self.sessions.append(conn)
        conn.start(first)

    def _stream_opened(self, stream: MuxStream) -> None:
        conn = stream.conn
        waiting = self.backlog[conn] = self.backlog.get(conn, 0) + 1
        if waiting > BACKLOG:  # smux's accept backlog: a peer opening streams it never fills
            conn.fail(f"smux SYN flood: {BACKLOG} streams opened and still without their target header")
            return
        stream.listen(HeaderReader(self, stream))

    def header_done(self, stream: MuxStream) -> None:
        """A new stream's header arrived, or it ended first: it leaves the backlog."""
        conn = stream.conn
        if conn in self.backlog:
            self.backlog[conn] -= 1

    def _session_lost(self, conn: MuxConnection, why: str) -> None:
        self.backlog.pop(conn, None)
        if conn in self.sessions:
            self.sessions.remove(conn)
        if self.closed:
            return
        log.warning("an smux session with the server ended: %s", why)
        if len(self.sessions) + self.pool.opening < self.config.mux_session:
            self.pool.open()  # keep mux_session sessions open
