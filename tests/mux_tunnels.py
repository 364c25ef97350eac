"""tcpmux tunnels for the tests of several modules: one made with the test token, what its
client holds, and a service whose downloads are seeded bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
from collections.abc import Iterator

from tests.harness import Launcher, Service, Tunnel

KiB = 1024
MiB = 1024 * KiB
TOKEN = "e2e-token"


def mux_tunnel(launcher: Launcher, targets: list[str], server: dict[str, object] | None = None,
               client: dict[str, object] | None = None) -> Tunnel:
    return Tunnel(launcher, targets, TOKEN, transport="tcpmux", server_extra=server, client_extra=client)


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` whose remote port is ``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    count = 0
    with open(f"/proc/{pid}/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes and int(fields[2].split(":")[1], 16) == port:
                count += 1
    return count


def sessions_of(tunnel: Tunnel) -> int:
    """smux sessions the client holds: its connections to the tunnel port, less the control channel."""
    assert tunnel.client is not None
    return connections_to(tunnel.client.pid, tunnel.bind_port) - 1


def download_chunks(seed: int, size: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    left = size
    while left:
        chunk = rng.randbytes(min(MiB, left))
        left -= len(chunk)
        yield chunk


class Source:
    """A service that sends ``size`` seeded bytes to each connection, then closes; counts what left."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.sent = 0
        self.service = Service(self.handle, "source")

    def expected(self) -> bytes:
        """sha256 of what each connection gets."""
        digest = hashlib.sha256()
        for chunk in download_chunks(self.seed, self.size):
            digest.update(chunk)
        return digest.digest()

    def handle(self, conn: socket.socket) -> None:
        for chunk in download_chunks(self.seed, self.size):
            for start in range(0, len(chunk), 64 * KiB):
                conn.sendall(chunk[start:start + 64 * KiB])
                self.sent += min(64 * KiB, len(chunk) - start)
