"""End to end over tcpmux: an interactive stream keeps getting its answers while a download and
an upload run through the same smux session (the session's streams take turns, the kernel holds
little of the session unsent). Behaviour, not speed: every answer comes, exact, while the bulk
streams keep moving; every bulk byte arrives, checked with sha256. Real processes, loopback."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from collections.abc import Callable

import pytest

from backhaul.mux.unsent import LONG_PATH_ENV
from backhaul.tunnel.mux_sessions import QUIET_SESSIONS_PER_POOL
from tests import harness
from tests.harness import Launcher, Service, connect, echo_works, recv_exact, wait_until
from tests.mux_tunnels import download_chunks, mux_tunnel, sessions_of

pytestmark = pytest.mark.timeout(120)


KiB = 1024
MiB = 1024 * KiB
ENDLESS = 64 * 1024 * MiB  # a bulk stream runs until the test stops it, long before this
ROUND_TRIPS = 200
FLOWING = 4 * MiB  # each bulk stream moved this much before the round trips start


def prefix_digest(seed: int, size: int) -> bytes:
    """sha256 of the first ``size`` bytes of the seeded stream (whole chunks, the last one cut: a
    shorter chunk drawn from the seed is not a prefix of the longer one)."""
    digest = hashlib.sha256()
    left = size
    for chunk in download_chunks(seed, -(-size // MiB) * MiB):
        digest.update(chunk[:left])
        left -= min(left, len(chunk))
    return digest.digest()


class Bulk:
    """A download (target -> user) and an upload (user -> target) on their own threads, each
    counting and hashing what it moved, until ``stop``."""

    def __init__(self) -> None:
        self.downloaded = 0
        self.uploaded = 0
        self.received = 0  # by the upload's target
        self.upload_digest = hashlib.sha256()
        self.download_digest = hashlib.sha256()
        self.target_done = threading.Event()
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.source = Service(self._send_download, "source")
        self.sink = Service(self._take_upload, "sink")

    def _send_download(self, conn: socket.socket) -> None:
        for chunk in download_chunks(1, ENDLESS):
            conn.sendall(chunk)  # ends with OSError when the user goes

    def _take_upload(self, conn: socket.socket) -> None:
        while data := conn.recv(256 * KiB):
            self.upload_digest.update(data)
            self.received += len(data)
        self.target_done.set()

    def start(self, download_port: int, upload_port: int) -> None:
        for target, port in ((self._download, download_port), (self._upload, upload_port)):
            thread = threading.Thread(target=self._guard, args=(target, port), name="bulk", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[int], None], port: int) -> None:
        try:
            target(port)
        except BaseException as exc:
            self.errors.append(exc)

    def _download(self, port: int) -> None:
        with connect(port) as sock:
            while not self._stop.is_set():
                data = sock.recv(MiB)
                assert data, "the download ended before the test stopped it"
                self.download_digest.update(data)
                self.downloaded += len(data)

    def _upload(self, port: int) -> None:
        with connect(port) as sock:
            for chunk in download_chunks(2, ENDLESS):
                if self._stop.is_set():
                    break
                sock.sendall(chunk)
                self.uploaded += len(chunk)
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # the target closes after the upload's EOF

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(harness.IO_TIMEOUT)

    def close(self) -> None:
        self.stop()
        self.source.close()
        self.sink.close()


@pytest.mark.parametrize("version", [2, 1])
def test_interactive_stream_answers_while_bulk_runs_on_the_same_session(launcher: Launcher, echo_service: Service,
                                                                       version: int) -> None:
    bulk = Bulk()
    try:
        tunnel = mux_tunnel(launcher, [str(bulk.source.port), str(bulk.sink.port), str(echo_service.port)],
                            # channel_size 1: the server keeps one session (it would ask for a
                            # quiet one once bulk crosses it, and the echo would not share)
                            server={"mux_version": version, "mux_con": 64, "channel_size": 1},
                            client={"mux_version": version, "connection_pool": 1, "mux_session": 1}).up()
        assert tunnel.server is not None and tunnel.client is not None
        download_port, upload_port, echo_port = tunnel.public
        wait_until(lambda: sessions_of(tunnel) == 1, 10, "the client's one smux session")
        bulk.start(download_port, upload_port)
        wait_until(lambda: min(bulk.downloaded, bulk.received) >= FLOWING or bulk.errors, 60,
                   "both bulk streams to move")
        assert not bulk.errors, bulk.errors
        rng = random.Random(version)
        with connect(echo_port) as sock:
            moved_at_first = moved_at_last = (0, 0)
            for i in range(ROUND_TRIPS):
                request = rng.randbytes(rng.randrange(1, 2000))
                sock.sendall(request)
                assert recv_exact(sock, len(request)) == request, f"round trip {i}: a different answer"
                if i == 0:
                    moved_at_first = (bulk.downloaded, bulk.received)
                moved_at_last = (bulk.downloaded, bulk.received)
        assert not bulk.errors, bulk.errors
        # The bulk streams ran all along: the answers did not come because they had stopped.
        assert moved_at_last[0] > moved_at_first[0] and moved_at_last[1] > moved_at_first[1], (
            moved_at_first, moved_at_last)
        assert sessions_of(tunnel) == 1, "the streams did not share one session"
        bulk.stop()
        assert not bulk.errors, bulk.errors
        assert bulk.target_done.wait(harness.IO_TIMEOUT), "the upload's target never saw its end"
        assert bulk.received == bulk.uploaded and bulk.upload_digest.digest() == prefix_digest(2, bulk.uploaded)
        assert bulk.download_digest.digest() == prefix_digest(1, bulk.downloaded)
        print(f"\nmux_version {version}: {ROUND_TRIPS} round trips while {(moved_at_last[0] - moved_at_first[0]) / MiB:.0f}"
              f" MiB went down and {(moved_at_last[1] - moved_at_first[1]) / MiB:.0f} MiB up the same session")
        for proc in (tunnel.server, tunnel.client):
            assert "Traceback" not in proc.log()
    finally:
        bulk.close()


def test_bulk_on_the_only_session_brings_a_quiet_one_for_the_next_user(launcher: Launcher,
                                                                       echo_service: Service) -> None:
    """With connection_pool = 1 on both sides, a download and an upload on the client's one
    session make the server ask for one more (one that no bulk crosses, for the next user), and
    no more than QUIET_SESSIONS_PER_POOL x connection_pool. Catches: no session asked for (the
    next user's frames wait behind the bulk's losses on a real path), sessions asked for on every
    turn of the bulk, or a user of the new session losing bytes. Loopback counts as a long path
    here: only there does a session watch for bulk (elsewhere a packet is never lost in flight)."""
    launcher.env[LONG_PATH_ENV] = "0"
    bulk = Bulk()
    try:
        tunnel = mux_tunnel(launcher, [str(bulk.source.port), str(bulk.sink.port), str(echo_service.port)],
                            server={"connection_pool": 1},
                            client={"connection_pool": 1, "mux_session": 1}).up()
        assert tunnel.server is not None and tunnel.client is not None
        download_port, upload_port, echo_port = tunnel.public
        wait_until(lambda: sessions_of(tunnel) == 1, 10, "the client's one smux session")
        bulk.start(download_port, upload_port)
        # Asked for as the bulk begins; the client's own pool sizing (v0.7's) would add one only
        # at its first decision, ten seconds after the session opened.
        wait_until(lambda: sessions_of(tunnel) == 2 or bulk.errors, 3, "a second session beside the bulk")
        assert not bulk.errors, bulk.errors
        for seed in range(20):
            echo_works(echo_port, size=64 * KiB, seed=seed)
        wait_until(lambda: min(bulk.downloaded, bulk.received) >= FLOWING or bulk.errors, 60,
                   "both bulk streams to move")
        assert sessions_of(tunnel) == QUIET_SESSIONS_PER_POOL, "more sessions than the bound"
        bulk.stop()
        assert not bulk.errors, bulk.errors
        assert bulk.target_done.wait(harness.IO_TIMEOUT), "the upload's target never saw its end"
        assert bulk.received == bulk.uploaded and bulk.upload_digest.digest() == prefix_digest(2, bulk.uploaded)
        assert bulk.download_digest.digest() == prefix_digest(1, bulk.downloaded)
        for proc in (tunnel.server, tunnel.client):
            assert "Traceback" not in proc.log()
    finally:
        bulk.close()
