"""A TCP forwarder on loopback whose faults a test switches on and off: it sits between a tunnel
client and its server (or a user and a public port) and can delay, throttle, jitter, cut (FIN or
RST) and black-hole what crosses it.

One thread and one selector carry every connection; the test's calls reach that thread through a
queue. Standard library only, so the benchmarks use it too.

- ``delay(seconds, jitter)``: every chunk is held ``seconds`` plus a random part of ``jitter``.
  Order within a connection is kept (TCP's); chunks of different connections overtake each other,
  so a link's bytes may arrive before the control channel's that announced it.
- ``throttle(rate)``: each direction of each connection at most ``rate`` bytes a second.
- ``cut(rst=...)``: every connection is closed on both sides (FIN, or RST), and new ones are
  closed as they come until ``heal``: a network cut.
- ``blackhole()``: nothing moves, nothing is closed: bytes wait in the kernel's buffers (the
  senders' TCP retransmits them once the path is back), new connections are accepted and held
  without reaching the server. At ``heal`` everything moves on; a held connection whose client
  gave up meanwhile is dropped without reaching the server (its SYN never got through).

Every queue is bounded: a direction stops reading its source while ``max_buffer`` bytes wait.
With ``record`` the first that many bytes of each direction are kept (``Direction.seen``), so a
test can read what crossed the wire.

With ``udp`` it also forwards UDP datagrams on the same port number (the udp transport's links
go to the port of its control channel): one upstream socket per client address, at most
``MAX_UDP_PEERS``. A cut or a black hole drops every datagram until ``heal`` (UDP has nothing
to close, and a black hole's datagrams are as lost as a cut's); delay and throttle leave
datagrams alone. With ``record`` the first ``UDP_RECORD`` datagrams up are kept (``udp_seen``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from tests import contention

HOST = "127.0.0.1"
CHUNK = 64 * 1024
HISTORY = 10_000             # closed connections remembered in ``pairs`` (for tests that look back)
MAX_UDP_PEERS = 4096         # client addresses with an upstream UDP socket at once
UDP_RECORD = 10_000          # datagrams up kept when recording
_RESET = struct.pack("ii", 1, 0)


def reset(sock: socket.socket) -> None:
    """Close ``sock`` with a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    sock.close()


class Direction:
    """Bytes read from ``src`` waiting to be written to ``dst``, each with the time it is due."""

    __slots__ = ("src", "dst", "queue", "queued", "eof", "shut", "last_due", "free_at", "moved", "blocked", "seen")

    def __init__(self, src: socket.socket, dst: socket.socket | None) -> None:
        self.seen = bytearray()  # the first bytes read, when the proxy records
        self.src = src
        self.dst = dst
        self.queue: collections.deque[list] = collections.deque()   # [due, memoryview]
        self.queued = 0
        self.eof = False        # src ended: shut dst's write side once the queue is empty
        self.shut = False
        self.last_due = 0.0     # chunks keep their order whatever their delay
        self.free_at = 0.0      # throttle: when the link is free for the next chunk
        self.moved = 0          # bytes written to dst
        self.blocked = False    # dst refused a write: wait for it to become writable

    def due(self) -> float | None:
        """When the next chunk may go (None: nothing to send, or dst is full)."""
        return self.queue[0][0] if self.queue and not self.blocked else None


class Pair:
    """One proxied connection: ``down`` from the client, ``up`` to the server (None while held)."""

    __slots__ = ("down", "up", "to_up", "to_down", "closed", "held", "opened")

    def __init__(self, down: socket.socket) -> None:
        self.down = down
        self.up: socket.socket | None = None
        self.to_up = Direction(down, None)
        self.to_down: Direction | None = None
        self.closed = False
        self.held = False       # accepted during a black hole: not connected upstream yet
        self.opened = time.monotonic()

    def directions(self) -> list[Direction]:
        return [self.to_up] if self.to_down is None else [self.to_up, self.to_down]

    def moved(self) -> tuple[int, int]:
        """Bytes forwarded (client to server, server to client)."""
        return self.to_up.moved, self.to_down.moved if self.to_down else 0


