"""The C allocator's share of the memory (glibc): two arenas, and what is free given back.

Every smux session has a reading thread, the relays' workers are threads, and glibc gives threads
arenas of their own (up to 8 per core) and keeps what is freed in each: the RSS of a process whose
sessions come and go climbed for minutes under steady load (soak: +50 % in 5 minutes on tcpmux
and wsmux) with no object left behind. Two arenas and a trim every few seconds, on a worker, keep
it flat. An operator's MALLOC_ARENA_MAX wins; elsewhere than glibc nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from backhaul.reactor import Reactor

ARENAS = 2
TRIM_EVERY = 10.0      # seconds
_M_ARENA_MAX = -8      # <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only: AttributeError elsewhere)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
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
