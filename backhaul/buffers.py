"""One scratch buffer per thread, for reads whose bytes are sent or copied out before the next.

The reactor and every worker read into their own: no read allocates (and maps) a large buffer
only to shrink it, and an idle connection owns none.
"""

from __future__ import annotations

import threading

SCRATCH_SIZE = 512 * 1024

_local = threading.local()


def scratch(size: int = SCRATCH_SIZE) -> memoryview:
    """This thread's buffer, the first ``size`` bytes of it (at most SCRATCH_SIZE)."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(SCRATCH_SIZE))
    return buf if size >= SCRATCH_SIZE else buf[:size]
