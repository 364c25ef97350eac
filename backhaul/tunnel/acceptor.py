"""The tunnel port of the tcp family: tells links from handshakes and reads handshakes.

With ``auth = "token"`` (v0.7.2) a connection from a control channel's address that has sent
nothing is a link, and anything else is read as a token handshake. With ``auth = "challenge"``
(docs/auth.md) every connection says what it is: a HELLO starts the challenge, a LINK frame with
a proof of a session of its address makes it a link. Either way each is read on the reactor thread
with a 2 s deadline, capped in all and per source address; when the cap is reached the oldest
silent one makes room, because a real client speaks at once and a flood of silent connections
must not keep it out. Failures count per address (tunnel/gate.py): an address past the limit
is refused unread for the rest of its window, except the last one that proved the token (its
links in flight when its control channel drops fail by the dozen, and must not keep it out).
"""

from __future__ import annotations

import logging
import secrets
import socket
from collections.abc import Callable, Iterable

from backhaul.errors import ProtocolError
from backhaul.protocol import auth
from backhaul.protocol.auth import AuthError, LinkChecker, ServerHandshake, check_any
from backhaul.protocol.framing import SG_CHAN, FrameReader
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, hello, hello_reader, server_accepts
from backhaul.reactor import READ, Reactor
from backhaul.tunnel.gate import Gate
from backhaul.tunnel.pending import MAX_PENDING, PENDING_PER_SOURCE, Pending, PendingSet

log = logging.getLogger("backhaul.tunnel.acceptor")


# on_control(sock, peer, ip, reply, links): a valid handshake; the socket now belongs to the
# callee, which sends ``reply`` first; ``links`` checks the new session's links (challenge only)
OnControl = Callable[[socket.socket, str, str, bytes, LinkChecker | None], None]
OnLink = Callable[[socket.socket, str, str], None]   # on_link(sock, peer, ip): not watched by the reactor
CheckersOf = Callable[[str], Iterable[LinkChecker]]   # the link checkers of an address's sessions

# the frame types a connection may start with, by mode (anything else is rejected at its third byte)
_FIRST = {False: (SG_CHAN,), True: (auth.HELLO, auth.LINK)}
_OTHER_MODE = {False: auth.HELLO, True: SG_CHAN}   # the first frame of the other mode's client
MODE_MISMATCH = {
    False: 'the client uses auth = "challenge"; set it on this server too',
    True: 'the client sent the token handshake of v0.7.2 (auth = "token"); this server has auth = "challenge"',
}


class Handshake(Pending):
    """A tunnel connection whose handshake (or, with challenge, link proof) is being read."""

    __slots__ = ("reader", "foreign", "challenge", "link")

    def __init__(self, sock: socket.socket, peer: str, ip: str, foreign: str) -> None:
        super().__init__(sock, peer, ip)
        self.reader: FrameReader = hello_reader()
        self.foreign = foreign   # the control channels' addresses when this one came from another
        self.challenge: ServerHandshake | None = None   # sent CHALLENGE, waiting for PROOF
        self.link = False        # it sent a LINK frame: a failure is a refused data connection


