"""A tiny HTTP/1.1 server on the reactor, for the status page and the metrics: GET and HEAD only,
one request per connection, answered from memory.

Bounded so that scrapers cost no threads and little else: a request head of at most 8 KiB within
5 s, at most 32 connections at once (the oldest makes room), answers written without blocking.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus

from backhaul.listener import Listener
from backhaul.net import listen
from backhaul.reactor import READ, WRITE, Reactor, Timer

log = logging.getLogger("backhaul.web")

MAX_HEAD = 8192
DEADLINE = 5.0
MAX_CONNECTIONS = 32

# A handler gets the query string and returns (status, content type, body).
Answer = tuple[int, str, bytes]
Handler = Callable[[str], Answer]


class _Conn:
    __slots__ = ("sock", "head", "out", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()
        self.out = memoryview(b"")
        self.timer: Timer | None = None


class WebServer:
    """Serves ``routes`` (path -> handler) on one address; reactor thread after ``open``."""

    def __init__(self, reactor: Reactor, host: str, port: int, routes: dict[str, Handler]) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.routes = routes
        self.listener: Listener | None = None
        self.conns: OrderedDict[socket.socket, _Conn] = OrderedDict()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def open(self) -> None:
        """Bind; TransportError names the address when it cannot."""
        sock = listen(self.host, self.port)
        self.listener = Listener(self.reactor, sock, f"the status page {self.address}", self._accepted)

    def start(self) -> None:
        assert self.listener is not None
        self.listener.start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for conn in list(self.conns.values()):
            self._close(conn)

    def _accepted(self, sock: socket.socket, _addr: tuple) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            self._close(next(iter(self.conns.values())))
        sock.setblocking(False)
        conn = self.conns[sock] = _Conn(sock)
        conn.timer = self.reactor.call_later(DEADLINE, self._close, conn)
        self.reactor.watch(sock, READ, lambda _m: self._readable(conn))

    def _readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1 - len(conn.head))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.head) > MAX_HEAD:
                self._send(conn, *_plain(431, "request head too large"), head_only=False)
            return
        self._send(conn, *self._answer(bytes(conn.head[:end])), head_only=conn.head.startswith(b"HEAD "))

    def _answer(self, head: bytes) -> Answer:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _plain(400, "bad request line")
        method, target, _version = parts
        if method not in ("GET", "HEAD"):
            return _plain(405, "only GET and HEAD")
        path, _, query = target.partition("?")
        handler = self.routes.get(path)
        if handler is None:
            return _plain(404, "not found")
        try:
            return handler(query)
        except Exception:
            log.exception("status page handler for %s failed", path)
            return _plain(500, "internal error")

    def _send(self, conn: _Conn, status: int, content_type: str, body: bytes, *, head_only: bool) -> None:
        reason = HTTPStatus(status).phrase
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n"
                f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}\r\n\r\n").encode("latin-1")
        conn.out = memoryview(head if head_only else head + body)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                conn.out = conn.out[sent:]
        except BlockingIOError:
            self.reactor.watch(conn.sock, WRITE, lambda _m: self._write(conn))
            return
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock, None) is None:
            return
        if conn.timer is not None:
            conn.timer.cancel()
        try:
            # Unread bytes would turn the close into a reset that can drop our answer (431).
            for _ in range(4):
                if not conn.sock.recv(65536):
                    break
        except OSError:
            pass
        self.reactor.close_socket(conn.sock)


def _plain(status: int, text: str) -> Answer:
    return status, "text/plain; charset=utf-8", (text + "\n").encode()
