"""Logging set-up: logrus level names from the config, one line per event.

When stderr is the journal (``JOURNAL_STREAM`` names it), each line starts with its syslog
priority (``<3>`` ... ``<7>``) so journald files it at the right level, and carries no timestamp
(the journal adds its own); anywhere else lines start with the time.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

from backhaul.config import python_log_level

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" prefix
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


class JournalFormatter(logging.Formatter):
    """``<N>`` priority prefix, no timestamp: the journal stores both."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITY if record.levelno >= level), 7)
        # A traceback's lines are one journal entry each: each carries the priority too.
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def to_journal(environ: dict[str, str] | None = None, stream: object = None) -> bool:
    """True when ``stream`` (stderr) is the journal stream systemd told us about: JOURNAL_STREAM
    holds its device and inode, so a redirected stderr of a child is not mistaken for it."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        fd = (sys.stderr if stream is None else stream).fileno()  # type: ignore[attr-defined]
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


def error_line(text: str, stream: TextIO | None = None) -> None:
    """One line on stderr before logging is set up (a config refused at start or by a check):
    at priority err in the journal, where a line without a prefix would be filed as info."""
    out = sys.stderr if stream is None else stream
    prefix = "<3>" if to_journal(stream=out) else ""
    print(f"{prefix}backhaul: {text}", file=out, flush=True)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if to_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("backhaul")
    root.handlers[:] = [handler]
    root.setLevel(python_log_level(level))
    root.propagate = False


def set_level(level: str) -> None:
    """Change the level of a running program (a reload)."""
    logging.getLogger("backhaul").setLevel(python_log_level(level))


class Throttle:
    """Lets one log line through per ``interval`` seconds and counts the ones it held back,
    so a flood (a port scan, a queue overflow) costs one line a second, not one per event."""

    __slots__ = ("_next", "held", "interval", "logger")

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self.held = 0

    def allow(self) -> int | None:
        """None to hold the line back, else how many were held back before it."""
        now = time.monotonic()
        if now < self._next:
            self.held += 1
            return None
        self._next = now + self.interval
        held, self.held = self.held, 0
        return held

    def warning(self, fmt: str, *args: object) -> None:
        """Log the line unless one went out less than ``interval`` ago."""
        held = self.allow()
        if held is not None:
            self.logger.warning(fmt + (f" ({held} more like it)" if held else ""), *args)


class Throttles:
    """One ``Throttle`` per kind of event, so a flood of one kind never hides another kind."""

    __slots__ = ("_logger", "_by_kind")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._by_kind: dict[str, Throttle] = {}

    def warning(self, kind: str, fmt: str, *args: object) -> None:
        throttle = self._by_kind.get(kind)
        if throttle is None:
            throttle = self._by_kind[kind] = Throttle(self._logger)
        throttle.warning(fmt, *args)


class _Run:
    """One run of failed attempts: when the next line may go out, the gap after it, how many
    lines were held back since the last one and the last of them."""

    __slots__ = ("due", "gap", "held", "last")

    def __init__(self, due: float, gap: float) -> None:
        self.due = due
        self.gap = gap
        self.held = 0
        self.last: tuple[str, tuple[object, ...]] | None = None


class RetryLog:
    """Failed attempts to reach a server, one run of them per key (the server's address): the
    first attempt is logged, then one line after a gap that doubles up to ``longest`` seconds
    (a server down for an hour costs a line a minute, not one per retry_interval), each with
    the count it held back. ``settle`` ends the runs (connected, or stopping) and logs the
    last attempt of each run when it was held back, so the first and the last always show."""

    __slots__ = ("_logger", "_runs", "first_gap", "longest")

    def __init__(self, logger: logging.Logger, first_gap: float = 1.0, longest: float = 60.0) -> None:
        self._logger = logger
        self.first_gap = first_gap
        self.longest = longest
        self._runs: dict[str, _Run] = {}   # bounded: one per server of remote_addr

    def warning(self, key: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = _Run(now + self.first_gap, self.first_gap)
            self._logger.warning(fmt, *args)
            return
        if now < run.due:
            run.held += 1
            run.last = (fmt, args)
            return
        held = run.held
        run.gap = min(run.gap * 2, self.longest)
        run.due, run.held, run.last = now + run.gap, 0, None
        suffix = f" ({held} more like it; the next line in {run.gap:g} s at most)" if held else ""
        self._logger.warning(fmt + suffix, *args)

    def settle(self) -> None:
        """The attempts are over: each run's last attempt, if it was held back, is logged now."""
        runs, self._runs = self._runs, {}
        for run in runs.values():
            if run.last is not None:
                fmt, args = run.last
                self._logger.warning(fmt + f" (the last of {run.held} since the line before)", *args)
