"""Byte buffers kept as lists of chunks, so bytes are neither joined on arrival nor copied
again on every partial read or partial write."""

from __future__ import annotations

from collections import deque

# A chunk this large is handed out alone, never joined: a websocket's data frame (48 KiB with its
# head). smux frames (32 KiB by default) are joined: fewer, larger writes.
LARGE = 40 * 1024


class ChunkQueue:
    """Received chunks in order, read from the front in pieces of any size; a large backlog
    read in small pieces is copied once, not once per read."""

    __slots__ = ("chunks", "offset", "size")

    def __init__(self) -> None:
        self.chunks: deque[bytes | memoryview] = deque()
        self.offset = 0   # bytes already taken from chunks[0]
        self.size = 0     # bytes not taken yet

    def __bool__(self) -> bool:
        return bool(self.size)

    def append(self, data: bytes | memoryview) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def take(self, limit: int) -> bytes | memoryview:
        """Up to ``limit`` bytes from the front (a chunk itself when it is all that is asked).
        Small chunks are joined into one piece; a chunk of LARGE bytes or more comes alone, as
        it is: joining it would copy it once more to gain nothing (a websocket's messages)."""
        pieces = []
        taken = 0
        chunks = self.chunks
        while taken < limit and chunks:
            head = chunks[0]
            start = self.offset
            avail = len(head) - start
            if avail >= LARGE and pieces:
                break  # it comes alone, next time
            count = min(avail, limit - taken)
            if count == avail:
                pieces.append(head[start:] if start else head)
                chunks.popleft()
                self.offset = 0
            else:
                pieces.append(head[start : start + count])
                self.offset = start + count
            taken += count
            if avail >= LARGE:
                break
        self.size -= taken
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def clear(self) -> None:
        self.chunks.clear()
        self.offset = 0
        self.size = 0


def advance(buffers: list[bytes | bytearray | memoryview], sent: int) -> None:
    """Drop what a gathered write sent from the front of ``buffers``."""
    done = 0
    for buf in buffers:
        size = len(buf)
        if sent < size:
            break
        sent -= size
        done += 1
    del buffers[:done]
    if sent:
        buffers[0] = memoryview(buffers[0])[sent:]
