"""Load generators of the benchmark, each run as its own process.

    python clients.py send PORT --streams N --seconds S
        bulk sender: each stream does sendall of a 1 MiB memoryview until time is up
    python clients.py rate PORT --concurrency C --seconds S --start-at T
        new connections: connect, send one request, read the reply, close; C at a time
    python clients.py hold PORT --count N --rate R --inflight K
        opens N connections, each echoed one byte, holds them until told to close

Results go to stdout as `RESULT <json>` lines (see each function). The 1-byte
ping-pong client is small enough to run inside the driver (ping_pong below).
"""

import argparse
import errno
import os
import selectors
import socket
import sys
import threading
import time
from collections import Counter

from common import HOST, announce, raise_nofile_limit

SEND_CHUNK = 1 << 20
REQUEST = b"GET\n"  # what services.reqrep expects
REPLY = b"OK\n"
CONNECT_TIMEOUT = 5.0  # per connection, in the rate and hold generators
HOLD_STALL = 30.0  # give up opening if no connection pairs for this long


# ---------------------------------------------------------------- bulk sender


def run_send(port: int, streams: int, seconds: float) -> dict[str, object]:
    """Send for `seconds` on `streams` connections; return bytes sent and errors."""
    payload = memoryview(bytearray(SEND_CHUNK))
    socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(streams)]
    sent = [0] * streams
    errors: list[str] = []
    deadline = time.monotonic() + seconds

    def stream(i: int) -> None:
        sock = socks[i]
        # Bounded: a stalled path fails the stream instead of hanging the run.
        sock.settimeout(30)
        try:
            while time.monotonic() < deadline:
                sock.sendall(payload)
                sent[i] += SEND_CHUNK
        except OSError as exc:
            errors.append(f"stream {i}: {exc!r}")
        finally:
            sock.close()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 40)
    return {"sent": sum(sent), "errors": errors}


# ------------------------------------------------------ new connections/second


class _RateConn:
    __slots__ = ("sock", "started", "reply")

    def __init__(self, sock: socket.socket, started: float) -> None:
        self.sock = sock
        self.started = started
        self.reply = b""


class RateGenerator:
    """Keeps `concurrency` request/reply connections in flight on one selector."""

    def __init__(self, port: int, concurrency: int, host: str = HOST) -> None:
        self.addr = (host, port)
        self.concurrency = concurrency
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _RateConn] = {}
        self.ok = 0
        self.failed: Counter[str] = Counter()

    def run(self, seconds: float, start_at: float) -> dict[str, object]:
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        end = t0 + seconds
        next_sweep = t0 + 0.25
        while (now := time.monotonic()) < end:
            self._fill(now)
            for key, mask in self.sel.select(timeout=0.05):
                self._event(key.data, mask)
            if now >= next_sweep:
                self._expire(now)
                next_sweep = now + 0.25
        unfinished = len(self.conns)
        for conn in list(self.conns.values()):
            self._drop(conn)
        return {"ok": self.ok, "failed": dict(self.failed), "unfinished": unfinished, "seconds": time.monotonic() - t0}

    def _fill(self, now: float) -> None:
        # At most `concurrency` opens per pass, so instant failures cannot spin forever here.
        for _ in range(self.concurrency - len(self.conns)):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self.failed[errno.errorcode.get(err, str(err))] += 1
                continue
            conn = _RateConn(sock, now)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_WRITE, conn)

    def _event(self, conn: _RateConn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._connected(conn)
            else:
                self._readable(conn)
        except ConnectionResetError:
            self._fail(conn, "reset")
        except OSError as exc:
            self._fail(conn, errno.errorcode.get(exc.errno or 0, "oserror"))

    def _connected(self, conn: _RateConn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(conn, errno.errorcode.get(err, str(err)))
            return
        conn.sock.send(REQUEST)  # a few bytes always fit an empty send buffer
        self.sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: _RateConn) -> None:
        data = conn.sock.recv(64)
        if not data:
            self._fail(conn, "eof")
            return
        conn.reply += data
        if len(conn.reply) >= len(REPLY):
            self.ok += 1
            self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if now - c.started > CONNECT_TIMEOUT]:
            self._fail(conn, "timeout")

    def _fail(self, conn: _RateConn, why: str) -> None:
        self.failed[why] += 1
        self._drop(conn)

    def _drop(self, conn: _RateConn) -> None:
        del self.conns[conn.sock.fileno()]
        self.sel.unregister(conn.sock)
        conn.sock.close()


