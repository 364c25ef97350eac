"""Target services of the benchmark, each run as its own process.

    python services.py echo            echo every byte back; hold the connection until the peer closes;
                                       and every UDP datagram to the same port number
    python services.py reqrep [-w N]   answer each request line with a short reply (N forked workers)
    python services.py sink            swallow bytes; report each connection's count when it ends

Each prints `PORT <n>` once it listens on an ephemeral loopback port.
"""

import argparse
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable

from common import announce, listen, raise_nofile_limit

REQUEST = b"GET\n"
REPLY = b"OK\n"
SINK_BUFFER = 1 << 20
# The driver ends services itself; this only bounds one orphaned by a driver killed with SIGKILL.
MAX_LIFETIME = 1800

# Turns received bytes into bytes to send; keeps per-connection state in the given bytearray.
Handler = Callable[[bytes, bytearray], bytes]


def echo_handler(data: bytes, _state: bytearray) -> bytes:
    return data


def reqrep_handler(data: bytes, state: bytearray) -> bytes:
    """Reply once per complete request line, however the bytes were split."""
    state += data
    lines = state.count(b"\n")
    if not lines:
        return b""
    del state[: state.rfind(b"\n") + 1]
    return REPLY * lines


class _Conn:
    __slots__ = ("sock", "state", "out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = bytearray()
        self.out = bytearray()


def serve_events(listener: socket.socket, handler: Handler) -> None:
    """Event loop for echo and request/reply: non-blocking, so thousands of held connections cost no threads."""
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, mask in sel.select():
            if key.data is None:
                _accept_all(sel, listener)
            else:
                _service(sel, key.data, mask, handler)


def _accept_all(sel: selectors.BaseSelector, listener: socket.socket) -> None:
    # Drain the backlog in one go; with several workers another one may win the race.
    for _ in range(256):
        try:
            sock, _addr = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            time.sleep(0.01)  # e.g. out of fds: back off instead of spinning
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ, _Conn(sock))


def _service(sel: selectors.BaseSelector, conn: _Conn, mask: int, handler: Handler) -> None:
    try:
        if mask & selectors.EVENT_READ:
            data = conn.sock.recv(65536)
            if not data:
                _close(sel, conn)
                return
            conn.out += handler(data, conn.state)
        if conn.out:
            sent = conn.sock.send(conn.out)
            del conn.out[:sent]
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        _close(sel, conn)
        return
    # Only ask for writability while output is pending, else the loop would spin.
    want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
    if sel.get_key(conn.sock).events != want:
        sel.modify(conn.sock, want, conn)


def _close(sel: selectors.BaseSelector, conn: _Conn) -> None:
    sel.unregister(conn.sock)
    conn.sock.close()


def serve_udp_echo(port: int) -> None:
    """Echo every datagram to its sender, on the UDP port of the same number (a thread)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))

    def serve() -> None:
        while True:
            data, addr = sock.recvfrom(65536)
            try:
                sock.sendto(data, addr)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()


def serve_sink(listener: socket.socket) -> None:
    """Thread per connection; each reports bytes and first/last byte times when its peer is done."""
    lock = threading.Lock()
    while True:
        sock, _addr = listener.accept()
        threading.Thread(target=_sink_one, args=(sock, lock), daemon=True).start()


def _sink_one(sock: socket.socket, lock: threading.Lock) -> None:
    buf = bytearray(SINK_BUFFER)
    total, first, last = 0, 0.0, 0.0
    with sock:
        while True:
            try:
                n = sock.recv_into(buf)
            except OSError:
                break
            if not n:
                break
            # CLOCK_MONOTONIC is system-wide, so the driver can merge times of several connections.
            last = time.monotonic()
            if not total:
                first = last
            total += n
    with lock:
        announce("CONN", {"bytes": total, "first": first, "last": last})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("echo", "reqrep", "sink"))
    parser.add_argument("-w", "--workers", type=int, default=1, help="processes sharing the listener")
    args = parser.parse_args()
    raise_nofile_limit()
    listener = listen()
    announce("PORT", str(listener.getsockname()[1]))
    if args.kind == "sink":
        signal.alarm(MAX_LIFETIME)
        serve_sink(listener)
    handler = echo_handler if args.kind == "echo" else reqrep_handler
    if args.kind == "echo":
        serve_udp_echo(listener.getsockname()[1])
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break  # the child serves too; the driver ends the whole group
    signal.alarm(MAX_LIFETIME)  # after fork: children do not inherit alarms
    serve_events(listener, handler)


if __name__ == "__main__":
    main()
