"""The reactor: one thread owns the selector, every listening and every idle socket.

Other threads never touch the selector; they hand work in with ``call_soon`` (a bounded
deque plus one byte on a wake-up socketpair, as asyncio does). Timers live in a heap.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from backhaul.log import Throttle
from backhaul.pipes import PipePool

log = logging.getLogger("backhaul.reactor")

READ = 1
WRITE = 2
Callback = Callable[[int], None]

# epoll where the system has it (Linux); poll elsewhere. Same calls, same event bits.
_EPOLL = hasattr(select, "epoll")
_IN = select.EPOLLIN if _EPOLL else select.POLLIN
_OUT = select.EPOLLOUT if _EPOLL else select.POLLOUT
_ERR = (select.EPOLLERR | select.EPOLLHUP) if _EPOLL else (select.POLLERR | select.POLLHUP | select.POLLNVAL)
_TO_POLL = {READ: _IN, WRITE: _OUT, READ | WRITE: _IN | _OUT}


class Timer:
    """A call scheduled on the reactor thread; ``cancel`` before it runs and it never will."""

    __slots__ = ("when", "fn", "args", "cancelled", "heap")

    def __init__(self, when: float, fn: Callable[..., None], args: tuple[Any, ...],
                 heap: _TimerHeap | None = None) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False
        self.heap = heap

    def cancel(self) -> None:
        # Drop the references now: a cancelled timer stays in the heap until its time comes
        # (or the heap is swept), and its closure may hold sockets and buffers.
        if not self.cancelled and self.heap is not None:
            self.heap.cancelled += 1
        self.cancelled = True
        self.fn = _nothing
        self.args = ()


def _nothing(*_args: Any) -> None:
    return None


class _TimerHeap:
    """The reactor's timers by due time. Most are cancelled long before they are due (a dial's
    timeout, once it connected): when they are most of the heap, it is swept, so it holds about
    what is live, not every timeout of the last ``dial_timeout`` seconds."""

    __slots__ = ("entries", "cancelled", "_seq")

    def __init__(self) -> None:
        self.entries: list[tuple[float, int, Timer]] = []
        self.cancelled = 0
        self._seq = itertools.count()

    def push(self, timer: Timer) -> None:
        heapq.heappush(self.entries, (timer.when, next(self._seq), timer))
        if self.cancelled > 1024 and 2 * self.cancelled > len(self.entries):
            # In place: a caller may hold the list (the reactor, while it runs due timers).
            self.entries[:] = [entry for entry in self.entries if not entry[2].cancelled]
            heapq.heapify(self.entries)
            self.cancelled = 0


class Reactor:
    """Selector loop plus the bounded worker pool that does the bulk work it hands out, and
    the pipes the relays splice through.

    The pool's queue stays bounded because every submitter holds at most one task in flight
    per connection direction or pending handshake, and those are capped by configuration.
    """

    def __init__(self, workers: int = 8) -> None:
        self._poller = select.epoll() if _EPOLL else select.poll()
        self._masks: dict[int, int] = {}
        self._callbacks: dict[int, Callback] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._calls: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._woken = False
        self._lock = threading.Lock()
        self._heap = _TimerHeap()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="backhaul-worker")
        self._busy = 0               # tasks submitted and not finished
        self._busy_lock = threading.Condition()
        self._pool_closed = False
        self.pipes = PipePool()
        self.watch(self._wake_r, READ, self._drain_wake)
        self._handler_errors = Throttle(log)

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

    def submit(self, fn: Callable[..., None], *args: Any) -> bool:
        """Run ``fn(*args)`` on a worker; errors are logged, never lost silently. False when the
        pool is shut down: the caller must then finish what it holds itself."""
        with self._busy_lock:
            if self._pool_closed:
                return False
            self._busy += 1
        self.pool.submit(self._run_task, fn, args)
        return True

    def _run_task(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            self._guarded(fn, args)
        finally:
            with self._busy_lock:
                self._busy -= 1
                if not self._busy:
                    self._busy_lock.notify_all()

    # --- reactor thread only ----------------------------------------------------------------
    def watch(self, sock: socket.socket | int, events: int, callback: Callback | None = None) -> None:
        """Set the events the reactor waits for on ``sock`` (0 removes it); ``callback`` replaces
        the one it had when given."""
        fd = sock if isinstance(sock, int) else sock.fileno()
        old = self._masks.get(fd, 0)
        if callback is not None:
            self._callbacks[fd] = callback
        if events == old:
            return
        if events == 0:
            del self._masks[fd]
            self._callbacks.pop(fd, None)
            self._poller.unregister(fd)
            return
        if old == 0:
            self._poller.register(fd, _TO_POLL[events])
        else:
            self._poller.modify(fd, _TO_POLL[events])
        self._masks[fd] = events

    def watched(self, sock: socket.socket) -> int:
        """The events the reactor waits for on ``sock`` now (0: not watched)."""
        return self._masks.get(sock.fileno(), 0)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching ``sock``, however it is registered; safe if it is not."""
        fd = sock.fileno()
        if fd >= 0:
            self.watch(fd, 0)

    def close_socket(self, sock: socket.socket) -> None:
        """Close ``sock`` and stop watching it. With epoll the close itself takes it out of the
        set (we never duplicate a socket's descriptor), which saves a system call per socket."""
        fd = sock.fileno()
        if fd >= 0 and self._masks.pop(fd, 0):
            self._callbacks.pop(fd, None)
            if not _EPOLL:
                self._poller.unregister(fd)
        sock.close()

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> Timer:
        timer = Timer(time.monotonic() + delay, fn, args, self._heap)
        self._heap.push(timer)
        return timer

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="backhaul-reactor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop, then the pool: tasks already queued still run (a relay's worker that
        sees its sockets shut down returns at once), and what they hand back to the reactor runs
        here, so every relay gets to close its sockets. Later submits are refused."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        self.call_soon(_nothing)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with self._busy_lock:
            self._pool_closed = True
            while self._busy and time.monotonic() < deadline:
                self._busy_lock.wait(max(0.0, deadline - time.monotonic()))
        self.pool.shutdown(wait=False)
        if self._thread is None or not self._thread.is_alive():
            self._run_calls()

    def close(self) -> None:
        """Release the selector and the pipes; after ``stop``, when no worker splices any more."""
        self.pipes.close()
        if _EPOLL:
            self._poller.close()
        self._wake_r.close()
        self._wake_w.close()

    def _run(self) -> None:
        poll = self._poller.poll
        masks, callbacks = self._masks, self._callbacks
        scale = 1.0 if _EPOLL else 1000.0   # epoll takes seconds, poll milliseconds
        while not self._stopping:
            timeout = self._next_timeout()
            for fd, happened in poll(-1 if timeout is None else timeout * scale):
                wanted = masks.get(fd, 0)   # an earlier handler of this round may have dropped it
                if not wanted:
                    continue
                mask = 0
                if happened & (_IN | _ERR):
                    mask |= READ
                if happened & (_OUT | _ERR):
                    mask |= WRITE
                mask &= wanted
                if not mask:
                    continue
                try:
                    callbacks[fd](mask)
                except Exception:  # a bug in one handler must not stop every tunnel...
                    if self._handler_errors.allow() is not None:
                        log.exception("error in event handler; no longer watching fd %d", fd)
                    if fd in masks:
                        self.watch(fd, 0)  # ...nor spin on a socket that stays ready
            self._run_timers()
            self._run_calls()
        self._run_calls()

    def _next_timeout(self) -> float | None:
        if self._calls:
            return 0
        heap = self._heap
        timers = heap.entries
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
            heap.cancelled -= 1
        if not timers:
            return None
        return max(0.0, timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        timers = self._heap.entries
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                self._heap.cancelled -= 1
            else:
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
