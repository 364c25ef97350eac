"""The reactor: one thread owns the selector, every listening and every idle socket.

Other threads never touch the selector; they hand work in with ``call_soon`` (a bounded
deque plus one byte on a wake-up socketpair, as asyncio does). Timers live in a heap.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backhaul.pipes import PipePool

log = logging.getLogger("backhaul.reactor")

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
Callback = Callable[[int], None]


class Timer:
    """A call scheduled on the reactor thread; ``cancel`` before it runs and it never will."""

    __slots__ = ("when", "fn", "args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        # Drop the references now: a cancelled timer stays in the heap until its time comes,
        # and its closure may hold sockets and buffers.
        self.cancelled = True
        self.fn = _nothing
        self.args = ()


def _nothing(*_args: Any) -> None:
    return None


class Reactor:
    """Selector loop plus the bounded worker pool that does the bulk work it hands out, and
    the pipes the relays splice through.

    The pool's queue stays bounded because every submitter holds at most one task in flight
    per connection direction or pending handshake, and those are capped by configuration.
    """

    def __init__(self, workers: int = 8) -> None:
        self._selector = selectors.DefaultSelector()
        self._masks: dict[int, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._woken = False
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backhaul-worker")
        self.pipes = PipePool()
        self._selector.register(self._wake_r, READ, self._drain_wake)

    # --- called from any thread -------------------------------------------------------------
    def call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the reactor thread as soon as it wakes (from the reactor thread
        itself: after the events at hand, which batches work such as small writes)."""
        with self._lock:
            self._calls.append((fn, args))
            if self._woken or threading.current_thread() is self._thread:
                return
            self._woken = True
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # a byte is already waiting, or we are shutting down

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on a worker; errors are logged, never lost silently."""
        try:
            self.pool.submit(self._guarded, fn, args)
        except RuntimeError:
            log.debug("worker pool is shut down; dropped %s", getattr(fn, "__qualname__", fn))

    # --- reactor thread only ----------------------------------------------------------------
    def watch(self, sock: socket.socket | int, events: int, callback: Callback | None = None) -> None:
        """Set the events the reactor waits for on ``sock`` (0 removes it)."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        old = self._masks.get(fd, 0)
        if events == 0:
            if old:
                del self._masks[fd]
                self._selector.unregister(fd)
            return
        if old == 0:
            self._selector.register(fd, events, callback)
        else:
            current = self._selector.get_key(fd).data
            if old != events or (callback is not None and callback != current):
                self._selector.modify(fd, events, callback or current)
        self._masks[fd] = events

    def forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock``, however it is registered; safe if it is not."""
        fd = sock.fileno()
        if fd >= 0:
            self.watch(fd, 0)

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(time.monotonic() + delay, fn, args)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="backhaul-reactor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and the pool; callbacks already queued run first."""
        self._stopping = True
        self.call_soon(lambda: None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self.pipes.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        select = self._selector.select
        while not self._stopping:
            timeout = self._next_timeout()
            for key, mask in select(timeout):
                try:
                    key.data(mask)
                except Exception:  # a bug in one handler must not stop every tunnel
                    log.exception("error in event handler")
            self._run_timers()
            self._run_calls()
        self._run_calls()

    def _next_timeout(self) -> float | None:
        if self._calls:
            return 0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True
                self._guarded(timer.fn, timer.args)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, collections.deque()
            self._woken = False
        for fn, args in calls:
            self._guarded(fn, args)

    def _drain_wake(self, _mask: int) -> None:
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass

    @staticmethod
    def _guarded(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("error in %s", getattr(fn, "__qualname__", fn))
