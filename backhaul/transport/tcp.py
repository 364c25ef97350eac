"""The ``tcp`` transport (PROTOCOL.md 1): one control channel plus a pool of plain TCP links,
each carrying one user connection after an LTV target header.

Server and client side live here; what they share with other transports is in server.py,
client.py, net.py and relay.py.
"""

from __future__ import annotations

import collections
import logging
import socket
import time
from typing import TYPE_CHECKING

from backhaul.errors import ProtocolError, TransportError
from backhaul.log import Throttle
from backhaul.net import dial, listen, peer_of, resolve, tune
from backhaul.poolsize import PoolSizer
from backhaul.protocol.control import client_signals, server_signals
from backhaul.protocol.framing import SG_CHAN, SG_CLOSED, SG_HB, SG_RTT, SG_TCP, SG_UDP, FrameReader, encode_ltv
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, client_accepts, hello, hello_reader, server_accepts
from backhaul.protocol.proxy_v2 import encode_proxy_v2
from backhaul.reactor import READ, WRITE, Timer

if TYPE_CHECKING:
    from backhaul.client import Client
    from backhaul.config import PortMapping
    from backhaul.server import Server

log = logging.getLogger("backhaul.tcp")

MAX_PENDING_HANDSHAKES = 256   # silent or slow peers beyond this are turned away at once
REQUEST_TTL = 5.0              # a link asked for with SG_CHAN and not dialed by then is asked again
TOP_UP_EVERY = 1.0
CONTROL_BACKLOG = 64 * 1024    # bytes queued on a control channel the peer does not read
MAX_CLIENT_LINKS = 4096        # idle plus dialing links on the client
ACCEPT_BATCH = 64


# ------------------------------------------------------------------------------------------------
# server side

class Candidate:
    """A tunnel connection that may be a client's handshake."""

    __slots__ = ("sock", "peer", "reader", "timer", "busy", "expired", "foreign")

    def __init__(self, sock: socket.socket, peer: str, foreign: str) -> None:
        self.sock = sock
        self.peer = peer
        self.reader = hello_reader()
        self.timer: Timer | None = None
        self.busy = False
        self.expired = False
        self.foreign = foreign   # the control channel's address when this one came from another


class Control:
    """The server's end of an established control channel."""

    __slots__ = ("sock", "ip", "peer", "outbuf", "rtt_sent", "timers")

    def __init__(self, sock: socket.socket, ip: str, peer: str) -> None:
        self.sock = sock
        self.ip = ip
        self.peer = peer
        self.outbuf = bytearray()
        self.rtt_sent = time.monotonic()
        self.timers: list[Timer] = []


