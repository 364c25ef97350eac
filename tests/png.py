"""Just enough PNG reading to check a browser's screenshot: 8-bit RGB or RGBA, not interlaced
(what Chromium writes), decoded with zlib alone, and a count of the pixels near a colour."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Image:
    def __init__(self, width: int, height: int, channels: int, pixels: bytes) -> None:
        self.width = width
        self.height = height
        self.channels = channels
        self.pixels = pixels   # rows top to bottom, ``channels`` bytes a pixel

    def count_near(self, colour: str, tolerance: int = 24, box: tuple[int, int, int, int] | None = None) -> int:
        """Pixels within ``tolerance`` of ``colour`` ("#rrggbb") in every channel, in ``box``
        (left, top, right, bottom) or the whole image."""
        want = bytes.fromhex(colour.lstrip("#"))
        left, top, right, bottom = box or (0, 0, self.width, self.height)
        step = self.channels
        found = 0
        for y in range(max(top, 0), min(bottom, self.height)):
            row = self.pixels[y * self.width * step:(y + 1) * self.width * step]
            for x in range(max(left, 0), min(right, self.width)):
                at = x * step
                if (abs(row[at] - want[0]) <= tolerance and abs(row[at + 1] - want[1]) <= tolerance
                        and abs(row[at + 2] - want[2]) <= tolerance):
                    found += 1
        return found


def read(path: Path) -> Image:
    data = path.read_bytes()
    assert data.startswith(SIGNATURE), "not a PNG"
    at = len(SIGNATURE)
    header = b""
    compressed = bytearray()
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        at += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            compressed += body
        elif kind == b"IEND":
            break
    width, height, depth, colour_type, _c, _f, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour_type in (2, 6) and not interlace, f"unsupported PNG {depth=} {colour_type=}"
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(bytes(compressed))
    stride = width * channels
    out = bytearray(stride * height)
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        out[y * stride:(y + 1) * stride] = line
        previous = line
    return Image(width, height, channels, bytes(out))


def _unfilter(kind: int, line: bytearray, previous: bytearray, step: int) -> None:
    if kind == 0:
        return
    if kind == 2:
        for i in range(len(line)):
            line[i] = (line[i] + previous[i]) & 0xFF
        return
    for i in range(len(line)):
        left = line[i - step] if i >= step else 0
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            up = previous[i]
            corner = previous[i - step] if i >= step else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        else:
            raise AssertionError(f"bad PNG filter {kind}")
