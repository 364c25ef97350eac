"""64 concurrent users through a tunnel, each sending and receiving its own seeded sizes (0 B to
32 MiB), both ends checked by sha256: the bulk test every transport runs."""

from __future__ import annotations

import hashlib
import math
import random
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from tests import harness
from tests.harness import Service, Tunnel, connect, recv_exact, wait_until

MiB = 1024 * 1024
STREAMS = 64
BIGGEST = 32 * MiB
VOLUME_CAP = 400 * MiB  # both directions together: the seed below stays well under it
CHUNK = 256 * 1024
HEAD = struct.Struct(">IQ")  # stream number, bytes the target must send back


def stream_sizes(seed: int) -> list[tuple[int, int]]:
    """(bytes up, bytes down) per stream: 0 and 32 MiB exactly in each direction, the rest
    drawn log-uniformly from 1 B to 32 MiB (so most streams are small and the total stays bounded)."""
    rng = random.Random(seed)

    def draw() -> int:
        return int(math.exp(rng.uniform(0.0, math.log(BIGGEST))))

    up = [0, BIGGEST] + [draw() for _ in range(STREAMS - 2)]
    down = [BIGGEST, 0] + [draw() for _ in range(STREAMS - 2)]
    return list(zip(up, down, strict=True))


def payload_chunks(seed: int, size: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left:
        chunk = rng.randbytes(min(CHUNK, left))
        left -= len(chunk)
        yield chunk


def send_payload(sock: socket.socket, seed: int, size: int, digest: hashlib._Hash) -> int:
    sent = 0
    for chunk in payload_chunks(seed, size):
        digest.update(chunk)
        sock.sendall(chunk)
        sent += len(chunk)
    return sent


def hash_until_eof(sock: socket.socket) -> tuple[str, int]:
    digest = hashlib.sha256()
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(buf)
        if not got:
            return digest.hexdigest(), total
        digest.update(view[:got])
        total += got


def up_seed(stream: int) -> int:
    return 1_000_000 + stream


def down_seed(stream: int) -> int:
    return 2_000_000 + stream


class Sender(threading.Thread):
    """Sends a header plus a seeded payload, then shuts down the write side."""

    def __init__(self, sock: socket.socket, head: bytes, seed: int, size: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.head, self.seed, self.size = sock, head, seed, size
        self.digest = hashlib.sha256()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.head:
                self.sock.sendall(self.head)
            self.sent = send_payload(self.sock, self.seed, self.size, self.digest)
            self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            self.error = exc


class HashTarget:
    """Target service: reads the header, sends its own payload of the asked size while it hashes
    everything else until EOF, then closes. Records (received hash, received bytes, sent hash,
    sent bytes) per stream."""

    def __init__(self) -> None:
        self.results: dict[int, tuple[str, int, str, int]] = {}
        self.service = Service(self.handle, "hash-target")

    def handle(self, conn: socket.socket) -> None:
        stream, down = HEAD.unpack(recv_exact(conn, HEAD.size))
        sender = Sender(conn, b"", down_seed(stream), down)
        sender.start()
        try:
            got_hash, got = hash_until_eof(conn)
        finally:
            sender.join(harness.IO_TIMEOUT)
        if sender.error is not None:
            raise sender.error
        self.results[stream] = (got_hash, got, sender.digest.hexdigest(), sender.sent)


def user_stream(port: int, stream: int, up: int, down: int) -> tuple[str, int, str, int]:
    """(sent hash, sent bytes, received hash, received bytes) of one user connection."""
    with connect(port) as sock:
        sender = Sender(sock, HEAD.pack(stream, down), up_seed(stream), up)
        sender.start()
        try:
            got_hash, got = hash_until_eof(sock)
        finally:
            sender.join(harness.IO_TIMEOUT)
        if sender.error is not None:
            raise sender.error
        return sender.digest.hexdigest(), sender.sent, got_hash, got


def run_64_streams(start: Callable[[str], Tunnel], timeout: float = 120) -> Tunnel:
    """64 concurrent user connections through the tunnel ``start(target)`` brings up, each sending
    and receiving its own sizes; both ends checked by sha256. Returns the tunnel."""
    sizes = stream_sizes(seed=64)
    assert sizes[0] == (0, BIGGEST) and sizes[1] == (BIGGEST, 0)
    assert sum(up + down for up, down in sizes) < VOLUME_CAP
    target = HashTarget()
    try:
        tunnel = start(str(target.service.port))
        port = tunnel.public[0]
        with ThreadPoolExecutor(max_workers=STREAMS) as pool:
            futures = [pool.submit(user_stream, port, i, up, down) for i, (up, down) in enumerate(sizes)]
            users = [f.result(timeout=timeout) for f in futures]
        # A user that only sends is done once its bytes are in flight and the target's FIN came
        # back: the tunnel may still be delivering them. The target's own EOF is the end.
        wait_until(lambda: len(target.results) == STREAMS, timeout, "every stream to end at the target")
    finally:
        target.service.close()
    assert sorted(target.results) == list(range(STREAMS)), "some streams never completed at the target"
    for i, (up, down) in enumerate(sizes):
        sent_hash, sent, got_hash, got = users[i]
        t_got_hash, t_got, t_sent_hash, t_sent = target.results[i]
        assert (sent, t_got) == (up, up), f"stream {i}: bytes up"
        assert t_got_hash == sent_hash, f"stream {i}: the target received other bytes than the user sent"
        assert (t_sent, got) == (down, down), f"stream {i}: bytes down"
        assert got_hash == t_sent_hash, f"stream {i}: the user received other bytes than the target sent"
    return tunnel
