"""The door of a tunnel port: which addresses are turned away unread, and the one account of a
failed handshake (the metric by reason, the address's count in the limiter, a throttled line).

Every way in (the tcp family's handshakes, the WebSocket upgrades and their challenge, the
datagrams that would open a UDP link, the connections evicted to make room) asks the same gate,
so a failure costs an address the same wherever it happened. The addresses of the clients with
a control channel and of the last one that proved the token are never refused (see
tunnel/limiter.py): their links in flight fail by the dozen when a control channel drops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from backhaul.log import Throttles
from backhaul.tunnel.limiter import HANDSHAKE_FAILURES, FailureLimiter

log = logging.getLogger("backhaul.tunnel.gate")

# account(kind, fmt, *args): counts a failure in a metric and says it, one line a second per kind
Account = Callable[..., None]


class Gate:
    """Limits and failure accounting of one tunnel port; reactor thread only."""

    def __init__(self, trusted: Callable[[str], bool], limiter: FailureLimiter | None = None) -> None:
        self.trusted = trusted       # the owner's word: ``ip`` has a control channel
        self.proven_ip = ""          # the address of the last client that proved the token
        self.limiter = limiter if limiter is not None else FailureLimiter()
        self.limiter.exempt = self.exempt
        self.warn = Throttles(log)

    def exempt(self, ip: str) -> bool:
        return self.trusted(ip) or ip == self.proven_ip

    def proven(self, ip: str) -> None:
        """A client at ``ip`` proved the token: never held back from now on."""
        self.proven_ip = ip

    def admits(self, ip: str) -> bool:
        """False (counted as "limited") when ``ip`` is past its limit of failures: close it unread."""
        return not self.limiter.refuses(ip)

    def failed(self, ip: str, kind: str, fmt: str, *args: object, account: Account | None = None) -> None:
        """One failed handshake from ``ip`` of ``kind``: counted, told to the limiter and said
        (one line a second per kind). ``account`` counts and says it elsewhere instead (a
        datagram refused on the UDP tunnel port is a dropped datagram to its operator)."""
        self.limiter.failed(ip)
        if account is not None:
            account(kind, fmt, *args)
            return
        HANDSHAKE_FAILURES.inc(1, kind)
        self.warn.warning(kind, fmt, *args)