def _has_bytes(sock: socket.socket) -> bool:
    """A link sends nothing before its header; bytes already waiting mean a handshake (a client
    that restarted from the same address) or junk, never a link to hand to a user."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    except OSError:
        return True  # broken already: let the handshake path close it with a reason


class TcpServer:
    """Tunnel port of the tcp transport: handshakes, the control channel and idle links."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.reactor = server.reactor
        self.listener: socket.socket | None = None
        self.control: Control | None = None
        self.idle: collections.deque[socket.socket] = collections.deque()
        self.pending: dict[socket.socket, Candidate] = {}
        self.requested: collections.deque[float] = collections.deque()
        self._headers: dict[PortMapping, bytes] = {}
        self._throttles: dict[str, Throttle] = {}

    # --- lifecycle ----------------------------------------------------------------------------
    def open(self) -> None:
        cfg = self.config
        self.listener = listen(cfg.bind_host, cfg.bind_port, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf)

    def start(self) -> None:
        assert self.listener is not None
        self.reactor.watch(self.listener, READ, self._accept)
        log.info("tcp tunnel listening on %s:%d", self.config.bind_host, self.config.bind_port)

    def close(self) -> None:
        if self.control is not None:
            self._send(SG_CLOSED)
            self._drop_control("")
        for cand in list(self.pending.values()):
            self._end_candidate(cand)
        if self.listener is not None:
            self.reactor.forget(self.listener)
            self.listener.close()
            self.listener = None

    # --- accepting tunnel connections ---------------------------------------------------------
    def _accept(self, _mask: int) -> None:
        assert self.listener is not None
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept on the tunnel port failed: %s", exc.strerror or exc)
                return
            sock.setblocking(False)
            ip = addr[0]
            control = self.control
            if control is not None and ip == control.ip and not _has_bytes(sock):
                self._add_link(sock)
            else:
                self._begin_handshake(sock, f"{ip}:{addr[1]}", control.ip if control else "")

    def _tune_link(self, sock: socket.socket) -> None:
        cfg = self.config
        tune(sock, nodelay=cfg.nodelay, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf)

    # --- handshakes: the reactor waits, a worker reads ----------------------------------------
    def _begin_handshake(self, sock: socket.socket, peer: str, foreign: str) -> None:
        if len(self.pending) >= MAX_PENDING_HANDSHAKES:
            self._warn("pending", "turned away %s: %d handshakes already pending", peer, len(self.pending))
            sock.close()
            return
        cand = Candidate(sock, peer, foreign)
        cand.timer = self.reactor.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired, cand)
        self.pending[sock] = cand
        self.reactor.watch(sock, READ, lambda _m: self._handshake_readable(cand))

    def _handshake_readable(self, cand: Candidate) -> None:
        self.reactor.watch(cand.sock, 0)
        cand.busy = True
        self.reactor.submit(self._handshake_step, cand)

    def _handshake_step(self, cand: Candidate) -> None:
        """Worker: read what arrived and judge it; the verdict goes back to the reactor."""
        kind, verdict = "", ""
        try:
            data = cand.sock.recv(cand.reader.needed())
            if not data:
                kind, verdict = "closed", "closed the connection before sending a token"
            else:
                cand.reader.feed(data)
                if cand.reader.kind is not None and cand.reader.kind != SG_CHAN:
                    kind, verdict = "garbage", "not a Backhaul handshake"
                elif cand.reader.done:
                    accepted = server_accepts(cand.reader, self.config.token)
                    kind, verdict = ("ok", "") if accepted else ("token", "wrong token")
        except BlockingIOError:
            pass
        except ProtocolError as exc:
            kind, verdict = "garbage", f"not a Backhaul handshake ({exc})"
        except OSError as exc:
            kind, verdict = "failed", f"connection failed during the handshake: {exc.strerror or exc}"
        self.reactor.call_soon(self._handshake_verdict, cand, kind, verdict)

    def _handshake_verdict(self, cand: Candidate, kind: str, verdict: str) -> None:
        cand.busy = False
        if self.pending.get(cand.sock) is not cand:
            cand.sock.close()  # ended (server shutting down) while the worker still read it
            return
        if cand.expired:
            self._handshake_expired(cand)
        elif kind == "ok":
            self._end_candidate(cand, close=False)
            self._install(cand)
        elif kind:
            self._warn(kind, "rejected client %s: %s", cand.peer.rsplit(":", 1)[0], verdict)
            self._end_candidate(cand)
        else:
            self.reactor.watch(cand.sock, READ, lambda _m: self._handshake_readable(cand))

    def _handshake_expired(self, cand: Candidate) -> None:
        if cand.busy:
            cand.expired = True  # the worker still reads this socket; close when it is back
            return
        if cand.foreign:
            self._warn("foreign", "rejected data connection from %s: not the control channel's "
                       "address %s", cand.peer, cand.foreign)
        else:
            self._warn("timeout", "rejected client %s: no handshake within %g s", cand.peer, HANDSHAKE_TIMEOUT)
        self._end_candidate(cand)

    def _end_candidate(self, cand: Candidate, close: bool = True) -> None:
        self.pending.pop(cand.sock, None)
        if cand.timer is not None:
            cand.timer.cancel()
        self.reactor.forget(cand.sock)
        if close and not cand.busy:
            cand.sock.close()

    # --- the control channel ------------------------------------------------------------------
    def _install(self, cand: Candidate) -> None:
        sock = cand.sock
        ip = cand.peer.rsplit(":", 1)[0]
        if self.control is not None:
            log.info("client %s opened a new control channel; dropping the one from %s",
                     cand.peer, self.control.peer)
            self._drop_control("")
        tune(sock, nodelay=True, keepalive=self.config.keepalive_period)
        control = self.control = Control(sock, ip, cand.peer)
        # Installed before the reply leaves, so the client's links that follow find it.
        self._send_raw(hello(self.config.token) + bytes((SG_RTT,)))
        if self.control is not control:
            return
        self.reactor.watch(sock, READ, self._control_event)
        control.timers = [
            self.reactor.call_later(self.config.heartbeat, self._heartbeat),
            self.reactor.call_later(TOP_UP_EVERY, self._top_up),
        ]
        log.info("client %s connected: control channel up", cand.peer)
        if self.config.token_is_default:
            log.warning("the default token is in use; set token on both sides")

    def _control_event(self, mask: int) -> None:
        control = self.control
        if control is None:
            return
        if mask & WRITE:
            self._flush()
            if self.control is None:
                return
        if not mask & READ:
            return
        try:
            data = control.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._drop_control(f"control channel from {control.peer} failed: {exc.strerror or exc}")
            return
        if not data:
            self._drop_control(f"client {control.peer} closed the control channel")
            return
        for signal in server_signals(data):
            if signal == SG_CLOSED:
                self._drop_control(f"client {control.peer} is shutting down or restarting", logging.INFO)
                return
            if signal == SG_RTT:
                log.debug("rtt to client %s: %.1f ms", control.peer, (time.monotonic() - control.rtt_sent) * 1e3)

    def _send(self, signal: int) -> None:
        self._send_raw(bytes((signal,)))

    def _send_raw(self, data: bytes) -> None:
        control = self.control
        if control is None:
            return
        control.outbuf += data
        self._flush()

    def _flush(self) -> None:
        control = self.control
        assert control is not None
        try:
            while control.outbuf:
                sent = control.sock.send(control.outbuf)
                del control.outbuf[:sent]
        except BlockingIOError:
            if len(control.outbuf) > CONTROL_BACKLOG:
                self._drop_control(f"client {control.peer} does not read its control channel")
                return
        except OSError as exc:
            self._drop_control(f"control channel to {control.peer} failed: {exc.strerror or exc}")
            return
        self.reactor.watch(control.sock, READ | (WRITE if control.outbuf else 0), self._control_event)

    def _drop_control(self, reason: str, level: int = logging.WARNING) -> None:
        control = self.control
        if control is None:
            return
        self.control = None
        if reason:
            log.log(level, "%s; waiting for the client to reconnect", reason)
        for timer in control.timers:
            timer.cancel()
        self.reactor.forget(control.sock)
        control.sock.close()
        while self.idle:  # they belong to the client that went away
            link = self.idle.popleft()
            self.reactor.forget(link)
            link.close()
        self.requested.clear()

    def _heartbeat(self) -> None:
        control = self.control
        if control is None:
            return
        self._send(SG_HB)
        if self.control is control:
            control.timers[0] = self.reactor.call_later(self.config.heartbeat, self._heartbeat)

    def _top_up(self) -> None:
        """Keep connection_pool links ready: ask for what is missing and not yet asked for."""
        control = self.control
        if control is None:
            return
        now = time.monotonic()
        while self.requested and now - self.requested[0] > REQUEST_TTL:
            self.requested.popleft()
        missing = self.config.connection_pool - len(self.idle) - len(self.requested)
        for _ in range(max(0, min(missing, self.config.channel_size - len(self.requested)))):
            self._ask_for_link(now)
        if self.control is control:
            control.timers[1] = self.reactor.call_later(TOP_UP_EVERY, self._top_up)

    def _ask_for_link(self, now: float) -> None:
        control = self.control
        if control is None:
            return
        if len(self.requested) < self.config.channel_size:
            self.requested.append(now)
        # Requests of one batch of accepts leave in one write, after the batch.
        if not control.outbuf:
            self.reactor.call_soon(self._flush_requests, control)
        control.outbuf.append(SG_CHAN)

    def _flush_requests(self, control: Control) -> None:
        if self.control is control and control.outbuf:
            self._flush()

    # --- links ----------------------------------------------------------------------------
    def _add_link(self, sock: socket.socket) -> None:
        if len(self.idle) >= self.config.channel_size:
            self._warn("links", "closed data connection from %s: %d idle already (channel_size)",
                       peer_of(sock), len(self.idle))
            sock.close()
            return
        self._tune_link(sock)
        if self.requested:
            self.requested.popleft()
        self.idle.append(sock)
        self.reactor.watch(sock, READ, lambda _m: self._idle_event(sock))
        self.server.link_available()

    def _idle_event(self, sock: socket.socket) -> None:
        """An idle link spoke before being used: it closed, or a restarted client handshakes."""
        try:
            self.idle.remove(sock)
        except ValueError:
            return
        self.reactor.watch(sock, 0)
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        if first:
            self._begin_handshake(sock, peer_of(sock), "")
        else:
            sock.close()

    def user_arrived(self) -> None:
        if self.control is not None:
            self._ask_for_link(time.monotonic())

    def carry(self, user: socket.socket, mapping: PortMapping) -> bool:
        while self.idle:
            link = self.idle.popleft()
            self.reactor.watch(link, 0)
            header = self._header(mapping, user, link)
            try:
                sent = link.send(header)
            except OSError:
                sent = -1
            if sent != len(header):  # a stale link: its client end is gone
                link.close()
                continue
            self.server.relay(user, link)
            return True
        return False

    def _header(self, mapping: PortMapping, user: socket.socket, link: socket.socket) -> bytes:
        header = self._headers.get(mapping)
        if header is None:
            header = self._headers[mapping] = encode_ltv(SG_TCP, mapping.target.encode())
        if self.config.proxy_protocol:
            try:
                header += encode_proxy_v2(user.getpeername()[:2], link.getpeername()[:2])
            except OSError:
                return b""  # one of them is already gone
        return header

    def _warn(self, kind: str, fmt: str, *args: object) -> None:
        throttle = self._throttles.get(kind)
        if throttle is None:
            throttle = self._throttles[kind] = Throttle(log)
        throttle.warning(fmt, *args)


