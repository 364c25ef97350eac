"""The frames an smux session has to send, in the order that keeps every stream moving.

Control frames (NOP, UPD) go first, as smux sends them. Data frames (SYN, PSH, FIN) wait in one
queue per stream, so a stream's frames keep their order (a FIN never overtakes its data), and
the streams take turns: each turn a stream sends up to QUANTUM bytes, at least one frame. One
round is one or more whole passes over the streams with frames queued, until ROUND_BYTES were
taken: a stream that queues a frame while another has a megabyte queued sends it in the next
round, not after the megabyte.
"""

from __future__ import annotations

from collections import deque

QUANTUM = 16 * 1024     # a stream's share of one pass: a bulk stream sends one frame, a request all of it
ROUND_BYTES = 64 * 1024  # what one round takes at least, unless less is queued

Buffer = bytes | memoryview


class Outbox:
    """Queued frames: ``control`` (sent first, in order) and each stream's data frames."""

    __slots__ = ("control", "bytes", "_queues", "_ring")

    def __init__(self) -> None:
        self.control: list[Buffer] = []
        self.bytes = 0  # data frames queued, heads included
        self._queues: dict[int, deque[tuple[Buffer, Buffer | None]]] = {}
        self._ring: deque[int] = deque()  # streams with frames queued, in their turn's order

    def __bool__(self) -> bool:
        return bool(self.control or self._ring)

    def holds(self, sid: int) -> bool:
        """Stream ``sid`` has data frames queued."""
        return sid in self._queues

    def push(self, sid: int, head: Buffer, payload: Buffer | None = None) -> None:
        """Queue a data frame of stream ``sid``: its head, and its payload as a buffer of its own."""
        queue = self._queues.get(sid)
        if queue is None:
            queue = self._queues[sid] = deque()
            self._ring.append(sid)
        queue.append((head, payload))
        self.bytes += len(head) + (len(payload) if payload is not None else 0)

    def take(self, budget: int = ROUND_BYTES) -> list[Buffer]:
        """One round: the control frames, then whole passes over the streams until ``budget``
        bytes of data were taken or none are left. The buffers leave the outbox."""
        out = self.control[:]
        self.control.clear()
        ring, queues = self._ring, self._queues
        taken = 0
        while ring and taken < budget:
            for _ in range(len(ring)):
                sid = ring.popleft()
                queue = queues[sid]
                turn = 0
                while queue and turn < QUANTUM:
                    head, payload = queue.popleft()
                    out.append(head)
                    turn += len(head)
                    if payload is not None:
                        out.append(payload)
                        turn += len(payload)
                taken += turn
                if queue:
                    ring.append(sid)
                else:
                    del queues[sid]
        self.bytes -= taken
        return out
