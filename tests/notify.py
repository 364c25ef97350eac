"""The service manager's side of sd_notify, for the tests of the systemd integration."""

from __future__ import annotations

import os
import socket
import time

import pytest

REQUIRED = os.environ.get("BACKHAUL_REQUIRE_TOOLS") == "1"   # CI installs the tools: never skip there


class NotifySocket:
    """The service manager's end: a datagram socket the program's messages arrive on."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.unread: list[tuple[float, str]] = []   # arrived behind the one ``wait_for`` returned

    def messages(self, seconds: float) -> list[tuple[float, str]]:
        """Every message not read yet and every one that arrives within ``seconds``, with the time
        it arrived."""
        got, self.unread = self.unread, []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                break
        return got

    def wait_for(self, field: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            batch = self.messages(min(left, 0.2))
            for index, (_, message) in enumerate(batch):
                if field in message.split("\n"):
                    self.unread = batch[index + 1:]
                    return message
        pytest.fail(f"no {field} within {timeout:g} s")

    def close(self) -> None:
        self.sock.close()
