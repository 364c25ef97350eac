"""The HTTP-upgrade handshake of the WebSocket transports (PROTOCOL.md 3), shared by ws, wss,
wsmux and wssmux: every connection is an HTTP upgrade with ``Authorization: Bearer <token>`` (or,
with ``auth = "challenge"``, the challenge inside ``/channel`` and a link proof on each
``/tunnel/<N>``): ``/channel`` for the control channel (1-byte binary messages on a WebSocket),
``/tunnel/<N>`` for a link. wss and wssmux add TLS (stdlib ``ssl``).

Server: ``UpgradePort`` reads and answers the heads (protocol/http_upgrade.py) and hands each
accepted ``/tunnel/<N>`` to the transport's ``Links`` as an ``Arrival`` (a WebSocket for ws, an
smux session for wsmux). Client: ``connect_control`` (blocking) and ``UpgradeDial`` (on the
reactor) dial, wrap in TLS, pin, send the head and check the answer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import secrets
import socket
import ssl
import time
from dataclasses import dataclass

from backhaul.config import ClientConfig, ServerConfig
from backhaul.entropy import RANDOM
from backhaul.errors import ProtocolError, TransportError
from backhaul.links.websocket import WebSocket, WebSocketCarrier
from backhaul.net import dial, reason, tune
from backhaul.protocol import auth
from backhaul.protocol import http_upgrade as http
from backhaul.protocol.auth import AuthError, LinkChecker, LinkSigner, ServerHandshake, check_any
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, hello_reader
from backhaul.reactor import READ, WRITE, Reactor
from backhaul.tunnel.acceptor import MODE_MISMATCH
from backhaul.tunnel.core import Arrival, ClientCore, ServerCore
from backhaul.tunnel.dialer import LinkDialed, control_connection
from backhaul.tunnel.gate import Gate
from backhaul.tunnel.pending import Pending, PendingSet
from backhaul.tunnel.port import LinksFactory, LinksT, LinkT, Port
from backhaul.tunnel.ws_challenge import challenge

log = logging.getLogger("backhaul.tunnel.upgrade")

HEAD_TIMEOUT = 10.0          # seconds for a connection to send its whole upgrade head (then 408)


def uses_tls(transport: str) -> bool:
    return transport in ("wss", "wssmux")


# ------------------------------------------------------------------------------------------------
# server side

class Head(Pending):
    """A connection on the tunnel port whose TLS handshake and upgrade head are being read."""

    __slots__ = ("reader", "tls_done")

    def __init__(self, sock: socket.socket, peer: str, ip: str, tls: bool) -> None:
        super().__init__(sock, peer, ip)
        self.reader = http.RequestReader()
        self.tls_done = not tls


class Challenge(Pending):
    """An upgraded /channel whose challenge (docs/auth.md) runs in its first messages."""

    __slots__ = ("ws", "handshake")

    def __init__(self, ws: WebSocket, peer: str, ip: str) -> None:
        super().__init__(ws.sock, peer, ip)
        self.ws = ws
        self.handshake: ServerHandshake | None = None   # set when HELLO came and CHALLENGE went

    def discard(self, reactor: Reactor) -> None:
        self.ws.close()


def server_context(cfg: ServerConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise TransportError(f"cannot use tls_cert {cfg.tls_cert} with tls_key {cfg.tls_key}: {exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpgradePort(Port[LinkT, LinksT]):
    """The tunnel port of the WebSocket transports: TLS (wss, wssmux), upgrade heads, the control
    channel, and each accepted link connection handed to the links ``make_links`` makes; there is
    no address check (PROTOCOL.md 3.1), the token is on every request."""

    def __init__(self, core: ServerCore, make_links: LinksFactory[LinksT]) -> None:
        super().__init__(core, core.config.transport, make_links)
        self.tls = uses_tls(self.name)
        self.context: ssl.SSLContext | None = None
        self.challenge = self.config.auth == "challenge"
        self.gate = Gate(lambda ip: ip in self.pending.trusted)
        self.pending: PendingSet[Head] = PendingSet(self.reactor, "upgrade heads", HEAD_TIMEOUT, self._too_slow,
                                                    gate=self.gate)
        self.challenges: PendingSet[Challenge] = PendingSet(self.reactor, "challenges", HANDSHAKE_TIMEOUT,
                                                            self._no_proof, gate=self.gate)

    def open(self) -> None:
        if self.tls:
            self.context = server_context(self.config)
        super().open()

    def _trust(self, ips: frozenset[str]) -> None:
        # The clients' own data connections come from there, many at once under load.
        self.pending.trusted = self.challenges.trusted = ips

    def _close_pending(self) -> None:
        self.pending.close()
        self.challenges.close()

    # --- heads ----------------------------------------------------------------------------------
    def _arrived(self, sock: socket.socket, addr: tuple) -> None:
        if not self.gate.admits(addr[0]):
            sock.close()
            return
        sock.setblocking(False)
        if self.context is not None:
            try:
                sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:  # gone already (a reset with bytes unread)
                self.gate.failed(addr[0], "tls", "rejected client %s:%d: %s", addr[0], addr[1], tls_reason(exc))
                sock.close()
                return
        entry = Head(sock, f"{addr[0]}:{addr[1]}", addr[0], self.tls)
        self.pending.add(entry)
        self.reactor.watch(sock, READ, lambda _m: self._step(entry))
        self._step(entry)  # a client sends its head at once: it is often here already

    def _step(self, entry: Head) -> None:
        sock = entry.sock
        try:
            if not entry.tls_done:
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                entry.tls_done = True
            while True:
                data = sock.recv(16384)
                if not data:
                    self._reject(entry, "closed", "closed the connection before its upgrade head ended")
                    return
                entry.heard = True
                request = entry.reader.feed(data)
                if request is not None:
                    break
        except ssl.SSLWantReadError:
            self.reactor.watch(sock, READ, lambda _m: self._step(entry))
            return
        except ssl.SSLWantWriteError:
            self.reactor.watch(sock, WRITE, lambda _m: self._step(entry))
            return
        except BlockingIOError:
            return
        except (http.HeadTooLarge, http.BadRequest) as exc:
            self._reject(entry, "head", f"bad upgrade head ({exc})", exc.status)
            return
        except ssl.SSLError as exc:
            self._reject(entry, "tls", f"TLS handshake failed: {exc.reason or exc}")
            return
        except OSError as exc:
            self._reject(entry, "failed", f"connection failed during the upgrade: {reason(exc)}")
            return
        self._request(entry, request)

    def _too_slow(self, entry: Head) -> None:
        self.gate.failed(entry.ip, "timeout", "rejected client %s: no whole upgrade head within %g s", entry.peer,
                         HEAD_TIMEOUT)
        self._answer(entry.sock, http.error_response(408))

    def _reject(self, entry: Head, kind: str, why: str, status: int = 0) -> None:
        self.gate.failed(entry.ip, kind, "rejected client %s: %s", entry.peer, why)
        if status:
            self._answer(entry.sock, http.error_response(status), last=True)
        self.pending.end(entry)

    def _answer(self, sock: socket.socket, response: bytes, *, last: bool = False) -> None:
        """Send a small answer now. The ``last`` one goes out at once (no Nagle delay behind
        TLS tickets) and what the peer sent that we did not read is taken first, so the close
        that follows is no reset that would drop the answer."""
        try:
            if last:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(4):  # bounded: the head's rest, never a peer's endless stream
                    if not sock.recv(65536):
                        break
        except (OSError, ssl.SSLError):
            pass
        try:
            sock.send(response)  # small, into an empty socket: it goes whole or the peer is gone
        except (OSError, ssl.SSLError):
            pass

    def _request(self, entry: Head, request: http.Request) -> None:
        route = request.route
        refusal = self._credentials(request, route)
        if refusal is not None:
            self._reject(entry, *refusal, 401)
            return
        if route is None:
            self._reject(entry, "path", f"unknown path {request.path!r}", 404)
            return
        owner = self.entry_of(entry.ip) if route == "data" else None
        if route == "data" and owner is None:
            if not self.clients:
                self._reject(entry, "early", "data connection before any control channel", 404)
            else:  # balance: a link belongs to the client of its address, and this one has none
                self._reject(entry, "foreign", "data connection from an address without a control channel", 404)
            return
        if route == "data" and self.challenge:
            try:
                check_any(owner.checkers.values(), lambda links: links.check_authorization(request.authorization))
            except AuthError as exc:
                self._reject(entry, exc.kind, f"data connection: {exc}", 401)
                return
        if self.tls:  # the 101 must not wait behind the TLS tickets for an ACK (Nagle): 40 ms a connection
            with contextlib.suppress(OSError):
                entry.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._answer(entry.sock, http.accept_response(request.key))
        self.pending.end(entry, close=False)
        sock, peer = entry.sock, entry.peer
        if owner is not None:
            # Still watched: a websocket takes the registration over (no system call).
            owner.links.add(Arrival(sock, peer, request.rest))
            return
        self.reactor.forget(sock)
        ws = WebSocket(self.reactor, sock, client=False, peer=f"client {peer}", first=request.rest)
        if self.challenge:
            self._begin_challenge(ws, peer, entry.ip)
        else:
            self._control_up(ws, peer, entry.ip)

    def _credentials(self, request: http.Request, route: str | None) -> tuple[str, str] | None:
        """Why the request's Authorization is refused (kind, why), or None. Token mode: the
        bearer token on every request; challenge: none on /channel (the proof follows inside the
        websocket), a link proof on /tunnel/<N> (checked once the path is known good)."""
        value = request.authorization
        if self.challenge:
            if route == "control" and value is not None:
                return "auth", MODE_MISMATCH[True]
            return None
        if http.authorized(request, self.config.token):
            return None
        if value is None and route == "control":
            return "auth", 'no token on /channel (a client with auth = "challenge" sends none)'
        if (value or "").startswith(auth.LINK_SCHEME + " "):
            return "auth", MODE_MISMATCH[False]
        return "token", "wrong token"

    # --- the challenge (auth = "challenge") -----------------------------------------------------
    def _begin_challenge(self, ws: WebSocket, peer: str, ip: str) -> None:
        entry = Challenge(ws, peer, ip)
        self.challenges.add(entry)
        ws.messages(lambda message: self._challenge_message(entry, message),
                    lambda _why: self._challenge_failed(entry, "closed", "closed the connection before its "
                                                        "handshake ended"))

    def _challenge_message(self, entry: Challenge, message: bytes | str) -> None:
        """HELLO: answer with CHALLENGE; then PROOF: welcome the client, the channel is up."""
        entry.heard = True
        try:
            if isinstance(message, str):
                raise AuthError("a text message in the challenge", "garbage")
            reader = hello_reader()
            if reader.feed(message) or not reader.done:
                raise AuthError("a challenge message that is not one whole frame", "garbage")
            if entry.handshake is None:
                handshake = ServerHandshake(self.config.token, secrets.token_bytes(auth.NONCE_SIZE))
                entry.ws.send_binary(handshake.challenge(reader.kind, reader.payload))
                entry.handshake = handshake
                return
            entry.handshake.check(reader.kind, reader.payload)
        except AuthError as exc:
            self._challenge_failed(entry, exc.kind, str(exc))
            return
        except ProtocolError as exc:
            self._challenge_failed(entry, "garbage", f"not a Backhaul handshake ({exc})")
            return
        if not self.challenges.end(entry, close=False):
            return
        entry.ws.send_binary(entry.handshake.welcome())
        self._control_up(entry.ws, entry.peer, entry.ip, entry.handshake.links())

    def _challenge_failed(self, entry: Challenge, kind: str, why: str) -> None:
        if entry.sock not in self.challenges.entries:
            return
        self.gate.failed(entry.ip, kind, "rejected client %s: %s", entry.peer, why)
        self.challenges.end(entry)

    def _no_proof(self, entry: Challenge) -> None:
        self.gate.failed(entry.ip, "timeout", "rejected client %s: no answer to the challenge within %g s",
                         entry.peer, HANDSHAKE_TIMEOUT)

    # --- the control channel --------------------------------------------------------------------
    def _control_up(self, ws: WebSocket, peer: str, ip: str, links: LinkChecker | None = None) -> None:
        self.gate.proven(ip)
        if self.clients and not self.balance:
            # PROTOCOL.md 3.1: a second /channel resets the server; the client reconnects.
            log.warning("client %s opened a second control channel: closing both (the one from %s too)",
                        peer, self.peer())
            self._drop_all(notify=True)
            ws.close()
            return
        self._install(WebSocketCarrier(ws), peer, ip, rtt_probe=False, links=links)


# ------------------------------------------------------------------------------------------------
# client side

_warned_unchecked = False


def client_context(cfg: ClientConfig) -> ssl.SSLContext:
    """TLS as the operator chose: like Go (no check, a warning once) unless tls_verify; a
    pinned certificate is checked by its fingerprint after the handshake."""
    return client_tls(cfg).context


def client_tls(cfg: ClientConfig) -> ClientTls:
    """The TLS side of this client's connections to its server, shared by all of them."""
    global _warned_unchecked
    if not (cfg.tls_verify or cfg.tls_pin or _warned_unchecked):
        _warned_unchecked = True
        log.warning("the server's certificate is not checked (as the Go client does): set tls_verify "
                    "with tls_ca, or tls_pin, to know whom you talk to")
    return _client_tls(cfg.tls_verify, cfg.tls_ca, _stamp(cfg.tls_ca) if cfg.tls_verify else 0,
                       cfg.remote_host, cfg.remote_port)