# ------------------------------------------------------------------------------------------------
# client side

def connect(client: Client) -> TcpSession:
    """Dial the control channel and do the token handshake; blocking, the client's thread."""
    cfg = client.config
    family, addr = resolve(cfg.remote_host, cfg.remote_port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(cfg.dial_timeout)
        try:
            sock.connect(addr)
        except OSError as exc:
            raise TransportError(_reason(exc)) from None
        tune(sock, nodelay=True, keepalive=cfg.keepalive_period, mss=cfg.mss)
        sock.settimeout(HANDSHAKE_TIMEOUT)
        reader = hello_reader()
        try:
            sock.sendall(hello(cfg.token))
            while not reader.done:
                data = sock.recv(reader.needed())
                if not data:
                    raise ProtocolError("the server closed the connection during the handshake "
                                        "(wrong token?)")
                reader.feed(data)
        except TimeoutError:
            raise ProtocolError(f"no handshake reply from the server within {HANDSHAKE_TIMEOUT:g} s") from None
        except OSError as exc:
            raise TransportError(f"handshake failed: {_reason(exc)}") from None
        if not client_accepts(reader, cfg.token):
            raise ProtocolError("the server answered the handshake with a different token")
        sock.setblocking(False)
        return TcpSession(client, sock, addr)
    except BaseException:
        sock.close()
        raise


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (exc.strerror or str(exc)).lower()


class TcpSession:
    """The client's end of one control channel and the links it opened."""

    def __init__(self, client: Client, control: socket.socket, server_addr: tuple[str, int]) -> None:
        self.client = client
        self.config = client.config
        self.reactor = client.reactor
        self.control = control
        self.server_addr = server_addr
        self.links: dict[socket.socket, FrameReader] = {}
        self.dialing = 0
        self.closed = False
        self.last_heard = time.monotonic()
        self.watchdog: Timer | None = None
        self.sizer = PoolSizer(self.config.connection_pool, self.config.aggressive_pool)
        self.sizing: Timer | None = None
        self._dial_errors = Throttle(log)

    def start(self) -> None:
        if self.closed:
            return
        self.reactor.watch(self.control, READ, self._control_event)
        self.watchdog = self.reactor.call_later(self.config.heartbeat, self._check_silence)
        self.sizing = self.reactor.call_later(1.0, self._size_pool)
        for _ in range(self.config.connection_pool):
            self._dial_link()

    def _size_pool(self) -> None:
        if self.sizer.sample(len(self.links), len(self.links) + self.dialing):
            self._dial_link()
        self.sizing = self.reactor.call_later(1.0, self._size_pool)

    def _control_event(self, _mask: int) -> None:
        try:
            data = self.control.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"control channel failed: {_reason(exc)}", notify=False)
            return
        if not data:
            self.close("the server closed the control channel", notify=False)
            return
        self.last_heard = time.monotonic()
        try:
            signals = client_signals(data)
        except ProtocolError as exc:
            self.close(str(exc), notify=True)
            return
        for signal in signals:
            if signal == SG_CHAN:
                if self.sizer.take_request():
                    self._dial_link()
            elif signal == SG_RTT:
                self._send(SG_RTT)
            elif signal == SG_CLOSED:
                self.close("the server is shutting down or restarting", notify=False)
                return
            else:
                log.debug("heartbeat from the server")

    def _send(self, signal: int) -> None:
        try:
            self.control.send(bytes((signal,)))
        except BlockingIOError:
            pass  # one lost echo or closing signal; the byte stream stays intact
        except OSError as exc:
            self.close(f"control channel failed: {_reason(exc)}", notify=False)

    def _check_silence(self) -> None:
        silent = time.monotonic() - self.last_heard
        limit = 3 * self.config.heartbeat
        if silent > limit:
            self.close(f"the server has been silent for {silent:.0f} s (3 heartbeats)", notify=True)
            return
        self.watchdog = self.reactor.call_later(self.config.heartbeat, self._check_silence)

    def _dial_link(self) -> None:
        if self.closed:
            return
        if len(self.links) + self.dialing >= MAX_CLIENT_LINKS:
            self._dial_errors.warning("not opening another data connection: %d already idle or opening",
                                      MAX_CLIENT_LINKS)
            return
        self.dialing += 1
        dial(self.reactor, self.server_addr[0], self.server_addr[1], self.config.dial_timeout, self._link_dialed)

    def _link_dialed(self, sock: socket.socket | None, error: str) -> None:
        self.dialing -= 1
        if sock is None:
            self._dial_errors.warning("data connection failed: %s", error)
            return
        if self.closed:
            sock.close()
            return
        cfg = self.config
        tune(sock, nodelay=cfg.nodelay, keepalive=cfg.keepalive_period, mss=cfg.mss,
             rcvbuf=cfg.so_rcvbuf, sndbuf=cfg.so_sndbuf)
        self.links[sock] = FrameReader(typed=True)
        self.reactor.watch(sock, READ, lambda _m: self._link_event(sock))

    def _link_event(self, sock: socket.socket) -> None:
        reader = self.links.get(sock)
        if reader is None:
            return
        try:
            while True:  # the header usually arrives whole: read it without another wake-up
                data = sock.recv(reader.needed())
                if not data:
                    break
                reader.feed(data)
                if reader.done:
                    break
        except BlockingIOError:
            return
        except (OSError, ProtocolError) as exc:
            log.debug("data connection dropped: %s", exc)
            data = b""
        del self.links[sock]
        self.reactor.watch(sock, 0)
        if not data:
            sock.close()  # the server closed an idle link
            return
        target = (reader.payload or b"").decode("utf-8", "replace")
        if reader.kind == SG_TCP:
            self.client.carry(sock, target)
        elif reader.kind == SG_UDP:
            log.warning("dropped a UDP flow for %s: accept_udp is not supported by this client yet", target)
            sock.close()
        else:
            log.warning("dropped a data connection: unknown header type 0x%02x", reader.kind or 0)
            sock.close()

    def close(self, reason: str, *, notify: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if notify:
            self._send(SG_CLOSED)
        for timer in (self.watchdog, self.sizing):
            if timer is not None:
                timer.cancel()
        self.reactor.forget(self.control)
        self.control.close()
        for sock in self.links:
            self.reactor.forget(sock)
            sock.close()
        self.links.clear()
        self.client.session_ended(self, reason)
