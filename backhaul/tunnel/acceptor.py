"""The tunnel port of the tcp family: tells links from handshakes and reads handshakes.

A connection from a control channel's address that has sent nothing is a link. Anything else
is read as a token handshake on the reactor thread, each with a 2 s deadline. Pending handshakes
are capped in all and per source address; when the cap is reached the oldest silent one makes
room, because a real client sends its token at once and a flood of silent connections must not
keep it out.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from backhaul.errors import ProtocolError
from backhaul.protocol.framing import SG_CHAN, FrameReader
from backhaul.protocol.handshake import HANDSHAKE_TIMEOUT, hello_reader, server_accepts
from backhaul.reactor import READ, Reactor
from backhaul.tunnel.pending import HANDSHAKE_FAILURES, MAX_PENDING, PENDING_PER_SOURCE, Pending, PendingSet

log = logging.getLogger("backhaul.acceptor")


# on_control(sock, peer, ip): a valid handshake; the socket now belongs to the callee
OnControl = Callable[[socket.socket, str, str], None]
OnLink = Callable[[socket.socket, str], None]   # on_link(sock, ip)


class Handshake(Pending):
    """A tunnel connection whose token handshake is being read."""

    __slots__ = ("reader", "foreign")

    def __init__(self, sock: socket.socket, peer: str, ip: str, foreign: str) -> None:
        super().__init__(sock, peer, ip)
        self.reader: FrameReader = hello_reader()
        self.foreign = foreign   # the control channels' addresses when this one came from another


def has_bytes(sock: socket.socket) -> bool:
    """A link sends nothing before its header; bytes already waiting mean a handshake (a client
    that restarted from the same address) or junk, never a link to hand to a user."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    except OSError:
        return True  # broken already: let the handshake path close it with a reason


class HandshakeAcceptor:
    """Sorts tunnel connections into links and handshakes, and judges the handshakes."""

    def __init__(self, reactor: Reactor, token: str, on_control: OnControl, on_link: OnLink,
                 max_pending: int = MAX_PENDING, per_source: int = PENDING_PER_SOURCE) -> None:
        self.reactor = reactor
        self.token = token
        self.on_control = on_control
        self.on_link = on_link
        self.control_ips: frozenset[str] = frozenset()   # set by the owner: the addresses with a control channel
        self.pending: PendingSet[Handshake] = PendingSet(reactor, "handshakes", HANDSHAKE_TIMEOUT, self._expired,
                                                         max_pending, per_source)
        self._warn = self.pending.warn

    def arrived(self, sock: socket.socket, addr: tuple) -> None:
        """A new connection on the tunnel port."""
        sock.setblocking(False)
        ip = addr[0]
        if ip in self.control_ips and not has_bytes(sock):
            self.on_link(sock, ip)
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
            while True:  # the frame usually arrives whole: judge it without another wake-up
                data = entry.sock.recv(entry.reader.needed())
                if not data:
                    kind, verdict = "closed", "closed the connection before sending a token"
                    break
                entry.heard = True
                entry.reader.feed(data)
                if entry.reader.kind is not None and entry.reader.kind != SG_CHAN:
                    kind, verdict = "garbage", "not a Backhaul handshake"
                    break
                if entry.reader.done:
                    accepted = server_accepts(entry.reader, self.token)
                    kind, verdict = ("ok", "") if accepted else ("token", "wrong token")
                    break
        except BlockingIOError:
            return
        except ProtocolError as exc:
            kind, verdict = "garbage", f"not a Backhaul handshake ({exc})"
        except OSError as exc:
            kind, verdict = "failed", f"connection failed during the handshake: {exc.strerror or exc}"
        if kind == "ok":
            self._end(entry, close=False)
            self.on_control(entry.sock, entry.peer, entry.ip)
        else:
            HANDSHAKE_FAILURES.inc(1, kind)
            self._warn.warning(kind, "rejected client %s: %s", entry.ip, verdict)
            self._end(entry)

    def _expired(self, entry: Handshake) -> None:
        HANDSHAKE_FAILURES.inc(1, "foreign" if entry.foreign else "timeout")
        if entry.foreign:
            whose = "one of the" if " " in entry.foreign else "the control channel's address"
            self._warn.warning("foreign", "rejected data connection from %s: not %s %s", entry.peer, whose,
                               entry.foreign)
        else:
            self._warn.warning("timeout", "rejected client %s: no handshake within %g s", entry.peer,
                               HANDSHAKE_TIMEOUT)

    def _end(self, entry: Handshake, close: bool = True) -> None:
        self.pending.end(entry, close)
        if not close:
            self.reactor.forget(entry.sock)

    def close(self) -> None:
        self.pending.close()
