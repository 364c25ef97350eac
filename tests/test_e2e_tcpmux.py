"""End to end over the tcpmux transport (smux sessions over TCP): many streams on one session,
flow control under a stalled reader, stream churn, a session cut mid-transfer, broken frames
against our server and our client (each side played by a fake peer in the test), and peers whose
mux_version differ. Real processes, real sockets on 127.0.0.1, data checked with sha256."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from backhaul.protocol.smux import encode_frame
from backhaul.relay.stream import READ_CHUNK
from backhaul.tunnel.mux_sessions import QUIET_SESSIONS_PER_POOL
from tests import harness
from tests.faultproxy import FaultProxy
from tests.harness import (
    HOST,
    Launcher,
    Listener,
    Service,
    client_toml,
    closed_by_peer,
    connect,
    echo_works,
    free_port,
    ltv,
    nofile_at_least,
    recv_exact,
    server_toml,
    wait_until,
)
from tests.mux_tunnels import TOKEN, Source, mux_tunnel, sessions_of
from tests.smux_peer import FRAME, Frames, lv

pytestmark = pytest.mark.timeout(120)


KiB = 1024
MiB = 1024 * KiB
SG_CHAN = 0x01
SYN, FIN, PSH, NOP, UPD = range(5)


# ------------------------------------------------------------------------------------------------
# what the tunnel processes hold

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS line in /proc status")


def settled(read: Callable[[], object], polls: int = 3) -> Callable[[], object]:
    """A predicate for wait_until: true once ``read()`` returned the same value ``polls`` times running."""
    seen: list[object] = []

    def check() -> object:
        seen.append(read())
        return len(seen) >= polls and all(value == seen[-1] for value in seen[-polls:])

    return check


class RssPeaks(threading.Thread):
    """Samples VmRSS of some processes every 20 ms and keeps the highest value of each, per phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(name="rss-peaks", daemon=True)
        self.pids = pids
        self.before = self._sample()
        self.peaks: dict[str, dict[str, int]] = {}
        self._current: dict[str, int] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()

    def _sample(self) -> dict[str, int]:
        return {name: rss_kib(pid) for name, pid in self.pids.items()}

    def phase(self, name: str) -> None:
        """From now on, peaks count for phase ``name``."""
        with self._lock:
            self._current = self.peaks[name] = self._sample()

    def run(self) -> None:
        while not self._done.wait(0.02):
            with contextlib.suppress(OSError):
                now = self._sample()
                with self._lock:
                    for name, kib in now.items():
                        self._current[name] = max(self._current.get(name, 0), kib)

    def stop(self) -> None:
        self._done.set()
        self.join(5)

    def growth(self, phase: str) -> dict[str, int]:
        """Bytes each process grew by at its peak in ``phase``, over the RSS before the first phase."""
        return {name: (self.peaks[phase][name] - self.before[name]) * KiB for name in self.pids}

    def report(self) -> str:
        def one(phase: str) -> str:
            return ", ".join(f"{name} +{grew / MiB:.1f}" for name, grew in self.growth(phase).items())

        before = ", ".join(f"{name} {kib / KiB:.1f} MiB" for name, kib in self.before.items())
        return f"RSS before: {before}; peak growth (MiB): " + "; ".join(f"{p}: {one(p)}" for p in self.peaks)


# ------------------------------------------------------------------------------------------------
# many users and the echo service behind the tunnel, all driven from one thread

class _User:
    __slots__ = ("index", "sock", "payload", "limit", "sent", "got", "connected", "shut", "reached")

    def __init__(self, index: int, sock: socket.socket, payload: bytes, limit: int) -> None:
        self.index = index
        self.sock = sock
        self.payload = payload
        self.limit = limit          # send no further than this (the barrier of EchoLoad.run)
        self.sent = 0
        self.got = bytearray()
        self.connected = False
        self.shut = False
        self.reached = False        # got its first part back