def _stamp(path: str) -> int:
    """When the CA file last changed (0: none, or gone): a new file makes a new context, as a
    context per connection did before."""
    if not path:
        return 0
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


class ClientTls:
    """One context for every connection of a client to one server, and the last TLS session that
    server gave: the next link resumes it (no certificate sent, signed and checked again; on wss
    a full handshake was most of a link's CPU). A server that does not resume it makes a full
    handshake, as before; a pinned certificate is still checked on every connection (a resumed
    session carries the certificate it was made with)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.session: ssl.SSLSession | None = None

    def wrap(self, sock: socket.socket, host: str, *, handshake: bool = True) -> ssl.SSLSocket:
        return self.context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=handshake,
                                        session=self.session)

    def keep(self, sock: ssl.SSLSocket, now: float | None = None) -> None:
        """After the server's first bytes (TLS 1.3 sends its tickets after the handshake). A
        connection that resumed the kept session leaves it kept until half its lifetime is gone:
        reading a socket's session copies it (the certificate parsed again, ~0.1 ms a link)."""
        kept = self.session
        now = time.time() if now is None else now
        if kept is not None and sock.session_reused and now < kept.time + kept.timeout / 2:
            return
        session = sock.session
        if session is not None and session.has_ticket:
            self.session = session


@functools.lru_cache(maxsize=16)
def _client_tls(verify: bool, ca: str, _ca_changed: int, host: str, port: int) -> ClientTls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["http/1.1"])  # never h2: the upgrade needs HTTP/1.1
    if verify:
        # The name or the address of remote_addr must be the certificate's (an address is
        # checked too; it is sent as no SNI, as Go does).
        context.check_hostname = True
        if ca:
            context.load_verify_locations(ca)
        else:
            context.load_default_certs()
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return ClientTls(context)


