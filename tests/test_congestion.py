"""congestion = NAME: the tunnel's own TCP connections (control channel, data connections, smux
sessions), on both sides, carry that congestion control; a name the kernel refuses costs one
warning per process naming it and the kernel's list, and the tunnel runs on the host's default."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator

import pytest

from tests import harness
from tests.harness import Backhaul, Launcher, Tunnel, echo_works, wait_until

pytestmark = pytest.mark.timeout(60)


SYS_PIDFD_GETFD = 438  # the same number on every architecture (the generic table, Linux 5.6)
CA_NAME_MAX = 16


def kernel_list(name: str) -> list[str]:
    try:
        with open(f"/proc/sys/net/ipv4/{name}") as file:
            return file.read().split()
    except OSError:
        return []


def other_than_default() -> str:
    """An algorithm this kernel has that new sockets do not get by default ("" when none)."""
    default = "".join(kernel_list("tcp_congestion_control"))
    choices = [name for name in kernel_list("tcp_available_congestion_control") if name != default]
    return "reno" if "reno" in choices else (choices[0] if choices else "")


def borrowed_sockets(process: Backhaul) -> Iterator[socket.socket]:
    """Each TCP socket of ``process``, as a duplicate of its descriptor in this one (pidfd_getfd:
    the very socket, so getsockopt reads what the process set). Closed by the caller."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(process.pid)
    try:
        for name in os.listdir(f"/proc/{process.pid}/fd"):
            try:
                if not os.readlink(f"/proc/{process.pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue  # closed meanwhile
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                code = ctypes.get_errno()
                if code == errno.EBADF:
                    continue
                pytest.skip(f"cannot borrow another process's socket here: {os.strerror(code)}")
            sock = socket.socket(fileno=fd)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                yield sock
            else:
                sock.close()
    finally:
        os.close(pidfd)


def tunnel_congestion(process: Backhaul, bind_port: int) -> list[tuple[str, str]]:
    """(local -> peer, algorithm) of each socket of ``process`` that is the tunnel's own: the
    server's listener and what it accepted on bind_port, or what the client dialed to it."""
    found = []
    for sock in borrowed_sockets(process):
        with sock:
            local = sock.getsockname()
            try:
                peer = sock.getpeername()
            except OSError:
                peer = ("", 0)   # a listener
            if bind_port not in (local[1], peer[1]):
                continue
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CA_NAME_MAX)
            found.append((f"{local[1]} -> {peer[1]}", raw.rstrip(b"\0").decode()))
    return found


@pytest.mark.parametrize("transport", ["tcp", "tcpmux", "ws"])
def test_tunnel_sockets_carry_the_configured_algorithm(launcher: Launcher, echo_service: harness.Service,
                                                       transport: str) -> None:
    """Catches: a side, or a transport's dial (tcp links, smux sessions, WebSocket connections, the
    control channel) that leaves its socket on the host's congestion control."""
    name = other_than_default()
    if not name:
        pytest.skip("the kernel offers no congestion control but its default")
    extra = {"congestion": name, "connection_pool": 2}
    tunnel = Tunnel(launcher, [f"127.0.0.1:{echo_service.port}"], transport=transport,
                    server_extra=extra, client_extra=extra).up()
    echo_works(tunnel.public[0], size=256 * 1024)
    assert tunnel.server is not None and tunnel.client is not None
    for process, least in ((tunnel.server, 3), (tunnel.client, 2)):   # listener + control + a link
        sockets = wait_until(lambda p=process, n=least: (found := tunnel_congestion(p, tunnel.bind_port))
                             and len(found) >= n and found, 10, f"the tunnel's sockets of {process.name}")
        wrong = [(where, got) for where, got in sockets if got != name]
        assert not wrong, f"{process.name}: not {name}: {wrong}"
    assert not tunnel.server.lines("congestion") and not tunnel.client.lines("congestion")


def test_a_refused_algorithm_is_one_line_and_the_tunnel_runs(launcher: Launcher,
                                                               echo_service: harness.Service) -> None:
    """Catches: a name the kernel does not have failing the connection or the start, a warning per
    socket (the pool dials several), or a line that does not say what the kernel has."""
    extra = {"congestion": "nosuchcc", "connection_pool": 4}
    tunnel = Tunnel(launcher, [f"127.0.0.1:{echo_service.port}"], server_extra=extra, client_extra=extra).up()
    echo_works(tunnel.public[0])
    echo_works(tunnel.public[0], seed=1)
    available = " ".join(kernel_list("tcp_available_congestion_control"))
    assert tunnel.server is not None and tunnel.client is not None
    for process in (tunnel.server, tunnel.client):
        lines = process.lines("congestion")
        assert len(lines) == 1, process.log()
        assert "'nosuchcc'" in lines[0] and f"available: {available}" in lines[0], lines[0]
        assert "host's is used" in lines[0], lines[0]

