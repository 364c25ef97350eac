"""UDP sockets on the reactor: a shared socket that sorts datagrams by source address, and the
peers a UDP flow talks to (an address on a shared socket, or a connected socket of its own).

Every datagram is read and sent on the reactor thread, in batches; no thread per flow. A datagram
longer than MAX_DATAGRAM is dropped and counted, never cut: the Go peers refuse longer frames.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
from collections.abc import Callable, Iterator

from backhaul.errors import TransportError
from backhaul.log import Throttles
from backhaul.metrics import METRICS
from backhaul.net import bind_source, is_numeric
from backhaul.protocol.udp_frames import MAX_DATAGRAM
from backhaul.reactor import READ, Reactor
from backhaul.resolver import Address, Resolver

log = logging.getLogger("backhaul.udp.sockets")

SOCKET_BUFFER = 4 * 1024 * 1024   # asked for each UDP socket's queues; the kernel caps it (rmem_max)
READ_BATCH = 64                   # datagrams per readiness event, so one busy socket cannot starve others
QUEUE_DATAGRAMS = 256             # a flow's datagrams kept while it has nowhere to go yet...
QUEUE_BYTES = 256 * 1024          # ...and their bytes
BUDGET = 64 * 1024 * 1024         # bytes of datagrams all flows together keep waiting in our memory

# Linux sends a run of datagrams of one size (the last one may be shorter) in one call with
# UDP_SEGMENT: the receiver still gets each datagram on its own. Sending is most of what a relay
# of many datagrams costs, one system call each otherwise.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
GSO = sys.platform.startswith("linux")
GSO_SEGMENTS = 64                 # the kernel's most per call
GSO_BYTES = 65000                 # under the largest UDP payload, IPv4 or IPv6

DROPPED = METRICS.counter("backhaul_udp_datagrams_dropped_total",
                          "UDP datagrams dropped, by reason", ("reason",))
FLOWS = METRICS.gauge("backhaul_udp_flows", "UDP flows open, by side", ("side",))
WARN = Throttles(log)

# Reactor thread only: one buffer large enough for any UDP datagram, so a long one is seen whole.
_SCRATCH = bytearray(65536)
_VIEW = memoryview(_SCRATCH)

OnDatagrams = Callable[[list[bytes]], None]   # datagrams read in one go, in order
OnLost = Callable[[str], None]
OnUnknown = Callable[[tuple, bytes], None]
Opened = Callable[[socket.socket | None, str], None]


class Budget:
    """Bytes of datagrams waiting in this process (queues of flows, backlogs of tunnel connections),
    bounded in all so that many flows cannot add up to too much memory; reactor thread only."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


BUFFERED = Budget(BUDGET)


def runs(datagrams: list[bytes]) -> Iterator[tuple[int, int, int]]:
    """(start, end, size): consecutive datagrams that can leave in one UDP_SEGMENT call of
    ``size``: equal sizes, then at most one shorter, within the kernel's bounds. An empty
    datagram is a run of its own (a segment size of 0 is no size)."""
    count, start = len(datagrams), 0
    while start < count:
        size = len(datagrams[start])
        end, total = start + 1, size
        while (size and end < count and end - start < GSO_SEGMENTS and len(datagrams[end]) == size
               and total + size <= GSO_BYTES):
            total += size
            end += 1
        if size and end < count and end - start < GSO_SEGMENTS and 0 < len(datagrams[end]) < size \
                and total + len(datagrams[end]) <= GSO_BYTES:
            end += 1
        yield start, end, size
        start = end


class Sender:
    """Sends datagrams on one socket (to ``addr`` when it is not connected), runs of them in one
    call where the kernel can; where it cannot (no UDP_SEGMENT, a route without checksum
    offload, datagrams past the MTU), one by one. A datagram the socket refuses is dropped and
    counted."""

    __slots__ = ("sock", "name", "gso")

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.gso = GSO

    def one(self, data: bytes, addr: tuple | None = None) -> None:
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
        except OSError as exc:  # full, or refused by the host: UDP may drop, but it is counted
            drop("send_failed", "dropped a datagram to %s: %s", show(addr) if addr else self.name,
                 (exc.strerror or str(exc)).lower())

    def many(self, datagrams: list[bytes], addr: tuple | None = None) -> None:
        if not self.gso or len(datagrams) < 2:
            for data in datagrams:
                self.one(data, addr)
            return
        for start, end, size in runs(datagrams):
            if end - start == 1 or not size or not self._run(datagrams[start:end], size, addr):
                for data in datagrams[start:end]:
                    self.one(data, addr)

    def _run(self, batch: list[bytes], size: int, addr: tuple | None) -> bool:
        """One call for ``batch``; False when this socket cannot (then never again)."""
        control = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        try:
            if addr is None:
                self.sock.sendmsg(batch, control)
            else:
                self.sock.sendmsg(batch, control, 0, addr)
        except BlockingIOError:
            DROPPED.inc(len(batch), "send_failed")
            WARN.warning("send_failed", "dropped %d datagrams to %s: the socket is full", len(batch),
                         show(addr) if addr else self.name)
        except OSError as exc:
            log.debug("no UDP_SEGMENT to %s: %s", show(addr) if addr else self.name, exc)
            self.gso = False
            return False
        return True