def tls_reason(exc: OSError) -> str:
    """What went wrong in a TLS handshake, as precisely as the ssl module says it."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"the server's certificate is refused: {exc.verify_message}"
    return str(getattr(exc, "reason", None) or exc)


def check_pin(sock: ssl.SSLSocket, pin: str) -> None:
    if not pin:
        return
    der = sock.getpeercert(binary_form=True) or b""
    if hashlib.sha256(der).hexdigest() != pin:
        raise ProtocolError("the server's certificate does not match tls_pin")


def request_head(cfg: ClientConfig, path_kind: str, signer: LinkSigner | None = None) -> tuple[bytes, str]:
    """An upgrade request for the control channel or a data connection, and its key. With
    auth = "challenge": no Authorization on /channel, the session's link proof on /tunnel/<N>."""
    raw_key, user_id = http.new_key_and_id(RANDOM)
    path = http.CONTROL_PATH if path_kind == "control" else http.data_path(user_id)
    agent = http.pick_user_agent(RANDOM)
    if cfg.auth != "challenge":
        return http.client_request(cfg.remote_addr, path, cfg.token, agent, user_id, raw_key), http.encode_key(raw_key)
    authorization = signer.authorization() if signer is not None and path_kind == "data" else None
    return http.upgrade_request(cfg.remote_addr, path, authorization, agent, user_id, raw_key), http.encode_key(raw_key)


