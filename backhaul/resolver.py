"""Name lookups on their own two threads, each bounded by a timeout.

``getaddrinfo`` blocks, sometimes for seconds: lookups never run on the workers that move bytes,
so a slow resolver delays only the connections that need a name, never a running relay.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable

from backhaul.errors import TransportError
from backhaul.reactor import Reactor

log = logging.getLogger("backhaul.resolver")

THREADS = 2
MAX_PENDING = 256

Address = tuple[int, tuple[str, int]]
Resolved = Callable[[Address | None, str], None]


def resolve(host: str, port: int) -> Address:
    """Blocking lookup: (family, address) of the first TCP result; TransportError names the host."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise TransportError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    return family, addr[:2]


class Resolver:
    """A bounded queue of lookups served by a few daemon threads; answers come back on the reactor.

    Daemon threads, not an executor: a lookup stuck in the system resolver must not hold up the
    exit of the program.
    """

    def __init__(self, reactor: Reactor, threads: int = THREADS, max_pending: int = MAX_PENDING) -> None:
        self.reactor = reactor
        self._queue: queue.Queue[tuple[str, int, _Answer]] = queue.Queue(max_pending)
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._serve, name="backhaul-resolver", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def lookup(self, host: str, port: int, timeout: float, done: Resolved) -> None:
        """``done(address, "")`` or ``done(None, reason)`` runs once on the reactor thread, within
        ``timeout`` seconds. Reactor thread only."""
        answer = _Answer(done)
        answer.timer = self.reactor.call_later(timeout, answer.give, None, f"lookup of {host} timed out "
                                               f"after {timeout:g} s")
        try:
            self._queue.put_nowait((host, port, answer))
        except queue.Full:
            answer.give(None, f"cannot resolve {host}: {MAX_PENDING} lookups already waiting")

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                host, port, answer = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if answer.given:
                continue  # timed out while it waited
            try:
                result: Address | None = resolve(host, port)
                reason = ""
            except TransportError as exc:
                result, reason = None, str(exc)
            self.reactor.call_soon(answer.give, result, reason)

    def close(self, timeout: float = 0.5) -> None:
        """Stop the threads; one stuck in the system resolver is left to finish on its own."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Answer:
    """One lookup's callback, given exactly once: by the resolver or by the timeout."""

    __slots__ = ("done", "given", "timer")

    def __init__(self, done: Resolved) -> None:
        self.done = done
        self.given = False
        self.timer = None

    def give(self, result: Address | None, reason: str) -> None:
        if self.given:
            return
        self.given = True
        if self.timer is not None:
            self.timer.cancel()
        done, self.done = self.done, None
        done(result, reason)
