"""Shared fixtures: every test must leave no thread, socket, pipe or process behind."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from backhaul.reactor import Reactor
from tests import contention

# The fixtures every end-to-end module uses, defined with the harness they belong to.
from tests.harness import echo_service, launcher, listener, relay_launcher, udp_echo  # noqa: F401


def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            fds[fd] = target
    return fds


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto``: three workers a core, at most 24. Most of a test's time is spent waiting on
    the processes it started (handshakes, retries, timers), so one worker a core would leave the
    cores idle; past 24, each worker's slice of ports (tests/harness.py) would grow thin.
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return min(3 * len(os.sched_getaffinity(0)), 24)


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a thread running or a socket or pipe open in this process."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + 3.0
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
    leaked_threads = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    fds_after = _open_fds()
    leaked_fds = {fd: t for fd, t in fds_after.items() if fds_before.get(fd) != t}
    assert not leaked_threads, f"threads left running: {leaked_threads}"
    assert not leaked_fds, f"sockets or pipes left open: {leaked_fds}"


@pytest.fixture(scope="session", autouse=True)
def contention_mode():
    """BACKHAUL_CONTENTION=1: a busy loop on each core for the whole run (tests/contention.py)."""
    if not contention.ENABLED:
        yield
        return
    with contention.BusyLoops():
        yield


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    """A started reactor with two workers; stopped and closed after the test."""
    r = Reactor(workers=2)
    r.start()
    yield r
    r.stop()
    r.close()
