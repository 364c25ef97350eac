"""One error hierarchy for the whole program.

Every expected failure (bad config, a peer speaking garbage, a dead socket) is one of these,
so callers log one clear line instead of a traceback.
"""

from __future__ import annotations


class BackhaulError(Exception):
    """Root of every error the program raises on purpose."""


class ConfigError(BackhaulError):
    """A configuration file is unreadable or a key holds a value that is not allowed.

    The message names the file, the key path (``server.ports[1]``), the bad value and what
    is allowed. ``value`` is None when it must not be shown (the token).
    """

    def __init__(self, source: str, key: str, problem: str, value: object = None) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        self.value = value
        where = f"{source}: {key}" if key else source
        shown = f" = {value!r}" if value is not None else ""
        super().__init__(f"{where}{shown}: {problem}")


class ProtocolError(BackhaulError):
    """Bytes on the wire that break the protocol.

    ``remote`` is True when the peer sent them, False when our own side would have.
    """

    def __init__(self, message: str, *, remote: bool = True) -> None:
        self.remote = remote
        super().__init__(message)


class TransportError(BackhaulError):
    """A connection could not be made or was lost (refused, reset, timed out)."""
