"""Logging set-up: logrus level names from the config, one line per event.

Under systemd (JOURNAL_STREAM set) the journal adds its own timestamp, so we leave ours out.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from backhaul.config import python_log_level


def setup(level: str = "info") -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("backhaul")
    root.handlers[:] = [handler]
    root.setLevel(python_log_level(level))
    root.propagate = False


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
