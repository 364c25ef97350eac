"""The client's pool auto-sizing of Backhaul v0.7 (PROTOCOL.md 1.4), as pure arithmetic.

Every second the client samples how many links sit idle; every ten seconds it compares the
load (link requests from the server) with that average and grows the pool by one, or skips the
next request once to let it shrink toward ``connection_pool``. Nothing of it is on the wire.
"""

from __future__ import annotations

import math

SAMPLES = 10


class PoolSizer:
    """Counts requests and idle samples; says when to dial an extra link or skip a request."""

    def __init__(self, base: int, aggressive: bool) -> None:
        self.base = base
        self.a, self.b, self.x, self.y = (1, 2, 0, 0.75) if aggressive else (4, 5, 3, 4.0)
        self.requests = 0
        self.idle_sum = 0
        self.samples = 0
        self.skip = False

    def take_request(self) -> bool:
        """A request for one more link arrived: True to dial it, False to skip it once."""
        self.requests += 1
        if self.skip:
            self.skip = False
            return False
        return True

    def sample(self, idle: int, size: int) -> bool:
        """Record one second's idle count; every ten samples decide. True: dial one extra."""
        self.idle_sum += idle
        self.samples += 1
        if self.samples < SAMPLES:
            return False
        load = math.ceil(self.requests / SAMPLES)
        average = math.ceil(self.idle_sum / SAMPLES)
        self.requests = self.idle_sum = self.samples = 0
        if load + self.a > average * self.b:
            return True
        if load + self.x < average * self.y and size > self.base:
            self.skip = True
        return False
