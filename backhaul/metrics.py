"""Counters and gauges for the status page and ``/metrics`` (Prometheus text format, 0.0.4).

Counters are bumped from any thread (reactor, workers, demux threads), so each takes a lock for
the one addition. Gauges are read when the page is asked for: a function registered by whoever
owns the number (a pool's length, a map of sessions), never a copy to keep in step.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator

LabelValues = tuple[str, ...]
GaugeSource = Callable[[], float | Iterable[tuple[LabelValues, float]]]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 2**53):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _sample(name: str, labels: tuple[str, ...], values: LabelValues, value: float) -> str:
    if not labels:
        return f"{name} {_number(value)}"
    inner = ",".join(f'{key}="{_escape(str(val))}"' for key, val in zip(labels, values, strict=True))
    return f"{name}{{{inner}}} {_number(value)}"


class Counter:
    """A number that only goes up, one per label combination."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = labels
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, *values: str) -> None:
        """Add ``amount`` for the label ``values`` (as many as the counter has labels)."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {values}")
        with self._lock:
            self._values[values] = self._values.get(values, 0) + amount

    def value(self, *values: str) -> float:
        with self._lock:
            return self._values.get(values, 0)

    def samples(self) -> list[tuple[LabelValues, float]]:
        """Every label combination counted so far; an unlabelled counter shows 0 from the start
        (a series that appears only at its first event hides that event from rate())."""
        with self._lock:
            if not self.labels and not self._values:
                return [((), 0)]
            return sorted(self._values.items())


class Gauge:
    """A number read from its owners when asked: the sum over every registered source."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = labels
        self._sources: list[GaugeSource] = []
        self._lock = threading.Lock()

    def watch(self, source: GaugeSource) -> Callable[[], None]:
        """Read ``source`` on every scrape (a number, or ``(label values, number)`` pairs when
        the gauge has labels); returns the call that stops reading it."""
        with self._lock:
            self._sources.append(source)

        def unwatch() -> None:
            with self._lock:
                if source in self._sources:
                    self._sources.remove(source)
        return unwatch

    def samples(self) -> list[tuple[LabelValues, float]]:
        with self._lock:
            sources = list(self._sources)
        totals: dict[LabelValues, float] = {}
        for source in sources:
            got = source()
            if isinstance(got, int | float):
                totals[()] = totals.get((), 0) + got
            else:
                for values, number in got:
                    totals[values] = totals.get(values, 0) + number
        if not self.labels and () not in totals:
            totals[()] = 0
        return sorted(totals.items())


class SourcedCounter(Gauge):
    """A counter whose owners keep the number (bytes the running relays moved) and are read on
    every scrape, as a gauge's are; only owners whose numbers never go down may feed one."""

    kind = "counter"


class Registry:
    """Every metric of one process, in the order they were made."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._get(Counter, name, help_text, labels)  # type: ignore[return-value]

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Gauge:
        return self._get(Gauge, name, help_text, labels)  # type: ignore[return-value]

    def sourced_counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> SourcedCounter:
        return self._get(SourcedCounter, name, help_text, labels)  # type: ignore[return-value]

    def _get(self, kind: type, name: str, help_text: str, labels: tuple[str, ...]) -> Counter | Gauge:
        """One metric per name: modules that share one (several transports count the same
        thing) get the same object."""
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = kind(name, help_text, labels)
            elif type(metric) is not kind or metric.labels != labels:
                raise ValueError(f"metric {name} exists as a {metric.kind} with labels {metric.labels}")
            return metric

    def __iter__(self) -> Iterator[Counter | Gauge]:
        with self._lock:
            return iter(list(self._metrics.values()))

    def render(self) -> str:
        """The exposition text: HELP, TYPE, then one line per sample."""
        lines: list[str] = []
        for metric in self:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            for values, number in metric.samples():
                lines.append(_sample(metric.name, metric.labels, values, number))
        return "\n".join(lines) + "\n"


METRICS = Registry()   # the process's metrics; everything counts into this one