def drop(reason: str, fmt: str, *args: object) -> None:
    """Count a dropped datagram under ``reason`` and say so (one line a second per reason)."""
    DROPPED.inc(1, reason)
    WARN.warning(reason, fmt, *args)


def show(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sized(sock: socket.socket) -> socket.socket:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError as exc:
            log.debug("UDP socket buffer refused: %s", exc)
    sock.setblocking(False)
    return sock


def bind_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to host:port; TransportError names the address."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM,
                                                   flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_DGRAM)
    except OSError as exc:
        raise TransportError(f"cannot listen on UDP {shown}: {exc.strerror or exc}") from None
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on UDP {shown}: {(exc.strerror or str(exc)).lower()}") from None
    return _sized(sock)


def connected_udp(family: int, addr: tuple[str, int], source: str = "") -> socket.socket:
    """A non-blocking UDP socket connected to ``addr``, from the local address ``source`` when
    given (OSError when that fails)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        bind_source(sock, source)
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return _sized(sock)


def open_udp(reactor: Reactor, resolver: Resolver, host: str, port: int, timeout: float, done: Opened) -> None:
    """A UDP socket connected to host:port: ``done(sock, "")`` or ``done(None, reason)`` on the
    reactor thread, once. A host name is looked up on the resolver's threads first."""

    def opened(result: Address | None, why: str) -> None:
        if result is None:
            done(None, why)
            return
        family, addr = result
        try:
            sock = connected_udp(family, addr)
        except OSError as exc:
            done(None, f"cannot open UDP to {addr[0]}:{addr[1]}: {(exc.strerror or str(exc)).lower()}")
            return
        done(sock, "")

    if is_numeric(host):
        opened((socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port)), "")
    else:
        resolver.lookup(host, port, timeout, opened)


class Peer:
    """One UDP end of a flow. Datagrams are handed on in batches (those read in one go, in
    order); those that arrive before ``listen`` are kept, within bounds, and come first."""

    __slots__ = ("name", "closed", "_on_datagrams", "_on_lost", "_queue", "_queued")

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self._on_datagrams: OnDatagrams | None = None
        self._on_lost: OnLost | None = None
        self._queue: list[bytes] | None = None
        self._queued = 0

    def listen(self, on_datagrams: OnDatagrams, on_lost: OnLost) -> None:
        """Take every datagram from now on (those kept come first); ``on_lost`` once if the peer
        is ended from outside (evicted, its socket failed)."""
        self._on_datagrams = on_datagrams
        self._on_lost = on_lost
        queue, self._queue = self._queue, None
        BUFFERED.give(self._queued)
        self._queued = 0
        if queue and not self.closed:
            on_datagrams(queue)

    def deliver(self, batch: list[bytes]) -> None:
        """Datagrams from this peer's far end, in order."""
        if self._on_datagrams is not None:
            self._on_datagrams(batch)
            return
        if self._queue is None:
            self._queue = []
        for data in batch:
            if (len(self._queue) >= QUEUE_DATAGRAMS or self._queued + len(data) > QUEUE_BYTES
                    or not BUFFERED.take(len(data))):
                drop("queue", "dropped a datagram from %s: %d datagrams (%d bytes) already wait for the "
                     "tunnel", self.name, len(self._queue), self._queued)
                continue
            self._queue.append(data)
            self._queued += len(data)

    def lose(self, reason: str) -> None:
        """End the peer from outside: whoever listens hears ``reason`` and closes it."""
        on_lost = self._on_lost
        if on_lost is None:
            self.close()
        else:
            on_lost(reason)

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def send_many(self, datagrams: list[bytes]) -> None:
        """Send datagrams in order, each on its own (boundaries kept), in as few calls as may be."""
        for data in datagrams:
            self.send(data)

    def close(self) -> None:
        self.closed = True
        self._on_datagrams = self._on_lost = None
        self._queue = None
        BUFFERED.give(self._queued)
        self._queued = 0


