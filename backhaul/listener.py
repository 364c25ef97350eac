"""A listening socket on the reactor: accepts in batches, and pauses when file descriptors run out.

Every listener of the program (public ports, the tunnel port) goes through here, so running out
of descriptors costs one log line a second and no busy loop, wherever it happens.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable

from backhaul.log import Throttle
from backhaul.reactor import READ, Reactor, Timer

log = logging.getLogger("backhaul.listener")

ACCEPT_BATCH = 64     # accepts per readiness event, so one busy port cannot starve the others
PAUSE = 0.25          # seconds a listener rests after the process ran out of descriptors
_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)

OnAccept = Callable[[socket.socket, tuple], None]


class Listener:
    """Accepts on ``sock`` until EAGAIN and hands each connection to ``on_accept``; reactor thread."""

    __slots__ = ("reactor", "sock", "name", "on_accept", "_timer", "_throttle", "paused", "_family")

    def __init__(self, reactor: Reactor, sock: socket.socket, name: str, on_accept: OnAccept) -> None:
        self.reactor = reactor
        self.sock = sock
        self.name = name
        self.on_accept = on_accept
        self._timer: Timer | None = None
        self._throttle = Throttle(log)
        self.paused = 0   # how many times accepting had to pause (metric-ready)
        self._family = int(sock.family)

    def start(self) -> None:
        self.reactor.watch(self.sock, READ, self._ready)

    def _ready(self, _mask: int) -> None:
        # socket.accept() as the socket module writes it, less what it looks up on every call
        # (the listener's family and type, each converted to an enum): a few percent of a
        # tunneled connection's cost on the server.
        accept = self.sock._accept  # type: ignore[attr-defined]
        family = self._family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                else:
                    self._throttle.warning("accept on %s failed: %s", self.name, exc.strerror or exc)
                return
            try:
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except OSError:
                os.close(fd)  # could not be wrapped: dropped rather than leaked
                continue
            try:
                self.on_accept(conn, addr)
            except Exception:  # a bug in one connection's handling must not stop the port
                conn.close()
                if self._throttle.allow() is not None:
                    log.exception("error while taking a connection on %s; closed it", self.name)

    def _pause(self, exc: OSError) -> None:
        """The connection stays in the kernel's backlog; try again shortly instead of spinning."""
        self.paused += 1
        self._throttle.warning("accepting on %s paused: %s; retrying every %g s", self.name,
                               (exc.strerror or str(exc)).lower(), PAUSE)
        self.reactor.watch(self.sock, 0)
        self._timer = self.reactor.call_later(PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if self.sock.fileno() >= 0:
            self.start()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.reactor.close_socket(self.sock)