def check_answer(cfg: ClientConfig, response: http.Response, key: str, path_kind: str) -> None:
    """The upgrade was accepted; a 401 says what was refused in the auth mode at hand."""
    if response.status == 401 and cfg.auth == "challenge":
        raise ProtocolError("the server refused the link proof (401)" if path_kind == "data" else
                            'the server answered 401 to a /channel without a token: it may not have '
                            'auth = "challenge"')
    http.check_accept(response, key)


def dial_address(cfg: ClientConfig) -> tuple[str, int]:
    """edge_ip (a CDN edge) when set: the TCP connection goes there, Host and SNI stay remote_addr."""
    return (cfg.edge_ip or cfg.remote_host), cfg.remote_port


@dataclass(frozen=True, slots=True)
class Upgraded:
    """A control connection past its upgrade (and challenge), non-blocking: ``first`` holds the
    bytes read behind the answer (the control channel's first frames); ``signer`` signs the
    session's links under auth = "challenge"."""

    sock: socket.socket
    first: bytes
    server_addr: tuple[str, int]
    signer: LinkSigner | None


def connect_control(core: ClientCore) -> Upgraded:
    """Dial, TLS, upgrade to /channel (and the challenge); blocking, on the client's own thread."""
    cfg = core.config
    sock, addr = control_connection(cfg, *dial_address(cfg))
    try:
        if uses_tls(cfg.transport):
            try:
                sock = client_tls(cfg).wrap(sock, cfg.remote_host)
            except (ssl.SSLError, OSError) as exc:
                raise TransportError(f"TLS handshake failed: {tls_reason(exc)}") from None
            check_pin(sock, cfg.tls_pin)
        head, key = request_head(cfg, "control")
        reader = http.ResponseReader()
        try:
            sock.sendall(head)
            response = None
            while response is None:
                data = sock.recv(16384)
                if not data:
                    raise ProtocolError("the server closed the connection during the upgrade")
                response = reader.feed(data)
        except TimeoutError:
            raise ProtocolError("no upgrade answer from the server in time") from None
        except OSError as exc:
            raise TransportError(f"upgrade failed: {reason(exc)}") from None
        check_answer(cfg, response, key, "control")
        if isinstance(sock, ssl.SSLSocket):
            client_tls(cfg).keep(sock)
        first, signer = response.rest, None
        if cfg.auth == "challenge":
            try:
                signer, first = challenge(sock, cfg.token, first)
            except OSError as exc:
                raise TransportError(f"challenge failed: {reason(exc)}") from None
        sock.setblocking(False)
        return Upgraded(sock, first, addr, signer)
    except BaseException:
        sock.close()
        raise


