"""The process's own numbers (CPU time, resident memory, open descriptors, threads, start time)
and its build, for ``/metrics`` in the names every Prometheus client library uses and for the
status page.

Read from /proc when asked (a scrape, a page), never kept: each is one small read. Where /proc
is missing (not Linux) the numbers that need it are 0, and the page says so.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from dataclasses import dataclass

from backhaul import __version__
from backhaul.metrics import METRICS

WIRE_VERSION = "v0.7.2"   # the Go program whose protocol this one speaks
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Build:
    version: str
    python: str
    wire: str

    def text(self) -> str:
        python = f"{platform.python_implementation()} {self.python}"
        return f"backhaul {self.version} ({python}; speaks Backhaul {self.wire})"


BUILD = Build(__version__, platform.python_version(), WIRE_VERSION)


def cpu_seconds() -> float:
    """User and system CPU time of every thread of the process."""
    times = os.times()
    return times.user + times.system


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1   # less the descriptor that lists them
    except OSError:
        return 0


def max_fds() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 0


def threads() -> int:
    """Threads of the process as the kernel counts them (the relays' pool, demux threads, and
    threads of no Python code alike)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Threads:"):
                    return int(line.split()[1])
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _start_time() -> float:
    """When the process started, in seconds since the epoch: the kernel's record (boot time plus
    the start in clock ticks), so a late import does not move it; else now."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # the command name may hold spaces and parentheses: count fields after the last ")"
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / _TICKS
    except (OSError, IndexError, ValueError, StopIteration):
        return time.time()


STARTED = _start_time()

METRICS.gauge("backhaul_build_info", "The running version (always 1): its release, the Python running it, "
              "and the version of the Go program whose protocol it speaks.",
              ("version", "python", "wire")).watch(lambda: [((BUILD.version, BUILD.python, BUILD.wire), 1)])
METRICS.sourced_counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.").watch(
    cpu_seconds)
METRICS.gauge("process_resident_memory_bytes", "Resident memory size in bytes.").watch(resident_bytes)
METRICS.gauge("process_open_fds", "Number of open file descriptors.").watch(open_fds)
METRICS.gauge("process_max_fds", "Maximum number of open file descriptors.").watch(max_fds)
METRICS.gauge("process_threads", "Number of OS threads in the process.").watch(threads)
METRICS.gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.").watch(
    lambda: STARTED)