class EchoLoad:
    """An echo service and the users of a tunnel in front of it, on one selector in this thread.

    Each user sends its payload, half-closes and must read the same bytes back before EOF. No
    thread per connection: a thousand connections cost two thousand sockets, nothing more.
    """

    ECHO_HOLD = 1 * MiB  # an echo connection stops reading while this much waits to be sent

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.server = socket.create_server((HOST, 0), backlog=4096)
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self.sel.register(self.server, selectors.EVENT_READ, self._accept)
        self.echoes: dict[socket.socket, tuple[bytearray, list[bool]]] = {}
        self.users: dict[socket.socket, _User] = {}
        self.accepted = 0
        self.peak_users = 0
        self._gate = 0
        self._first_part = 0

    def close(self) -> None:
        for sock in [*self.echoes, *self.users]:
            sock.close()
        self.echoes.clear()
        self.users.clear()
        self.sel.close()
        self.server.close()

    def __enter__(self) -> EchoLoad:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the echo service -----------------------------------------------------------------------
    def _accept(self, _sock: socket.socket, _mask: int) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.accepted += 1
            self.echoes[conn] = (bytearray(), [False])
            self.sel.register(conn, selectors.EVENT_READ, self._echo)
            if self._gate and self.accepted == self._gate:
                self._gate = 0
                self._raise_limits(self._first_part)

    def _echo(self, conn: socket.socket, mask: int) -> None:
        out, eof = self.echoes[conn]
        try:
            if mask & selectors.EVENT_READ:
                while len(out) < self.ECHO_HOLD:
                    data = conn.recv(256 * KiB)
                    if not data:
                        eof[0] = True
                        break
                    out += data
            if out:
                del out[:conn.send(out)]
        except BlockingIOError:
            pass
        except OSError:
            eof[0], out[:] = True, b""
        if eof[0] and not out:
            self.sel.unregister(conn)
            del self.echoes[conn]
            conn.close()
            return
        events = (selectors.EVENT_READ if not eof[0] and len(out) < self.ECHO_HOLD else 0)
        events |= selectors.EVENT_WRITE if out else 0
        self.sel.modify(conn, events, self._echo)

    # --- the users ------------------------------------------------------------------------------
    def run(self, port: int, payloads: list[bytes], concurrency: int, first_part: int = 0,
            timeout: float = 60.0) -> None:
        """Send every payload through ``port`` on its own connection, at most ``concurrency`` open
        at once, and check each comes back sha256-exact. With ``first_part``, users send nothing
        until every one of them reached the echo service through the tunnel, then only that much
        until every user got it back: all of them are open at the same moment, twice over."""
        if first_part:
            assert concurrency >= len(payloads), "a barrier needs every user open at once"
        self.failures: list[str] = []
        self.done = 0
        self.reached = 0
        self._first_part = first_part
        self._total = len(payloads)
        self._gate = self.accepted + len(payloads) if first_part else 0  # echo accepts that open the gate
        started = 0
        deadline = time.monotonic() + timeout
        while self.done < len(payloads):
            while started < len(payloads) and len(self.users) < concurrency:
                self._start(port, started, payloads[started])
                started += 1
            self.peak_users = max(self.peak_users, len(self.users))
            for key, mask in self.sel.select(timeout=0.5):
                key.data(key.fileobj, mask)
            assert not self.failures, f"{len(self.failures)} users failed, first ones: {self.failures[:5]}"
            if time.monotonic() > deadline:
                stuck = sorted(self.users.values(), key=lambda u: u.index)[:5]
                pytest.fail(f"{self.done} of {len(payloads)} users done after {timeout:g} s; "
                            f"{len(self.users)} still open, {self.reached} past the first part; some: " +
                            ", ".join(f"#{u.index} sent {u.sent} got {len(u.got)}" for u in stuck))

    def _start(self, port: int, index: int, payload: bytes) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((HOST, port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            pytest.fail(f"user {index}: connect failed: {os.strerror(code)}")
        limit = 0 if self._gate else len(payload)
        self.users[sock] = _User(index, sock, payload, limit)
        self.sel.register(sock, selectors.EVENT_WRITE, self._user)

    def _user(self, sock: socket.socket, mask: int) -> None:
        user = self.users[sock]
        try:
            if not user.connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                user.connected = True
            if mask & selectors.EVENT_WRITE and user.sent < user.limit:
                with memoryview(user.payload) as view:
                    user.sent += sock.send(view[user.sent:user.limit])
            if user.sent == len(user.payload) and not user.shut:
                sock.shutdown(socket.SHUT_WR)
                user.shut = True
            if mask & selectors.EVENT_READ:
                while True:
                    data = sock.recv(256 * KiB)
                    if not data:
                        self._finish(user)
                        return
                    user.got += data
        except BlockingIOError:
            pass
        except OSError as exc:
            self.failures.append(f"user {user.index}: {exc!r} after sending {user.sent}, getting {len(user.got)}")
            self._drop(user)
            return
        if self._first_part and not self._gate and not user.reached and len(user.got) >= user.limit > 0:
            user.reached = True
            self.reached += 1
            if self.reached == self._total:
                self._raise_limits(None)
        self._interest(user)

    def _interest(self, user: _User) -> None:
        events = selectors.EVENT_READ if user.connected else 0
        if not user.connected or user.sent < user.limit:
            events |= selectors.EVENT_WRITE
        self.sel.modify(user.sock, events, self._user)

    def _raise_limits(self, limit: int | None) -> None:
        """The next stage: every user may send up to ``limit`` bytes (None: all of its payload)."""
        for user in self.users.values():
            user.limit = len(user.payload) if limit is None else min(limit, len(user.payload))
            self._interest(user)

    def _finish(self, user: _User) -> None:
        got = bytes(user.got)
        if len(got) != len(user.payload) or hashlib.sha256(got).digest() != hashlib.sha256(user.payload).digest():
            self.failures.append(f"user {user.index}: {len(got)} bytes back of {len(user.payload)}, "
                                 f"sha256 {'equal' if got == user.payload else 'differs'}")
        self.done += 1
        self._drop(user)

    def _drop(self, user: _User) -> None:
        self.sel.unregister(user.sock)
        del self.users[user.sock]
        user.sock.close()


# ------------------------------------------------------------------------------------------------
# 1. a thousand concurrent streams on one session

THOUSAND = 1000
STREAM_PAYLOAD = 16 * KiB


@pytest.mark.parametrize("version", [1, 2])
def test_thousand_concurrent_streams_on_one_session_sha256_exact(launcher: Launcher, version: int) -> None:
    """1,000 users at once, each echoing its own 16 KiB through ONE smux session, come back exact."""
    rng = random.Random(1000 + version)
    payloads = [struct.pack(">I", i) + rng.randbytes(STREAM_PAYLOAD - 4) for i in range(THOUSAND)]
    with nofile_at_least(4 * THOUSAND + 256), EchoLoad() as load:
        tunnel = mux_tunnel(launcher, [str(load.port)],
                            server={"mux_con": THOUSAND, "mux_version": version, "channel_size": 1},
                            client={"connection_pool": 1, "mux_session": 1, "mux_version": version}).up()
        wait_until(lambda: sessions_of(tunnel) == 1, 10, "the client's one smux session")
        # Users send nothing until all 1,000 reached the echo service through the tunnel: the
        # streams open while the session is quiet (our server opens no stream on a session whose
        # socket is full at that instant; it asks for another session instead). Then half of each
        # payload, and the rest (and the half-close) only once all 1,000 got their half back.
        load.run(tunnel.public[0], payloads, concurrency=THOUSAND, first_part=STREAM_PAYLOAD // 2, timeout=90)
        assert load.peak_users == THOUSAND and load.reached == THOUSAND
        assert load.accepted == THOUSAND
        assert sessions_of(tunnel) == 1, "the server asked for another session: the streams did not share one"
    for proc in (tunnel.server, tunnel.client):
        assert proc is not None and proc.alive()
        assert "Traceback" not in proc.log()
        assert not proc.lines("ended:"), proc.log()


# ------------------------------------------------------------------------------------------------
# 2. a stalled reader

DOWNLOAD = 64 * MiB
ECHO_USERS = 20
ECHO_SIZE = 1 * MiB
RECEIVE_BUFFER = 4 * MiB  # mux_recievebuffer, the default
OUTBOX = 1 * MiB          # what a session queues for its socket
# The stalled stream alone: the session's receive buffer (v1 fills it; v2 holds at most the 256 KiB
# window), the outbox, the relays' reads and the allocator's share: "a few MiB".
STALL_LIMIT = RECEIVE_BUFFER + 5 * MiB
# With 20 more streams busy, or while everything drains: each relay holds at most one read per
# direction (v1: the echoes' bytes wait in both), and glibc keeps freed blocks of several threads'
# arenas. Well under half the download: a tunnel that buffered the stalled stream would grow by
# most of its 64 MiB.
BUSY_LIMIT = RECEIVE_BUFFER + OUTBOX + 2 * ECHO_USERS * READ_CHUNK + 5 * MiB
assert BUSY_LIMIT < DOWNLOAD // 2


def echo_exact(port: int, size: int, seed: int) -> None:
    """Echo ``size`` seeded bytes through ``port``, sending and reading at the same time; sha256-exact."""
    payload = random.Random(seed).randbytes(size)
    with connect(port) as sock:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        got = bytearray()
        try:
            while data := sock.recv(256 * KiB):
                got += data
        finally:
            sender.join(harness.IO_TIMEOUT)
    assert not errors, errors
    assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def read_until_eof(sock: socket.socket) -> tuple[bytes, int]:
    digest, total = hashlib.sha256(), 0
    while data := sock.recv(MiB):
        digest.update(data)
        total += len(data)
    return digest.digest(), total


class CountingEcho:
    """An echo service that counts the bytes it received, over all connections."""

    def __init__(self) -> None:
        self.received = 0
        self.service = Service(self.handle, "counting-echo")

    def handle(self, conn: socket.socket) -> None:
        while data := conn.recv(64 * KiB):
            self.received += len(data)
            conn.sendall(data)


@pytest.mark.parametrize("version", [2, 1])
def test_stalled_reader_does_not_stall_the_session(launcher: Launcher, version: int) -> None:
    """v2: a user that never reads a 64 MiB download stalls only its own stream (20 others echo
    1 MiB each on the same session meanwhile) and RSS stays bounded; v1 (one window for the whole
    session, as in Go) stays bounded too and everything completes once the reader reads."""
    source = Source(DOWNLOAD, seed=32)
    echo = CountingEcho()
    try:
        tunnel = mux_tunnel(launcher, [str(source.service.port), str(echo.service.port)],
                            # one session (channel_size): no quiet one asked for beside the download
                            server={"mux_version": version, "mux_con": 64, "channel_size": 1},
                            client={"mux_version": version, "connection_pool": 1, "mux_session": 1}).up()
        assert tunnel.server is not None and tunnel.client is not None
        download_port, echo_port = tunnel.public
        echo_works(echo_port, size=ECHO_SIZE, seed=1)  # warm-up: the session and the buffers are there
        wait_until(lambda: sessions_of(tunnel) == 1, 10, "the client's one smux session")
        rss = RssPeaks({"server": tunnel.server.pid, "client": tunnel.client.pid})
        rss.phase("stalled")
        rss.start()
        try:
            with connect(download_port) as stalled, ThreadPoolExecutor(max_workers=ECHO_USERS) as pool:
                wait_until(lambda: source.sent > 0, 10, "the download to start")
                wait_until(settled(lambda: source.sent), 15, "the stalled download to stop moving", interval=0.2)
                stalled_at = source.sent
                if version == 2:  # (v1: the kernel's socket buffers may well hold most of it)
                    assert stalled_at < DOWNLOAD, f"{DOWNLOAD // MiB} MiB went through to a user that never read"
                rss.phase("stalled+echoes")
                futures = [pool.submit(echo_exact, echo_port, ECHO_SIZE, 100 + i) for i in range(ECHO_USERS)]
                if version == 2:
                    for future in futures:
                        future.result(timeout=60)  # while the stalled user has still read nothing
                    assert source.sent == stalled_at, "the stalled download moved without a read"
                    assert sessions_of(tunnel) == 1, "the echoes did not share the stalled session"
                else:  # v1: the echoes stall on the full session buffer too; wait until they do
                    wait_until(settled(lambda: echo.received), 15, "the echoes to stop moving", interval=0.2)
                echoed_while_stalled = sum(future.done() for future in futures)
                rss.phase("drain")
                digest, total = read_until_eof(stalled)
                for future in futures:
                    future.result(timeout=60)
        finally:
            rss.stop()
        assert total == DOWNLOAD and digest == source.expected(), f"download: {total} bytes, sha256 differs"
        if version == 2:
            assert echoed_while_stalled == ECHO_USERS
        print(f"\nmux_version {version}: the source stalled at {stalled_at / MiB:.1f} MiB; {echoed_while_stalled} "
              f"of {ECHO_USERS} echoes done while stalled; {rss.report()}")
        limits = {"stalled": STALL_LIMIT, "stalled+echoes": BUSY_LIMIT, "drain": BUSY_LIMIT}
        for phase, limit in limits.items():
            for name, grew in rss.growth(phase).items():
                assert grew <= limit, f"{name} grew by {grew / MiB:.1f} MiB ({phase}): {rss.report()}"
        for proc in (tunnel.server, tunnel.client):
            assert "Traceback" not in proc.log()
            assert not proc.lines("ended:"), proc.log()
    finally:
        source.service.close()
        echo.service.close()


# ------------------------------------------------------------------------------------------------
# 3. stream churn

CHURN = 10_000
CHURN_AT_ONCE = 50


def short_payloads(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [struct.pack(">I", i) + rng.randbytes(rng.randrange(1, 300)) for i in range(count)]


def test_ten_thousand_streams_leave_no_thread_or_fd_behind(launcher: Launcher) -> None:
    """10,000 short echo connections (50 at a time) through one tunnel; afterwards both processes
    hold the threads and fds they held after the warm-up (plus those of any session the pool added)."""
    with EchoLoad() as load:
        tunnel = mux_tunnel(launcher, [str(load.port)]).up()
        assert tunnel.server is not None and tunnel.client is not None
        procs = {"server": tunnel.server, "client": tunnel.client}
        port = tunnel.public[0]
        load.run(port, short_payloads(500, seed=3), CHURN_AT_ONCE)  # warm-up: pools at working size
        for proc in procs.values():
            wait_until(settled(lambda p=proc: (p.threads(), p.fds())), 10, f"{proc.name} to settle", interval=0.2)
        warm = {name: (proc.threads(), proc.fds()) for name, proc in procs.items()}
        warm_sessions = sessions_of(tunnel)

        start = time.monotonic()
        load.run(port, short_payloads(CHURN, seed=4), CHURN_AT_ONCE, timeout=90)
        took = time.monotonic() - start
        assert load.accepted == 500 + CHURN
        # The client's pool sizer may have dialed a session since (one demux thread and one socket
        # on each side): those are the only threads and fds allowed on top of the warm-up.
        extra = sessions_of(tunnel) - warm_sessions
        assert extra >= 0
        for name, proc in procs.items():
            want = (warm[name][0] + extra, warm[name][1] + extra)
            wait_until(lambda p=proc, w=want: (p.threads(), p.fds()) == w, 10,
                       f"{name}'s threads and fds to return to {want} (after warm-up {warm[name]}, "
                       f"{extra} sessions added); now {(proc.threads(), proc.fds())}")
        print(f"\n{CHURN} streams in {took:.1f} s; sessions {warm_sessions} -> {warm_sessions + extra}; "
              f"after warm-up (threads, fds) {warm}")
        load.run(port, [random.Random(10).randbytes(64 * KiB)], 1)  # the tunnel still works
    for proc in procs.values():
        assert "Traceback" not in proc.log()
        assert not proc.lines("ended:"), proc.log()


# ------------------------------------------------------------------------------------------------
# 4. the session's TCP connection is cut mid-transfer

def test_cut_session_ends_its_users_and_a_new_session_carries_on(launcher: Launcher, echo_service: Service) -> None:
    """Cutting the smux session's TCP connection mid-download ends the user (no hang), both sides
    log the session's end, the client dials a new session and a new user echoes exact."""
    source = Source(1024 * MiB, seed=4)  # far more than the test reads
    tunnel = mux_tunnel(launcher, [str(source.service.port), str(echo_service.port)],
                        server={"connection_pool": 1}, client={"connection_pool": 1, "mux_session": 1})
    tunnel.start_server()
    proxy = FaultProxy(tunnel.bind_port)
    try:
        tunnel.client_text = client_toml(proxy.port, TOKEN, transport="tcpmux", connection_pool=1, mux_session=1)
        client = tunnel.start_client()
        client.wait_for_log(f"connected to server {HOST}:{proxy.port}: control channel up")
        assert tunnel.server is not None and tunnel.client is not None
        tunnel.server.wait_for_log("connected: control channel up")
        wait_until(lambda: len(proxy.pairs) >= 2, 10, "the control channel and the session through the proxy")
        session_port = proxy.pairs[1].up.getsockname()[1]  # the server sees the session from here
        with connect(tunnel.public[0]) as user:
            got = 0
            while got < 4 * MiB:
                data = user.recv(MiB)
                assert data, f"EOF after {got} bytes, before the cut"
                got += len(data)
            proxy.cut(index=1)
            start = time.monotonic()
            assert closed_by_peer(user, timeout=10), "the user still hangs 10 s after its session was cut"
            ended_after = time.monotonic() - start
        line = tunnel.server.wait_for_log("smux session from", timeout=10)
        assert f"smux session from {HOST}:{session_port} ended: " in line, line
        client_line = tunnel.client.wait_for_log("an smux session with the server ended: ", timeout=10)
        wait_until(lambda: len(proxy.pairs) >= 3, 10, "the client to dial a new session")
        echo_works(tunnel.public[1], size=2 * MiB, seed=44)
        print(f"\nuser ended {ended_after:.2f} s after the cut; server: {line!r}; client: {client_line!r}")
        # the control channel, the cut session, and at most the sessions the server asks for to
        # keep one quiet beside bulk (the download, then the echo)
        most = 2 + QUIET_SESSIONS_PER_POOL * 1
        assert len(proxy.pairs) <= most, f"{len(proxy.pairs) - 1} sessions: more than the server asks for"
        assert not tunnel.client.lines("lost the server"), "the control channel went down with the session"
        for proc in (tunnel.server, tunnel.client):
            assert "Traceback" not in proc.log()
    finally:
        proxy.close()
        source.service.close()


# ------------------------------------------------------------------------------------------------
# fake peers: raw smux frames on plain sockets


# ------------------------------------------------------------------------------------------------
# 5. bad frames against our server

SMALL_FRAME = 1024
FAKE_TARGET = b"5201"


def bad_input_cases() -> list[object]:
    upd = struct.pack("<II", 0, 65536)
    return [
        pytest.param(1, FRAME.pack(7, NOP, 0, 0), "not an smux frame: version byte 0x07, expected 1",
                     id="version-byte"),
        pytest.param(2, FRAME.pack(2, 9, 0, 3), "unknown smux command 9 on stream 3", id="unknown-command"),
        pytest.param(2, encode_frame(2, FIN, 3) + encode_frame(2, PSH, 3, b"late"),
                     "smux PSH on stream 3 after the peer's FIN", id="psh-after-fin"),
        pytest.param(2, encode_frame(2, PSH, 1001, b"junk"), "smux PSH for stream 1001, which was never opened",
                     id="psh-never-opened"),
        pytest.param(1, encode_frame(1, FIN, 1001), "smux FIN for stream 1001, which was never opened",
                     id="fin-never-opened"),
        pytest.param(1, encode_frame(1, UPD, 3, upd),
                     "smux UPD frame on stream 3 on a version 1 session (v1 has no flow control)", id="upd-on-v1"),
    ]


def echo_through_fake_client(user: socket.socket, frames: Frames, sid: int, size: int, seed: int) -> None:
    """The user sends; the fake client echoes every PSH back on the stream; the user reads it all."""
    payload = random.Random(seed).randbytes(size)
    user.sendall(payload)
    for piece in frames.read(sid, size):
        frames.send(PSH, sid, piece)
    got = recv_exact(user, size)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


@pytest.mark.parametrize(("version", "bad", "cause"), bad_input_cases())
def test_bad_frames_end_only_their_session(launcher: Launcher, version: int, bad: bytes, cause: str) -> None:
    """A broken frame on one session ends that session alone, with one line naming it; another
    session of the same client keeps carrying its stream both ways."""
    bind_port, public = free_port(), free_port()
    server = launcher.start("server", server_toml(
        bind_port, [f"{HOST}:{public}={FAKE_TARGET.decode()}"], TOKEN, transport="tcpmux",
        mux_version=version, mux_con=1))
    server.wait_for_log(f"tcpmux tunnel listening on {HOST}:{bind_port}")
    with contextlib.ExitStack() as stack:
        control = stack.enter_context(connect(bind_port))
        control.sendall(ltv(SG_CHAN, TOKEN.encode()))
        assert recv_exact(control, 3 + len(TOKEN)) == ltv(SG_CHAN, TOKEN.encode())  # no RTT probe in tcpmux
        server.wait_for_log(f"client {HOST}:{control.getsockname()[1]} connected: control channel up")

        good = Frames(stack.enter_context(connect(bind_port)), version)
        user1 = stack.enter_context(connect(public))
        good.expect(SYN, 3)
        assert b"".join(good.read(3, 2 + len(FAKE_TARGET))) == lv(FAKE_TARGET)
        echo_through_fake_client(user1, good, 3, 5000, seed=1)

        # mux_con = 1 and the good session is busy: the next user's stream opens on the new
        # session, which proves the server took it as a session before the bad bytes go in.
        bad_sock = stack.enter_context(connect(bind_port))
        victim = Frames(bad_sock, version)
        user2 = stack.enter_context(connect(public))
        victim.expect(SYN, 3)
        assert b"".join(victim.read(3, 2 + len(FAKE_TARGET))) == lv(FAKE_TARGET)
        bad_sock.sendall(bad)

        line = server.wait_for_log("smux session from", timeout=10)
        assert line.endswith(f"smux session from {HOST}:{bad_sock.getsockname()[1]} ended: {cause}"), line
        assert closed_by_peer(bad_sock, timeout=5), "the server kept the bad session open"
        assert closed_by_peer(user2, timeout=5), "the user of the bad session was kept open"
        echo_through_fake_client(user1, good, 3, 5000, seed=2)  # the good session lives on
        user1.shutdown(socket.SHUT_WR)
        good.expect(FIN, 3)
        assert len(server.lines("smux session from")) == 1, server.log()
        assert len(server.lines("ended:")) == 1, server.log()
        assert server.alive()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("version", [1, 2])
def test_a_frame_longer_than_our_framesize_is_taken_as_a_go_receiver_takes_it(launcher: Launcher,
                                                                              version: int) -> None:
    """Our server with mux_framesize = 1024 gets a PSH of 65535 bytes: it takes any u16 length, as
    a Go receiver does whatever its own MaxFrameSize (peers with different mux_framesize must
    interoperate), and relays it whole; what it sends is cut at its own 1024 bytes; the session
    stays up and nothing is logged as broken. Catches: an oversize frame ending the session, and
    a frame size that limits what we send but is not kept."""
    bind_port, public = free_port(), free_port()
    server = launcher.start("server", server_toml(
        bind_port, [f"{HOST}:{public}={FAKE_TARGET.decode()}"], TOKEN, transport="tcpmux",
        mux_version=version, mux_framesize=SMALL_FRAME))
    server.wait_for_log(f"tcpmux tunnel listening on {HOST}:{bind_port}")
    with contextlib.ExitStack() as stack:
        control = stack.enter_context(connect(bind_port))
        control.sendall(ltv(SG_CHAN, TOKEN.encode()))
        assert recv_exact(control, 3 + len(TOKEN)) == ltv(SG_CHAN, TOKEN.encode())
        server.wait_for_log(f"client {HOST}:{control.getsockname()[1]} connected: control channel up")
        frames = Frames(stack.enter_context(connect(bind_port)), version)
        user = stack.enter_context(connect(public))
        frames.expect(SYN, 3)
        assert b"".join(frames.read(3, 2 + len(FAKE_TARGET))) == lv(FAKE_TARGET)
        download = random.Random(21).randbytes(65535)
        frames.send(PSH, 3, download)
        got = recv_exact(user, len(download))
        assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
        upload = random.Random(22).randbytes(20000)
        user.sendall(upload)
        pieces = frames.read(3, len(upload))
        assert b"".join(pieces) == upload and max(map(len, pieces)) <= SMALL_FRAME
        frames.send(PSH, 3, download)   # the session is still up, and still takes them
        got = recv_exact(user, len(download))
        assert hashlib.sha256(got).digest() == hashlib.sha256(download).digest()
        assert not server.lines("ended:"), server.log()
    assert "Traceback" not in server.log()
    documented = next(line for line in (harness.REPO / "README.md").read_text().splitlines()
                      if line.startswith("mux_framesize ="))
    assert "65535" in documented and "ends the session" not in documented, documented


# ------------------------------------------------------------------------------------------------
# 6. bad frames against our client

SYN_LIMIT = 1024  # live streams an smux session accepts (smux's accept backlog)
THROTTLE = 1.1    # the client logs one session end a second; a second one sooner waits for the next line


def fake_server(listener: Listener, sessions: int) -> tuple[socket.socket, list[socket.socket]]:
    """Play the Go tcpmux server: the handshake (no RTT probe), then accept the client's sessions."""
    control = listener.accept()
    assert recv_exact(control, 3 + len(TOKEN)) == ltv(SG_CHAN, TOKEN.encode())
    control.sendall(ltv(SG_CHAN, TOKEN.encode()))
    return control, [listener.accept() for _ in range(sessions)]


def good_stream(frames: Frames, target: int, size: int, seed: int) -> None:
    """Open stream 3 as the Go server does, echo ``size`` bytes through it, close it both ways."""
    payload = random.Random(seed).randbytes(size)
    frames.send(SYN, 3)
    frames.send(PSH, 3, lv(str(target).encode()))
    for start in range(0, size, 16 * KiB):
        frames.send(PSH, 3, payload[start:start + 16 * KiB])
    got = b"".join(frames.read(3, size))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    frames.send(FIN, 3)
    frames.expect(FIN, 3)  # the target saw EOF and closed: the client closes the stream too


def test_client_ends_a_flooded_or_broken_session_and_dials_another(launcher: Launcher, listener: Listener,
                                                                   echo_service: Service) -> None:
    """A SYN flood past 1,024 live streams and a frame with a wrong version byte each end their own
    session with a line; the client dials replacements and a well-formed stream still echoes exact."""
    client = launcher.start("client", client_toml(listener.port, TOKEN, transport="tcpmux",
                                                  connection_pool=3, mux_session=3))
    _control, (flooded, broken, healthy) = fake_server(listener, 3)
    client.wait_for_log(f"connected to server {HOST}:{listener.port}: control channel up")

    flooded.sendall(b"".join(encode_frame(1, SYN, 3 + 2 * i) for i in range(SYN_LIMIT + 1)))
    line = client.wait_for_log("an smux session with the server ended: ", timeout=10)
    reason = line.split("an smux session with the server ended: ", 1)[1]
    assert "SYN flood" in reason and str(SYN_LIMIT) in reason, line  # names the flood and the limit
    assert closed_by_peer(flooded, timeout=5), "the client kept the flooded session open"
    first_new = Frames(listener.accept(timeout=5), 1)

    time.sleep(THROTTLE)  # past the log throttle's second, so the next end gets a line of its own
    broken.sendall(FRAME.pack(7, NOP, 0, 0))
    line = client.wait_for_log("an smux session with the server ended: ", timeout=10, count=2)
    assert line.endswith("an smux session with the server ended: not an smux frame: version byte 0x07, "
                         "expected 1"), line
    assert closed_by_peer(broken, timeout=5), "the client kept the broken session open"
    second_new = Frames(listener.accept(timeout=5), 1)

    good_stream(Frames(healthy, 1), echo_service.port, 200 * KiB, seed=6)
    good_stream(first_new, echo_service.port, 100 * KiB, seed=7)
    good_stream(second_new, echo_service.port, 100 * KiB, seed=8)
    assert echo_service.accepted == 3
    assert len(client.lines("ended:")) == 2, client.log()
    assert not client.lines("lost the server"), "the control channel went down with a session"
    assert client.alive()
    assert "Traceback" not in client.log()


# ------------------------------------------------------------------------------------------------
# 7. mux_version differs

@pytest.mark.parametrize(("server_version", "client_version"), [(2, 1), (1, 2)])
def test_mux_version_mismatch_is_named_by_the_side_that_receives(launcher: Launcher, echo_service: Service,
                                                                 server_version: int, client_version: int) -> None:
    """The server's first frame (a SYN in its mux_version) ends the session at the client with a
    line saying the peers' mux_version differ; the user is closed, the tunnel's control channel stays."""
    tunnel = mux_tunnel(launcher, [str(echo_service.port)],
                        server={"mux_version": server_version},
                        client={"mux_version": client_version, "connection_pool": 1, "mux_session": 1}).up()
    assert tunnel.server is not None and tunnel.client is not None
    with connect(tunnel.public[0]) as user:
        user.sendall(b"hello")
        assert closed_by_peer(user, timeout=10), "the user was kept open on a broken session"
    line = tunnel.client.wait_for_log("an smux session with the server ended: ", timeout=10)
    assert line.endswith(f"an smux session with the server ended: smux version {server_version} frame on a "
                         f"version {client_version} session: the peers' mux_version differ"), line
    server_line = tunnel.server.wait_for_log("smux session from", timeout=10)
    assert "mux_version" not in server_line, "the server only saw its session closed"
    assert echo_service.accepted == 0
    assert not tunnel.client.lines("lost the server")
    for proc in (tunnel.server, tunnel.client):
        assert proc.alive()
        assert "Traceback" not in proc.log()
