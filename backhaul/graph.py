"""The status page's traffic graphs: inline SVG drawn on the server from ``History.rates``
points, so the page needs no script and no asset from anywhere.

Each graph spans the last hour, or what there is of it in the process's first hour (at least
five minutes), now at the right edge. Traffic to the target rises above the middle line and
traffic to the user hangs below it, each step a solid block as wide as its ten seconds, both
scaled to the larger peak (said in the title, and on the wide graph in its corner): an echo's
two directions never hide each other, and a short burst is still a visible block. A port's or a
peer's graph may share the side's scale, so that a few bytes do not look like a flood.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from backhaul.history import SPAN, Point

DIRECTIONS = ("to-target", "to-user")


def svg(points: Sequence[Point] | None, label: str, *, span: int = SPAN, width: int = 180, height: int = 32,
        axis: bool = False, scale: float = 0.0, blocks: int = 0) -> str:
    """A graph of ``points``; ``axis``: with the peak and the time span written on it (the wide
    graph); ``scale``: the rate of a full half (the graph's own peak when that is higher);
    ``blocks``: at most so many blocks over the span (0: a block a step), each the mean of the
    steps it holds, so that a table of graphs stays a small page that is quick to build. None
    (not graphed, see backhaul/history.py) draws nothing but says so."""
    if points is None:
        return '<small class="nograph">not graphed</small>'
    if blocks:
        points = grouped(points, span / blocks)
    peak = peak_of(points)
    full = max(peak, scale)
    top = 12 if axis else 1        # room for the peak's label
    half = (height - top - 1) / 2
    middle = top + half

    def x(ago: float) -> str:
        return f"{width * (1 - min(ago, span) / span):.1f}"

    shapes = []
    for index, css in enumerate(DIRECTIONS):
        sign = -1 if index == 0 else 1
        corners: list[str] = []
        level = ""
        for ago, length, *rates in points:
            y = f"{middle + sign * half * rates[index] / full:.1f}" if full else f"{middle:.1f}"
            if y == level:   # the same height as the block before: it only grows
                corners[-1] = f"{x(ago)},{y}"
            else:
                corners += [f"{x(ago + length)},{y}", f"{x(ago)},{y}"]
            level = y
        if corners:
            start, end = corners[0].split(",")[0], corners[-1].split(",")[0]
            shapes.append(f'<polygon class="{css}" points="{start},{middle:.1f} {" ".join(corners)} '
                          f'{end},{middle:.1f}"/>')
    shown = span_text(span)
    text = ""
    if axis:
        text = (f'<text x="2" y="9">peak {html.escape(rate_text(peak))}</text>'
                f'<text x="{width - 2}" y="9" text-anchor="end">{shown}</text>')
    title = (f"{label}: {shown}, peak {rate_text(peak)} (up: to target, down: to user)" if points
             else f"{label}: no traffic counted yet")
    return (f'<svg class="graph" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'data-peak="{peak:.0f}" data-points="{len(points)}" data-span="{span}" '
            f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>{"".join(shapes)}'
            f'<line class="middle" x1="0" y1="{middle:.1f}" x2="{width}" y2="{middle:.1f}"/>{text}</svg>')


def grouped(points: Sequence[Point], seconds: float) -> list[Point]:
    """``points`` in blocks of ``seconds`` (by when each ends): a block's rates are the mean of
    its steps', weighted by their lengths, so a block holds the bytes its steps held."""
    blocks: list[Point] = []
    key = None
    for ago, length, to_target, to_user in points:
        bucket = int(ago // seconds)
        if bucket == key:
            _end, total, mean_target, mean_user = blocks[-1]
            both = total + length
            blocks[-1] = (ago, both, (mean_target * total + to_target * length) / both,
                          (mean_user * total + to_user * length) / both)
        else:
            blocks.append((ago, length, to_target, to_user))
            key = bucket
    return blocks


def peak_of(points: Sequence[Point] | None) -> float:
    return max((max(to_target, to_user) for *_when, to_target, to_user in points or ()), default=0.0)


def span_text(span: int) -> str:
    return "last hour" if span >= SPAN else f"last {span // 60} min"


def rate_text(rate: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if rate < 1024 or unit == "GiB":
            return f"{rate:.0f} {unit}/s" if unit == "B" else f"{rate:.1f} {unit}/s"
        rate /= 1024
    return ""  # not reached


STYLE = """
svg.graph{display:block;background:#fff;border:1px solid #e3e3e3}
svg.graph .middle{stroke:#bbb;stroke-width:.5}
svg.graph polygon{stroke:none}
svg.graph text{font:9px system-ui,sans-serif;fill:#666}
.to-target{fill:#2463b0;background:#2463b0}.to-user{fill:#d9731a;background:#d9731a}
.key{display:inline-block;width:.8em;height:.8em;border-radius:.2em;vertical-align:-.05em}
"""