def has_bytes(sock: socket.socket) -> bool:
    """A link sends nothing before its header; bytes already waiting mean a handshake (a client
    that restarted from the same address) or junk, never a link to hand to a user."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    except OSError:
        return True  # broken already: let the handshake path close it with a reason


def drain(sock: socket.socket, limit: int = 65536) -> None:
    """Take what the peer sent and we did not read (a bounded amount), so that our close is a FIN
    it can read as a refusal, not a reset that may reach it before it reads what it sent for."""
    try:
        while limit > 0:
            data = sock.recv(min(limit, 16384))
            if not data:
                return
            limit -= len(data)
    except OSError:
        pass


class HandshakeAcceptor:
    """Sorts tunnel connections into links and handshakes, and judges the handshakes."""

    def __init__(self, reactor: Reactor, token: str, on_control: OnControl, on_link: OnLink,
                 max_pending: int = MAX_PENDING, per_source: int = PENDING_PER_SOURCE, *,
                 challenge: bool = False, checkers_of: CheckersOf = lambda _ip: ()) -> None:
        self.reactor = reactor
        self.token = token
        self.on_control = on_control
        self.on_link = on_link
        self.challenge = challenge
        self.control_ips: frozenset[str] = frozenset()   # set by the owner: the addresses with a control channel
        self.checkers_of = checkers_of   # challenge: the link checkers of the sessions of an address
        self.gate = Gate(lambda ip: ip in self.control_ips)
        self.pending: PendingSet[Handshake] = PendingSet(reactor, "handshakes", HANDSHAKE_TIMEOUT, self._expired,
                                                         max_pending, per_source, gate=self.gate)

    def arrived(self, sock: socket.socket, addr: tuple) -> None:
        """A new connection on the tunnel port."""
        ip = addr[0]
        if not self.gate.admits(ip):
            sock.close()
            return
        sock.setblocking(False)
        if not self.challenge and ip in self.control_ips and not has_bytes(sock):
            self.on_link(sock, f"{ip}:{addr[1]}", ip)
        else:
            self.begin(sock, f"{ip}:{addr[1]}", ip)

    def begin(self, sock: socket.socket, peer: str, ip: str) -> None:
        """Read a handshake from ``sock`` (also used for a pooled link that starts talking)."""
        foreign = ""   # whose address a link should have come from: one, or how many (balance mode)
        if self.control_ips and ip not in self.control_ips:
            count = len(self.control_ips)
            foreign = next(iter(self.control_ips)) if count == 1 else f"{count} addresses of clients"
        entry = Handshake(sock, peer, ip, foreign)
        self.pending.add(entry)
        self.reactor.watch(sock, READ, lambda _m: self._readable(entry))

    def _readable(self, entry: Handshake) -> None:
        kind, verdict = "", ""
        try:
            while not kind:  # a frame usually arrives whole: judge it without another wake-up
                data = entry.sock.recv(entry.reader.needed())
                if not data:
                    kind, verdict = "closed", ("closed the connection before its handshake ended" if self.challenge
                                               else "closed the connection before sending a token")
                    break
                entry.heard = True
                entry.reader.feed(data)
                if entry.reader.kind is not None and entry.reader.kind not in self._expected(entry):
                    other = entry.challenge is None and entry.reader.kind == _OTHER_MODE[self.challenge]
                    kind, verdict = ("auth", MODE_MISMATCH[self.challenge]) if other else (
                        "garbage", "not a Backhaul handshake")
                elif entry.reader.done:
                    kind, verdict = self._judge(entry)
        except BlockingIOError:
            return
        except AuthError as exc:
            kind, verdict = exc.kind, str(exc)
        except ProtocolError as exc:
            kind, verdict = "garbage", f"not a Backhaul handshake ({exc})"
        except OSError as exc:
            kind, verdict = "failed", f"connection failed during the handshake: {exc.strerror or exc}"
        if kind == "ok":
            reply = entry.challenge.welcome() if entry.challenge else hello(self.token)
            links = entry.challenge.links() if entry.challenge else None
            self._end(entry, close=False)
            self.gate.proven(entry.ip)
            self.on_control(entry.sock, entry.peer, entry.ip, reply, links)
        elif kind == "linked":
            self._end(entry, close=False)
            self.on_link(entry.sock, entry.peer, entry.ip)
        else:
            self._failed(entry, kind, verdict)

    def _expected(self, entry: Handshake) -> tuple[int, ...]:
        return (auth.PROOF,) if entry.challenge is not None else _FIRST[self.challenge]

    def _judge(self, entry: Handshake) -> tuple[str, str]:
        """A whole frame is in: ("ok", ""), ("linked", ""), ("", "") to read the next frame, or a
        failure's kind and verdict. AuthError and ProtocolError mean a failure too."""
        kind, payload = entry.reader.kind, entry.reader.payload
        if not self.challenge:
            return ("ok", "") if server_accepts(entry.reader, self.token) else ("token", "wrong token")
        if entry.challenge is not None:
            entry.challenge.check(kind, payload)
            return "ok", ""
        if kind == auth.LINK:
            return self._link(entry)
        entry.challenge = ServerHandshake(self.token, secrets.token_bytes(auth.NONCE_SIZE))
        frame = entry.challenge.challenge(kind, payload)
        if entry.sock.send(frame) != len(frame):  # into an empty socket: it goes whole or not at all
            return "failed", "the connection took only part of the challenge"
        entry.reader = hello_reader()
        return "", ""

    def _link(self, entry: Handshake) -> tuple[str, str]:
        """A LINK frame: the proof of a session of its address, from a control channel's address."""
        entry.link = True
        if not self.control_ips:
            return "early", "no control channel is up"
        if entry.foreign:
            return "foreign", f"not {_whose(entry.foreign)} {entry.foreign}"
        kind, payload = entry.reader.kind, entry.reader.payload
        check_any(self.checkers_of(entry.ip), lambda links: links.check_frame(kind, payload))
        return "linked", ""

    def _failed(self, entry: Handshake, kind: str, verdict: str) -> None:
        if entry.link:
            self.gate.failed(entry.ip, kind, "rejected data connection from %s: %s", entry.peer, verdict)
        else:
            self.gate.failed(entry.ip, kind, "rejected client %s: %s", entry.ip, verdict)
        drain(entry.sock)
        self._end(entry)

    def _expired(self, entry: Handshake) -> None:
        if entry.foreign:
            self.gate.failed(entry.ip, "foreign", "rejected data connection from %s: not %s %s", entry.peer,
                             _whose(entry.foreign), entry.foreign)
        elif self.challenge:
            self.gate.failed(entry.ip, "timeout", "rejected client %s: no handshake or link proof within %g s",
                             entry.peer, HANDSHAKE_TIMEOUT)
        else:
            self.gate.failed(entry.ip, "timeout", "rejected client %s: no handshake within %g s", entry.peer,
                             HANDSHAKE_TIMEOUT)

    def _end(self, entry: Handshake, close: bool = True) -> None:
        self.pending.end(entry, close)
        if not close:
            self.reactor.forget(entry.sock)

    def close(self) -> None:
        self.pending.close()


def _whose(foreign: str) -> str:
    return "one of the" if " " in foreign else "the control channel's address"