# ------------------------------------------------------- idle connection holder


class Holder:
    """Opens connections at a bounded rate and in-flight count, pairs each with a 1-byte echo, holds them."""

    def __init__(self, port: int, count: int, rate: float, inflight: int) -> None:
        self.addr = (HOST, port)
        self.count, self.rate, self.inflight = count, rate, inflight
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, tuple[socket.socket, float]] = {}
        self.held: dict[int, socket.socket] = {}
        self.attempts = 0
        self.dropped = 0
        self.failed: Counter[str] = Counter()

    def status(self) -> dict[str, object]:
        return {
            "paired": len(self.held),
            "pending": len(self.pending),
            "attempts": self.attempts,
            "dropped": self.dropped,
            "failed": dict(self.failed),
        }

    def open_all(self, deadline_s: float) -> bool:
        """Open until `count` are paired; False on deadline, stall or too many attempts."""
        t0 = last_progress = next_report = time.monotonic()
        paired_before = 0
        while len(self.held) < self.count:
            now = time.monotonic()
            if len(self.held) != paired_before:
                paired_before, last_progress = len(self.held), now
            if now - t0 > deadline_s or now - last_progress > HOLD_STALL:
                return False
            if self.attempts >= 2 * self.count and not self.pending:
                return False
            self._open_some(now - t0)
            for key, mask in self.sel.select(timeout=0.02):
                self._event(key.fileobj, key.data, mask)  # type: ignore[arg-type]
            self._expire(now)
            if now >= next_report:
                announce("PROGRESS", self.status())
                next_report = now + 1.0
        return True

    def _open_some(self, elapsed: float) -> None:
        budget = min(int(self.rate * elapsed) + 1, 2 * self.count) - self.attempts
        room = min(self.inflight - len(self.pending), self.count - len(self.held) - len(self.pending))
        for _ in range(max(0, min(budget, room))):
            self.attempts += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self.failed[errno.errorcode.get(err, str(err))] += 1
                continue
            self.pending[sock.fileno()] = (sock, time.monotonic())
            self.sel.register(sock, selectors.EVENT_WRITE, "connect")

    def _event(self, sock: socket.socket, phase: str, mask: int) -> None:
        try:
            if phase == "connect":
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(sock, errno.errorcode.get(err, str(err)))
                    return
                sock.send(b"x")
                self.sel.modify(sock, selectors.EVENT_READ, "echo")
            elif phase == "echo":
                data = sock.recv(16)
                if data != b"x":
                    self._fail(sock, "eof" if not data else "bad-echo")
                    return
                del self.pending[sock.fileno()]
                self.held[sock.fileno()] = sock
                self.sel.modify(sock, selectors.EVENT_READ, "held")
            else:
                # A held connection became readable: the path closed it on us.
                sock.recv(16)
                self._drop_held(sock)
        except OSError as exc:
            if phase == "held":
                self._drop_held(sock)
            else:
                self._fail(sock, errno.errorcode.get(exc.errno or 0, "oserror"))

    def _expire(self, now: float) -> None:
        for sock, started in list(self.pending.values()):
            if now - started > CONNECT_TIMEOUT:
                self._fail(sock, "timeout")

    def _fail(self, sock: socket.socket, why: str) -> None:
        self.failed[why] += 1
        del self.pending[sock.fileno()]
        self.sel.unregister(sock)
        sock.close()

    def _drop_held(self, sock: socket.socket) -> None:
        self.dropped += 1
        del self.held[sock.fileno()]
        self.sel.unregister(sock)
        sock.close()

    def serve_commands(self, max_seconds: float) -> None:
        """Hold until told: `status` reports, `close` (or EOF) closes everything and exits."""
        for sock, _started in list(self.pending.values()):
            self._fail(sock, "abandoned")
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
        end = time.monotonic() + max_seconds
        pending_input = b""
        while time.monotonic() < end:
            for key, mask in self.sel.select(timeout=0.5):
                if key.data != "stdin":
                    self._event(key.fileobj, key.data, mask)  # type: ignore[arg-type]
                    continue
                chunk = os.read(sys.stdin.fileno(), 4096)
                pending_input += chunk
                if not chunk or b"close" in pending_input:
                    self.close_all()
                    return
                if b"status" in pending_input:
                    pending_input = b""
                    announce("STATUS", self.status())
        self.close_all()

    def close_all(self) -> None:
        for sock in self.held.values():
            sock.close()
        closed = len(self.held)
        self.held.clear()
        announce("CLOSED", {"closed": closed})


