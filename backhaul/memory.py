"""The C allocator's share of the memory (glibc): two arenas, and what is free given back.

Every smux session has a reading thread, the relays' workers are threads, and glibc gives threads
arenas of their own (up to 8 per core) and keeps what is freed in each: the RSS of a process whose
sessions come and go climbed for minutes under steady load (soak: +50 % in 5 minutes on tcpmux
and wsmux) with no object left behind. Two arenas and a trim every few seconds, on a worker, keep
it flat. An operator's MALLOC_ARENA_MAX wins; elsewhere than glibc (musl, macOS, a Python
without ctypes) nothing is done.

Measured (bench/soak.py, tcpmux, 6 minutes, a reset every 2 minutes, both runs at once on one
machine): with the cap and the trim the RSS after the warm-up and at the end was 72.2 -> 75.9 MiB
(server) and 75.4 -> 81.5 MiB (client); without, 97.6 -> 106.4 and 100.2 -> 110.4 MiB, past the
soak's bound of 10 % growth on the client.
"""

from __future__ import annotations

import os
from typing import Any

from backhaul.reactor import Reactor

ARENAS = 2
TRIM_EVERY = 10.0      # seconds
_M_ARENA_MAX = -8      # <malloc.h>


def _glibc() -> Any:
    """The C library of this process when it is glibc (its own symbols: no lookup, no ldconfig),
    else None."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        for name in ("gnu_get_libc_version", "malloc_trim", "mallopt"):   # glibc only
            getattr(libc, name)
    except (ImportError, OSError, AttributeError):
        return None
    return libc


def start(reactor: Reactor) -> None:
    """Cap the arenas (before the threads start) and trim every TRIM_EVERY seconds from now on."""
    libc = _glibc()
    if libc is None:
        return
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, ARENAS)

    def trim() -> None:
        reactor.submit(libc.malloc_trim, 0)  # a foreign call: the GIL is free meanwhile
        reactor.call_later(TRIM_EVERY, trim)

    # The first one at once: the worker it takes exists from the start, not as a thread that
    # appears 10 s into the run.
    reactor.call_soon(trim)
