"""Socket helpers shared by every transport: options, listeners and non-blocking dials.

Dials run on the reactor (numeric addresses connect without a thread); only a host name that
needs DNS goes to a worker first, because ``getaddrinfo`` blocks.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Callable

from backhaul.errors import TransportError
from backhaul.reactor import WRITE, Reactor, Timer

log = logging.getLogger("backhaul.net")

LISTEN_BACKLOG = 4096
KEEPALIVE_IDLE = 15  # seconds before the first probe, as the Go program's default
KEEPALIVE_COUNT = 9

Dialed = Callable[[socket.socket | None, str], None]


def tune(sock: socket.socket, *, nodelay: bool, keepalive: int = 0, mss: int = 0,
         rcvbuf: int = 0, sndbuf: int = 0) -> None:
    """Apply the socket options of the config; options the OS refuses are skipped."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, min(KEEPALIVE_IDLE, keepalive))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except OSError as exc:
        log.debug("socket option refused: %s", exc)


@functools.lru_cache(maxsize=256)
def is_numeric(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def listen(host: str, port: int, *, mss: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A non-blocking TCP listener; TransportError names the address when it cannot bind."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise TransportError(f"cannot listen on {shown}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise TransportError(f"cannot listen on {shown}: {reason}") from None
    return sock


def peer_of(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int) -> tuple[int, tuple[str, int]]:
    """Blocking DNS lookup: (family, address) of the first TCP result."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise TransportError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return family, addr[:2]


def dial(reactor: Reactor, host: str, port: int, timeout: float, done: Dialed) -> None:
    """Connect without blocking the reactor; ``done(sock, "")`` or ``done(None, reason)`` runs
    on the reactor thread exactly once. Reactor thread only."""
    if is_numeric(host):
        _dial_numeric(reactor, socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port), timeout, done)
        return

    def lookup() -> None:
        try:
            family, addr = resolve(host, port)
        except TransportError as exc:
            reactor.call_soon(done, None, str(exc))
            return
        reactor.call_soon(_dial_numeric, reactor, family, addr, timeout, done)

    reactor.submit(lookup)


def _dial_numeric(reactor: Reactor, family: int, addr: tuple[str, int], timeout: float, done: Dialed) -> None:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    code = sock.connect_ex(addr)
    if code == 0:
        done(sock, "")
        return
    if code not in (errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        done(None, f"cannot connect to {addr[0]}:{addr[1]}: {_strerror(code)}")
        return
    timer: Timer | None = None

    def finished(_mask: int) -> None:
        if timer is not None:
            timer.cancel()
        reactor.watch(sock, 0)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            done(None, f"cannot connect to {addr[0]}:{addr[1]}: {_strerror(err)}")
        else:
            done(sock, "")

    def expired() -> None:
        reactor.watch(sock, 0)
        sock.close()
        done(None, f"cannot connect to {addr[0]}:{addr[1]}: timed out after {timeout:g} s")

    reactor.watch(sock, WRITE, finished)
    timer = reactor.call_later(timeout, expired)


def _strerror(code: int) -> str:
    return os.strerror(code).lower()
