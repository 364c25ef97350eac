"""The Prometheus text format (0.0.4), checked line by line: what /metrics must serve."""

from __future__ import annotations

import re

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|[+-]Inf|NaN)"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? ({_VALUE})(?: -?\d+)?$")
_HELP = re.compile(rf"^# HELP ({_NAME}) (.*)$")
_TYPE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Check ``text`` line by line against the Prometheus text format 0.0.4 and return its samples."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    current = ""
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if match := _HELP.match(line):
            assert match.group(1) not in helped, f"HELP twice: {where}"
            helped.add(match.group(1))
            current = match.group(1)
        elif match := _TYPE.match(line):
            name = match.group(1)
            assert name not in typed, f"TYPE twice: {where}"
            assert not any(key[0] == name for key in samples), f"TYPE after its samples: {where}"
            typed[name] = match.group(2)
            current = name
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample, HELP or TYPE: {where}"
            name, labels, value = match.groups()
            assert name == current, f"a sample outside its family's block: {where}"
            assert name in typed, f"a sample without TYPE: {where}"
            if typed[name] == "counter":
                assert name.endswith("_total"), f"a counter's name should end in _total: {where}"
            pairs = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
            assert len({key for key, _ in pairs}) == len(pairs), f"a label twice: {where}"
            key = (name, pairs)
            assert key not in samples, f"a sample twice: {where}"
            samples[key] = float(value)
    return samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(labels.items())), 0.0)
