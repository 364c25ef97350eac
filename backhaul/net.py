"""Socket helpers shared by every transport: options, listeners and non-blocking dials.

Dials run on the reactor (numeric addresses connect without a thread); a host name that needs
DNS goes to the resolver's own threads first, because ``getaddrinfo`` blocks.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Callable

from backhaul.errors import TransportError
from backhaul.reactor import WRITE, Reactor, Timer
from backhaul.resolver import Address, Resolver

log = logging.getLogger("backhaul.net")

LISTEN_BACKLOG = 4096
KEEPALIVE_IDLE = 15  # seconds before the first probe, as the Go program's default
KEEPALIVE_COUNT = 9

# Created non-blocking in the same system call where the OS allows it (Linux).
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

# Linux answers a send on a connecting TCP socket with EAGAIN (or the connection's error);
# other systems may say ENOTCONN, which would read as a failure.
_SEND_TELLS_STATE = sys.platform.startswith("linux")

Dialed = Callable[[socket.socket | None, str], None]


def tune(sock: socket.socket, *, nodelay: bool, keepalive: int = 0, mss: int = 0,
         rcvbuf: int = 0, sndbuf: int = 0, congestion: str = "") -> None:
    """Apply the socket options of the config to a new socket; options the OS refuses are
    skipped. An option a new socket has already (Nagle on, the system's keepalive interval and
    count) is not set again: every connection pays for each system call. ``congestion``: the
    TCP congestion control to use instead of the host's ("" keeps the host's)."""
    if congestion:
        set_congestion(sock, congestion)
    try:
        if nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                interval, count = _system_keepalive()
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, min(KEEPALIVE_IDLE, keepalive))
                if keepalive != interval:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive)
                if count != KEEPALIVE_COUNT:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except OSError as exc:
        log.debug("socket option refused: %s", exc)


def set_congestion(sock: socket.socket, name: str) -> bool:
    """TCP_CONGESTION ``name`` on ``sock``; when the kernel refuses it, one warning per name for
    the whole process (every later socket is refused the same way) naming what the kernel has."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())
    except OSError as exc:
        if name not in _congestion_refused:
            _congestion_refused.add(name)
            log.warning("congestion = %r not applied, the host's is used: the kernel refused it (%s); "
                        "available: %s; allowed without CAP_NET_ADMIN: %s", name, reason(exc),
                        _kernel_list("tcp_available_congestion_control"),
                        _kernel_list("tcp_allowed_congestion_control"))
        return False
    return True


_congestion_refused: set[str] = set()


def _kernel_list(name: str) -> str:
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as file:
            return file.read().strip() or "none"
    except OSError:
        return "unknown"


@functools.cache
def _system_keepalive() -> tuple[int, int]:
    """The keepalive interval and probe count a new socket starts with (0, 0 when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_keepalive_intvl") as intvl, \
                open("/proc/sys/net/ipv4/tcp_keepalive_probes") as probes:
            return int(intvl.read()), int(probes.read())
    except (OSError, ValueError):
        return 0, 0


_LINGER_ZERO = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make the coming close of ``sock`` a reset (SO_LINGER 0): what is queued is dropped and the
    peer reads an error, never a clean end of what may be only part of the data."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass  # closed or broken already: its close cannot look clean either


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


def dial(reactor: Reactor, resolver: Resolver, host: str, port: int, timeout: float, done: Dialed,
         source: str = "") -> None:
    """Connect without blocking the reactor; ``done(sock, "")`` or ``done(None, reason)`` runs
    on the reactor thread exactly once, also when the process is out of descriptors. Numeric
    addresses connect at once; a host name is looked up by ``resolver`` first. ``source``: the
    local IP address to connect from ("" for the system's choice). Reactor thread only.

    The socket may come still watched by the reactor: ``done`` must watch it with a callback of
    its own, ``forget`` it, or close it with ``reactor.close_socket`` before returning."""
    if is_numeric(host):
        _dial_numeric(reactor, socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port), timeout, done,
                      source)
        return

    def resolved(result: Address | None, reason: str) -> None:
        if result is None:
            done(None, reason)
        else:
            _dial_numeric(reactor, result[0], result[1], timeout, done, source)

    resolver.lookup(host, port, timeout, resolved)


def bind_source(sock: socket.socket, source: str) -> None:
    """Make ``sock`` leave from the local address ``source`` (any port); OSError when the
    address is not this host's or not of the socket's family."""
    if source:
        sock.bind((source, 0))


def _dial_numeric(reactor: Reactor, family: int, addr: tuple[str, int], timeout: float, done: Dialed,
                  source: str = "") -> None:
    try:
        sock = socket.socket(family, _NONBLOCKING_STREAM)
    except OSError as exc:  # out of descriptors: the caller closes what it holds and says so
        done(None, f"cannot connect to {addr[0]}:{addr[1]}: {(exc.strerror or str(exc)).lower()}")
        return
    if _NONBLOCKING_STREAM == socket.SOCK_STREAM:
        sock.setblocking(False)
    try:
        bind_source(sock, source)
    except OSError as exc:
        sock.close()
        done(None, f"cannot connect to {addr[0]}:{addr[1]} from local_addr {source}: {reason(exc)}")
        return
    code = sock.connect_ex(addr)
    if code == errno.EINPROGRESS and _SEND_TELLS_STATE:
        code = _handshake_state(sock)
    if code == 0:
        done(sock, "")  # not watched: the caller's watch adds it
        return
    if code not in (errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        done(None, f"cannot connect to {addr[0]}:{addr[1]}: {_strerror(code)}")
        return
    timer: Timer | None = None

    def finished(_mask: int) -> None:
        if timer is not None:
            timer.cancel()
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            reactor.close_socket(sock)
            done(None, f"cannot connect to {addr[0]}:{addr[1]}: {_strerror(err)}")
        else:
            done(sock, "")  # still registered: the caller watches it anew (one system call, not two)

    def expired() -> None:
        reactor.close_socket(sock)
        done(None, f"cannot connect to {addr[0]}:{addr[1]}: timed out after {timeout:g} s")

    reactor.watch(sock, WRITE, finished)
    timer = reactor.call_later(timeout, expired)


def _handshake_state(sock: socket.socket) -> int:
    """0 when the connection is up already, its error when it failed, EINPROGRESS while its
    handshake is on the way. To a host of this machine (a service behind the client, a server on
    the same host) the handshake is over by the time ``connect`` returns; a send of nothing says
    so in one system call and spares the wait for WRITE, the SO_ERROR look and the change of the
    socket's events. On a real path it says EINPROGRESS and the dial waits as before."""
    try:
        sock.send(b"")
    except BlockingIOError:
        return errno.EINPROGRESS
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def reason(exc: OSError) -> str:
    """An OS error as a short lower-case phrase for a log line."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    return (exc.strerror or str(exc)).lower()


def _strerror(code: int) -> str:
    return os.strerror(code).lower()
