"""Random bytes from the system's source, drawn a page at a time.

A ws data connection needs some each: its key and id, a User-Agent pick, and a mask for each
frame the client sends (RFC 6455 5.3). One getrandom(2) per draw was four system calls per
connection; one per POOL bytes serves a hundred connections. The bytes are the kernel's, as
before (never a seeded generator), each handed out once.
"""

from __future__ import annotations

import os
import random
import threading

POOL = 4096


class PooledRandom(random.SystemRandom):
    """``random.SystemRandom`` served from a pool of os.urandom bytes; safe across threads."""

    def __init__(self) -> None:
        super().__init__()
        self._pool = b""
        self._used = 0
        self._lock = threading.Lock()

    def randbytes(self, n: int) -> bytes:
        if n > POOL // 4:
            return os.urandom(n)
        with self._lock:
            start = self._used
            if start + n > len(self._pool):
                self._pool, start = os.urandom(POOL), 0
            self._used = start + n
            return self._pool[start:start + n]

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        size = (k + 7) // 8
        return int.from_bytes(self.randbytes(size), "big") >> (size * 8 - k)

    def random(self) -> float:
        return (int.from_bytes(self.randbytes(7), "big") >> 3) * 2.0 ** -53


RANDOM = PooledRandom()