def _listen(host: str, udp: bool) -> tuple[socket.socket, socket.socket | None]:
    """A TCP listener on a free port, and with ``udp`` a UDP socket on the same port number."""
    for _ in range(50):
        listener = socket.create_server((host, 0), backlog=4096)
        if not udp:
            return listener, None
        datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            datagrams.bind((host, listener.getsockname()[1]))
        except OSError:   # the UDP port of that number is taken: another one
            datagrams.close()
            listener.close()
            continue
        datagrams.setblocking(False)
        return listener, datagrams
    raise OSError("no port free for both TCP and UDP")


class FaultProxy:
    """Forwards connections from ``port`` to ``upstream_host:upstream_port``; see the module text."""

    def __init__(self, upstream_port: int, upstream_host: str = HOST, listen_host: str = HOST,
                 max_buffer: int = 1 << 20, seed: int = 0, record: int = 0, history: int = HISTORY,
                 udp: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.record = record
        self.history = history
        self.max_buffer = max_buffer
        self.rng = random.Random(seed)
        self.listener, self.udp = _listen(listen_host, udp)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self._udp_up: dict[tuple, socket.socket] = {}     # client address -> its upstream socket
        self._udp_down: dict[socket.socket, tuple] = {}
        self.udp_seen: list[bytes] = []      # datagrams up, when recording
        self.udp_moved = [0, 0]              # datagrams forwarded up, down
        self.udp_dropped = 0                 # datagrams dropped by a cut or a black hole
        self.pairs: list[Pair] = []          # connections in arrival order (closed ones forgotten past HISTORY)
        self._active: dict[Pair, None] = {}  # the open ones
        self.accepted = 0
        self.refused = 0                     # connections closed at once during a cut
        self._delay = 0.0
        self._jitter = 0.0
        self._rate = 0                       # bytes a second per direction; 0: unlimited
        self._mode = "open"                  # open | cut | blackhole
        self._cut_rst = False
        self._sel = selectors.DefaultSelector()
        self._masks: dict[socket.socket, int] = {}
        self._owner: dict[socket.socket, Pair] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._calls: collections.deque[tuple[Callable[..., None], tuple, threading.Event]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping = False
        self.error: BaseException | None = None
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        if self.udp is not None:
            self._sel.register(self.udp, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # --- the test's side ----------------------------------------------------------------------
    def _call(self, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn`` on the proxy's thread and wait until it ran."""
        done = threading.Event()
        self._calls.append((fn, args, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if not done.wait(10):
            raise RuntimeError(f"the fault proxy did not run {fn.__name__} within 10 s: {self.error!r}")

    def delay(self, seconds: float, jitter: float = 0.0) -> None:
        """Hold every chunk ``seconds`` plus a random part of ``jitter`` (0, 0: no delay)."""
        self._call(self._set_delay, seconds, jitter)

    def throttle(self, rate: int) -> None:
        """At most ``rate`` bytes a second per direction of each connection (0: unlimited)."""
        self._call(self._set_rate, rate)

    def cut(self, rst: bool = False, index: int | None = None) -> None:
        """Close connection ``index`` (in arrival order), or every connection and every new one
        until ``heal``; with ``rst`` as a reset."""
        self._call(self._cut, rst, index)

    def blackhole(self) -> None:
        """Stop moving anything, closing nothing, until ``heal``."""
        self._call(self._set_mode, "blackhole", False)

    def heal(self) -> None:
        """End a cut or a black hole."""
        self._call(self._set_mode, "open", False)

    def live(self) -> list[Pair]:
        return list(self._active)

    def close(self) -> None:
        """Stop the thread and close every socket."""
        if self._stopping:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._stop)
        self._thread.join(10)
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the proxy's thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = self._next_timeout()
                for key, mask in self._sel.select(timeout):
                    sock = key.fileobj
                    if sock is self.listener:
                        self._accept()
                    elif sock is self.udp:
                        self._udp_from_client()
                    elif sock in self._udp_down:
                        self._udp_from_server(sock)  # type: ignore[arg-type]
                    elif sock is self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(4096)
                    else:
                        pair = self._owner.get(sock)  # type: ignore[arg-type]
                        if pair is not None and not pair.closed:
                            self._event(pair, sock, mask)  # type: ignore[arg-type]
                self._run_calls()
                self._run_timers()
                self._pump_all()
        except BaseException as exc:  # the test's next call reports it
            self.error = exc
            raise
        finally:
            for pair in list(self._active):
                self._close_pair(pair, rst=False)
            self.listener.close()
            for up in self._udp_down:
                up.close()
            if self.udp is not None:
                self.udp.close()

    def _next_timeout(self) -> float | None:
        if self._calls:
            return 0
        when = [t[0] for t in self._timers[:1]]
        if self._mode != "blackhole":
            when += [d for pair in self._active for d in
                     (direction.due() for direction in pair.directions()) if d is not None]
        if not when:
            return None
        return max(0.0, min(when) - time.monotonic())

    def _run_calls(self) -> None:
        while self._calls:
            fn, args, done = self._calls.popleft()
            try:
                fn(*args)
            finally:
                done.set()

    def _later(self, delay: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._seq, fn))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()

    def _stop(self) -> None:
        self._stopping = True

    def _set_delay(self, seconds: float, jitter: float) -> None:
        self._delay, self._jitter = seconds, jitter

    def _set_rate(self, rate: int) -> None:
        self._rate = rate

    def _set_mode(self, mode: str, rst: bool) -> None:
        self._mode, self._cut_rst = mode, rst
        if mode == "open":
            for pair in list(self._active):
                if pair.held:
                    self._release(pair)
        self._update_all()

    def _cut(self, rst: bool, index: int | None) -> None:
        if index is not None:
            self._close_pair(self.pairs[index], rst)
            return
        for pair in list(self._active):
            self._close_pair(pair, rst)
        self._set_mode("cut", rst)

    # --- datagrams ------------------------------------------------------------------------------
    def _udp_from_client(self) -> None:
        assert self.udp is not None
        for _ in range(256):
            try:
                data, addr = self.udp.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue   # an ICMP error from an earlier send
            if self._mode != "open":
                self.udp_dropped += 1
                continue
            if self.record and len(self.udp_seen) < UDP_RECORD:
                self.udp_seen.append(data)
            up = self._udp_up.get(addr)
            if up is None:
                if len(self._udp_up) >= MAX_UDP_PEERS:
                    self.udp_dropped += 1
                    continue
                up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                up.setblocking(False)
                up.connect(self.upstream)
                self._udp_up[addr] = up
                self._udp_down[up] = addr
                self._sel.register(up, selectors.EVENT_READ, None)
            with contextlib.suppress(OSError):
                up.send(data)
                self.udp_moved[0] += 1

    def _udp_from_server(self, up: socket.socket) -> None:
        assert self.udp is not None
        for _ in range(256):
            try:
                data = up.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue   # the server's port was closed for a moment (a restart)
            if self._mode != "open":
                self.udp_dropped += 1
                continue
            with contextlib.suppress(OSError):
                self.udp.sendto(data, self._udp_down[up])
                self.udp_moved[1] += 1

    # --- connections ----------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                down, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    return
                raise
            self.accepted += 1
            if self._mode == "cut":
                self.refused += 1
                if self._cut_rst:
                    reset(down)
                else:
                    down.close()
                continue
            down.setblocking(False)
            down.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = Pair(down)
            if len(self.pairs) >= self.history:
                self.pairs = [p for p in self.pairs if not p.closed]
            self.pairs.append(pair)
            self._active[pair] = None
            self._owner[down] = pair
            if self._mode == "blackhole":
                pair.held = True
                self._update(pair)
            else:
                self._connect(pair)

    def _release(self, pair: Pair) -> None:
        """The black hole ended: a held connection whose client is still there goes upstream."""
        pair.held = False
        gone = False
        try:
            while True:
                data = pair.down.recv(CHUNK)
                if not data:
                    gone = True
                    break
                self._queue(pair.to_up, data)
        except BlockingIOError:
            pass
        except OSError:
            gone = True
        if gone:  # never reached the server in the first place
            self._close_pair(pair, rst=False)
            return
        self._connect(pair)

    def _connect(self, pair: Pair) -> None:
        try:
            up = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            self._close_pair(pair, rst=True)  # as a refused connection looks to the client
            return
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair.up = up
        pair.to_up.dst = up
        pair.to_down = Direction(up, pair.down)
        self._owner[up] = pair
        self._update(pair)

    def _close_pair(self, pair: Pair, rst: bool) -> None:
        if pair.closed:
            return
        pair.closed = True
        self._active.pop(pair, None)
        for sock in (pair.down, pair.up):
            if sock is None:
                continue
            if self._masks.pop(sock, 0):
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(sock)
            self._owner.pop(sock, None)
            if rst:
                reset(sock)
            else:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for direction in pair.directions():
            direction.queue.clear()
            direction.queued = 0

    # --- moving bytes ---------------------------------------------------------------------------
    def _event(self, pair: Pair, sock: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            for direction in pair.directions():
                if direction.dst is sock:
                    direction.blocked = False
                    self._pump(pair, direction)
        if mask & selectors.EVENT_READ and not pair.closed:
            for direction in pair.directions():
                if direction.src is sock and direction.dst is not None:
                    self._read(pair, direction)
        self._update(pair)

    def _read(self, pair: Pair, direction: Direction) -> None:
        if self._mode == "blackhole" or direction.eof or direction.queued >= self.max_buffer:
            return
        size = CHUNK if not self._rate else max(1, min(CHUNK, self._rate // 20))
        try:
            data = direction.src.recv(size)
        except BlockingIOError:
            return
        except OSError:
            self._close_pair(pair, rst=True)  # a reset crosses as a reset
            return
        if not data:
            direction.eof = True
            return
        self._queue(direction, data)

    def _queue(self, direction: Direction, data: bytes) -> None:
        if len(direction.seen) < self.record:
            direction.seen += data[:self.record - len(direction.seen)]
        now = time.monotonic()
        due = now + self._delay + (self.rng.uniform(0, self._jitter) if self._jitter else 0.0) + contention.stall(self.rng)
        if self._rate:
            due = max(due, direction.free_at)
            direction.free_at = due + len(data) / self._rate
        due = max(due, direction.last_due)
        direction.last_due = due
        direction.queue.append([due, memoryview(data)])
        direction.queued += len(data)

    def _pump_all(self) -> None:
        if self._mode == "blackhole":
            return
        for pair in list(self._active):
            for direction in pair.directions():
                if not direction.blocked and (direction.queue or (direction.eof and not direction.shut)):
                    self._pump(pair, direction)
            if not pair.closed:
                self._update(pair)

    def _pump(self, pair: Pair, direction: Direction) -> None:
        """Write the chunks that are due; shut the destination's write side after the source's EOF."""
        if self._mode == "blackhole" or direction.dst is None:
            return
        now = time.monotonic()
        try:
            while direction.queue and direction.queue[0][0] <= now:
                chunk = direction.queue[0]
                sent = direction.dst.send(chunk[1])
                direction.moved += sent
                direction.queued -= sent
                if sent < len(chunk[1]):
                    chunk[1] = chunk[1][sent:]
                    direction.blocked = True
                    return
                direction.queue.popleft()
            if direction.eof and not direction.queue and not direction.shut:
                direction.shut = True
                direction.dst.shutdown(socket.SHUT_WR)
        except BlockingIOError:
            direction.blocked = True
            return
        except OSError:
            self._close_pair(pair, rst=True)
            return
        if all(d.shut for d in pair.directions()) and pair.to_down is not None:
            self._close_pair(pair, rst=False)

    def _update_all(self) -> None:
        for pair in list(self._active):
            self._update(pair)

    def _update(self, pair: Pair) -> None:
        """Watch each socket for what it needs: reading while its direction has room, writing
        while a chunk is due and the socket refused it."""
        if pair.closed:
            return
        flowing = self._mode != "blackhole" and not pair.held
        for sock in (pair.down, pair.up):
            if sock is None:
                continue
            mask = 0
            for direction in pair.directions():
                if (direction.src is sock and flowing and direction.dst is not None and not direction.eof
                        and direction.queued < self.max_buffer):
                    mask |= selectors.EVENT_READ
                if direction.dst is sock and flowing and direction.blocked:
                    mask |= selectors.EVENT_WRITE
            old = self._masks.get(sock, 0)
            if mask == old:
                continue
            if not mask:
                self._sel.unregister(sock)
                del self._masks[sock]
            elif not old:
                self._sel.register(sock, mask, None)
                self._masks[sock] = mask
            else:
                self._sel.modify(sock, mask, None)
                self._masks[sock] = mask
