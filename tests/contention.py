"""Contention mode: ``BACKHAUL_CONTENTION=1`` runs the e2e data suites on a machine made busy on
purpose, where interleavings that a quiet machine never shows come up (a stream's tail lost to a
session that ended, a target left open): a busy loop on each core for the whole run, small socket
buffers on the tunnel's sockets and on the tests' own users, and short random stalls in the fault
proxy. Every part is bounded: the loops end with the run (or when their parent dies), a stall
lasts at most ``STALL_MAX`` seconds."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

ENABLED = os.environ.get("BACKHAUL_CONTENTION", "") not in ("", "0")
SOCKET_BUFFER = 32 * 1024   # SO_RCVBUF / SO_SNDBUF of tunnel sockets and test users
STALL_CHANCE = 0.05         # of a fault proxy's chunk being held ...
STALL_MAX = 0.005           # ... for up to this long

# A busy loop that ends when its parent does: it never outlives the run that started it.
_BUSY = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass\n"


def tunnel_options() -> dict[str, object]:
    """Config keys that give the tunnel's sockets small buffers (none when off)."""
    return {"so_rcvbuf": SOCKET_BUFFER, "so_sndbuf": SOCKET_BUFFER} if ENABLED else {}


def small_buffers(sock: socket.socket) -> None:
    """A test's own socket (a user) gets small buffers too when on."""
    if ENABLED:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)


def stall(rng: random.Random) -> float:
    """Seconds a fault proxy holds its next chunk on top of what the test asked (0 when off)."""
    if ENABLED and rng.random() < STALL_CHANCE:
        return rng.uniform(0, STALL_MAX)
    return 0.0


class BusyLoops:
    """One busy process per core while it is open."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count if count is not None else (os.cpu_count() or 1)
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> BusyLoops:
        self.procs = [subprocess.Popen([sys.executable, "-c", _BUSY], stdin=subprocess.DEVNULL)
                      for _ in range(self.count)]
        return self

    def __exit__(self, *_exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)
        self.procs = []