class UpgradeDial:
    """One data connection on the reactor: connect, TLS, upgrade to /tunnel/<N>; ``done(sock, "",
    first)`` or ``done(None, reason, b"")`` once, within dial_timeout. The socket comes still
    watched by the reactor: ``done`` watches it with a callback of its own (a ``WebSocket`` takes
    the registration over), forgets it or closes it with ``reactor.close_socket``."""

    def __init__(self, core: ClientCore, addr: tuple[str, int], signer: LinkSigner | None,
                 done: LinkDialed) -> None:
        self.core = core
        self.cfg = core.config
        self.reactor = core.reactor
        self.done = done
        self.sock: socket.socket | None = None
        self.head, self.key = request_head(self.cfg, "data", signer)
        self.reader = http.ResponseReader()
        self.tls_done = False
        self.timer = self.reactor.call_later(self.cfg.dial_timeout, self._fail, "the upgrade timed out")
        dial(self.reactor, core.resolver, addr[0], addr[1], self.cfg.dial_timeout, self._connected, self.cfg.local_addr)

    def _connected(self, sock: socket.socket | None, error: str) -> None:
        if self.done is None:
            if sock is not None:
                self.reactor.close_socket(sock)
            return
        if sock is None:
            self._fail(error)
            return
        cfg = self.cfg
        tune(sock, nodelay=True, keepalive=cfg.keepalive_period, mss=cfg.mss, rcvbuf=cfg.so_rcvbuf,
             sndbuf=cfg.so_sndbuf, congestion=cfg.congestion)
        # The socket may still be watched (for WRITE, when the dial waited for the handshake):
        # every step below watches it anew or closes it, which saves a system call or two.
        self.sock = sock
        if uses_tls(cfg.transport):
            # wrap_socket takes the descriptor over, and closes it when it fails (a connection
            # reset already): the reactor must not be left watching a number that is reused.
            self.reactor.forget(sock)
            # The TLS handshake starts after the events at hand, not inside the turn that
            # dialed (a dial to a server on this host is up at once). Measured on loopback, wss
            # under ab with 50 and 200 users: starting it at once cost ~100 µs more per link
            # (client ~65, server ~30) and ~13 % of the connections per second. The head of a
            # plain upgrade is best sent at once (deferred, ws lost 6-7 %).
            self.reactor.call_soon(self._start_tls)
            return
        self._step(0)

    def _start_tls(self) -> None:
        if self.done is None:
            return   # failed in between (timed out, or the client stops): _fail closed it
        sock = self.sock
        assert sock is not None
        try:
            self.sock = client_tls(self.cfg).wrap(sock, self.cfg.remote_host, handshake=False)
        except (ssl.SSLError, OSError) as exc:  # the connection broke already
            sock.close()   # nothing left to close when wrap_socket took it over
            self.sock = None
            self._fail(f"TLS handshake failed: {tls_reason(exc)}")
            return
        self._step(0)

    def _step(self, _mask: int) -> None:
        sock = self.sock
        assert sock is not None
        try:
            if isinstance(sock, ssl.SSLSocket) and not self.tls_done:
                sock.do_handshake()
                self.tls_done = True
                check_pin(sock, self.cfg.tls_pin)
            if self.head:
                sent = sock.send(self.head)
                self.head = self.head[sent:]
                # The answer cannot be here before the server has read the head: wait for it
                # instead of a read that fails.
                self.reactor.watch(sock, WRITE if self.head else READ, self._step)
                return
            while True:
                data = sock.recv(16384)
                if not data:
                    self._fail("the server closed the connection during the upgrade")
                    return
                response = self.reader.feed(data)
                if response is not None:
                    break
        except ssl.SSLWantReadError:
            self.reactor.watch(sock, READ, self._step)
            return
        except ssl.SSLWantWriteError:
            self.reactor.watch(sock, WRITE, self._step)
            return
        except BlockingIOError:
            self.reactor.watch(sock, READ, self._step)
            return
        except ProtocolError as exc:
            self._fail(str(exc))
            return
        except ssl.SSLError as exc:
            self._fail(f"TLS handshake failed: {tls_reason(exc)}")
            return
        except OSError as exc:
            self._fail(f"upgrade failed: {reason(exc)}")
            return
        try:
            check_answer(self.cfg, response, self.key, "data")
        except ProtocolError as exc:
            self._fail(str(exc))
            return
        if isinstance(sock, ssl.SSLSocket):
            client_tls(self.cfg).keep(sock)
        done, self.done = self.done, None
        self.timer.cancel()
        assert done is not None
        done(sock, "", response.rest)

    def _fail(self, why: str) -> None:
        done, self.done = self.done, None
        if done is None:
            return
        self.timer.cancel()
        if self.sock is not None:
            self.reactor.close_socket(self.sock)
        done(None, why, b"")

