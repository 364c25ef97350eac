"""The plain relay baseline: the simplest honest TCP relay in Python.

    python relay.py TARGET_PORT [--listen PORT]

One accept thread; per connection it dials the target and starts one thread per
direction, each moving data with recv/sendall and 64 KiB buffers. Prints
`PORT <n>` once it listens.
"""

import argparse
import signal
import socket
import threading
import time

from common import HOST, announce, listen, raise_nofile_limit

BUFFER = 64 * 1024
# The driver ends the relay itself; this only bounds one orphaned by a driver killed with SIGKILL.
MAX_LIFETIME = 1800


class _Pair:
    """Both sockets of one relayed connection; the last direction to finish closes them."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self.socks = (a, b)
        self._lock = threading.Lock()
        self._open_directions = 2

    def direction_done(self) -> None:
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            for sock in self.socks:
                sock.close()


def pump(src: socket.socket, dst: socket.socket, pair: _Pair) -> None:
    """Copy one direction until EOF, then pass the half-close on."""
    try:
        while True:
            data = src.recv(BUFFER)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        # A reset on one side ends both directions; shutting down wakes the other thread.
        for sock in pair.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        pair.direction_done()


def handle(client: socket.socket, target_port: int) -> None:
    try:
        upstream = socket.create_connection((HOST, target_port), timeout=5)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        # Same setting as the tunnel under test gets (nodelay = true).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pair = _Pair(client, upstream)
    threading.Thread(target=pump, args=(client, upstream, pair), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client, pair), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target_port", type=int)
    parser.add_argument("--listen", type=int, default=0, metavar="PORT", help="listen on this port (default: any)")
    args = parser.parse_args()
    raise_nofile_limit()
    listener = listen(args.listen)
    announce("PORT", str(listener.getsockname()[1]))
    signal.alarm(MAX_LIFETIME)
    while True:
        try:
            client, _addr = listener.accept()
        except OSError:
            time.sleep(0.01)  # e.g. out of fds: back off instead of spinning
            continue
        handle(client, args.target_port)


if __name__ == "__main__":
    main()