class DatagramSocket:
    """A bound UDP socket shared by many peers, each one source address: datagrams from a known
    address go to its peer, others to ``on_unknown``; reactor thread only."""

    __slots__ = ("reactor", "sock", "name", "on_unknown", "peers", "sender")

    def __init__(self, reactor: Reactor, sock: socket.socket, name: str, on_unknown: OnUnknown) -> None:
        self.reactor = reactor
        self.sock = sock
        self.name = name
        self.on_unknown = on_unknown
        self.peers: dict[tuple, AddressPeer] = {}
        self.sender = Sender(sock, name)

    def start(self) -> None:
        self.reactor.watch(self.sock, READ, self._ready)

    def _ready(self, _mask: int) -> None:
        recv, peers = self.sock.recvfrom_into, self.peers
        batches: dict[AddressPeer, list[bytes]] = {}
        for _ in range(READ_BATCH):
            try:
                size, addr = recv(_SCRATCH)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # an ICMP error reported late: the socket itself is fine
                log.debug("UDP read on %s: %s", self.name, exc)
                continue
            if size > MAX_DATAGRAM:
                drop("too_large", "dropped a datagram of %d bytes from %s on %s: longer than %d", size,
                     show(addr), self.name, MAX_DATAGRAM)
                continue
            data = _VIEW[:size].tobytes()
            peer = peers.get(addr)
            if peer is None:
                self.on_unknown(addr, data)   # may make it a peer: its next datagrams go in a batch
            elif peer in batches:
                batches[peer].append(data)
            else:
                batches[peer] = [data]
        for peer, batch in batches.items():
            if not peer.closed:
                peer.deliver(batch)

    def close(self) -> None:
        for peer in list(self.peers.values()):
            peer.lose(f"{self.name} closed")
        self.peers.clear()
        self.reactor.close_socket(self.sock)


class AddressPeer(Peer):
    """A far end known by its address on a shared socket: a user on a public port, or a client's
    link on the udp transport's tunnel port."""

    __slots__ = ("shared", "addr")

    def __init__(self, shared: DatagramSocket, addr: tuple, name: str) -> None:
        super().__init__(name)
        self.shared = shared
        self.addr = addr
        shared.peers[addr] = self

    def send(self, data: bytes) -> None:
        self.shared.sender.one(data, self.addr)

    def send_many(self, datagrams: list[bytes]) -> None:
        self.shared.sender.many(datagrams, self.addr)

    def forget(self) -> None:
        """Datagrams from this address no longer come here (a new peer may take it)."""
        if self.shared.peers.get(self.addr) is self:
            del self.shared.peers[self.addr]

    def close(self) -> None:
        if not self.closed:
            self.forget()
        super().close()


class ConnectedPeer(Peer):
    """A far end with a connected UDP socket of its own: the client's socket to a target, or a
    client's link to the udp transport's tunnel port."""

    __slots__ = ("reactor", "sock", "sender")

    def __init__(self, reactor: Reactor, sock: socket.socket, name: str) -> None:
        super().__init__(name)
        self.reactor = reactor
        self.sock = sock
        self.sender = Sender(sock, name)

    def listen(self, on_datagrams: OnDatagrams, on_lost: OnLost) -> None:
        super().listen(on_datagrams, on_lost)
        if not self.closed:
            self.reactor.watch(self.sock, READ, self._ready)

    def _ready(self, _mask: int) -> None:
        recv = self.sock.recv_into
        batch: list[bytes] = []
        failed = ""
        for _ in range(READ_BATCH):
            try:
                size = recv(_SCRATCH)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue  # an earlier datagram found nobody listening; this socket still works
            except OSError as exc:
                failed = f"UDP socket to {self.name} failed: {(exc.strerror or str(exc)).lower()}"
                break
            if size > MAX_DATAGRAM:
                drop("too_large", "dropped a datagram of %d bytes from %s: longer than %d", size, self.name,
                     MAX_DATAGRAM)
                continue
            batch.append(_VIEW[:size].tobytes())
        if batch:
            self.deliver(batch)
        if failed and not self.closed:
            self.lose(failed)

    def send(self, data: bytes) -> None:
        self.sender.one(data)

    def send_many(self, datagrams: list[bytes]) -> None:
        self.sender.many(datagrams)

    def close(self) -> None:
        if not self.closed:
            self.reactor.close_socket(self.sock)
        super().close()