# ----------------------------------------------------------------- ping-pong


def ping_pong(port: int, rounds: int, warmup: int, max_seconds: float, host: str = HOST) -> list[float]:
    """1-byte round trips over one connection; returns per-round latencies in µs after warm-up."""
    samples: list[float] = []
    deadline = time.monotonic() + max_seconds
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + rounds):
            t = time.perf_counter_ns()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise ConnectionError("peer closed during ping-pong")
            if i >= warmup:
                samples.append((time.perf_counter_ns() - t) / 1000)
            if time.monotonic() > deadline:
                break
    return samples


# ---------------------------------------------------------------- fresh connections


def fresh_connections(port: int, count: int, host: str = HOST, timeout: float = 10.0,
                      echo: bool = False) -> list[float]:
    """``count`` new connections one after another: connect, send one request line, read the
    reply (the line itself from an ``echo`` service), close; the ms from the connect call to the
    end of the reply, each (the wait a new user of a path sees before its first answer)."""
    expected = len(REQUEST) if echo else len(REPLY)
    samples: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(REQUEST)
            reply = b""
            while len(reply) < expected:
                chunk = sock.recv(64)
                if not chunk:
                    raise ConnectionError(f"closed after {len(reply)} bytes of the reply")
                reply += chunk
        samples.append((time.perf_counter() - started) * 1e3)
    return samples


# ---------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    send = sub.add_parser("send")
    send.add_argument("port", type=int)
    send.add_argument("--streams", type=int, default=1)
    send.add_argument("--seconds", type=float, default=5)
    rate = sub.add_parser("rate")
    rate.add_argument("port", type=int)
    rate.add_argument("--concurrency", type=int, default=25)
    rate.add_argument("--seconds", type=float, default=5)
    rate.add_argument("--start-at", type=float, default=0.0, help="CLOCK_MONOTONIC time to start at")
    rate.add_argument("--host", default=HOST, help="address to connect to")
    hold = sub.add_parser("hold")
    hold.add_argument("port", type=int)
    hold.add_argument("--count", type=int, default=1000)
    hold.add_argument("--rate", type=float, default=1000.0, help="connections opened per second, at most")
    hold.add_argument("--inflight", type=int, default=100, help="unpaired connections at once, at most")
    hold.add_argument("--deadline", type=float, default=300.0, help="seconds to reach the count")
    hold.add_argument("--hold-max", type=float, default=900.0, help="seconds to hold before closing anyway")
    args = parser.parse_args()
    raise_nofile_limit()
    if args.mode == "send":
        announce("RESULT", run_send(args.port, args.streams, args.seconds))
    elif args.mode == "rate":
        announce("RESULT", RateGenerator(args.port, args.concurrency, args.host).run(args.seconds, args.start_at))
    else:
        holder = Holder(args.port, args.count, args.rate, args.inflight)
        done = holder.open_all(args.deadline)
        announce("READY" if done else "INCOMPLETE", holder.status())
        holder.serve_commands(args.hold_max)


if __name__ == "__main__":
    main()
