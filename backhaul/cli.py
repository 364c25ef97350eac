"""Command line: ``backhaul -c config.toml`` runs it, ``backhaul check -c config.toml`` explains it.

Exit codes: 0 after a clean stop, 1 when a port cannot be bound, 78 (EX_CONFIG) for a bad config.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from backhaul import __version__, summary
from backhaul import log as logs
from backhaul.app import App, raise_open_files_limit, refusals
from backhaul.config import Config, load, python_log_level
from backhaul.errors import ConfigError, TransportError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 78

log = logging.getLogger("backhaul")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backhaul",
        description="Reverse tunnel through NAT and firewalls, wire-compatible with Backhaul v0.7.2.",
    )
    p.add_argument("command", nargs="?", choices=["check"], metavar="check",
                   help="validate the config, print the settings in effect (token redacted) and the "
                        "addresses it would listen on and dial, and exit")
    p.add_argument("-c", "--config", required=True, metavar="FILE",
                   help="TOML file with a [server] and/or a [client] section")
    p.add_argument("--check", action="store_true", help="validate the config, print one line and exit")
    p.add_argument("-v", "--version", action="version", version=f"backhaul {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"backhaul: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    problems = refusals(config)
    if problems:
        for problem in problems:
            print(f"backhaul: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(summary.describe(config), end="")
        return EXIT_OK
    if args.check:
        print(f"backhaul: {args.config}: ok")
        return EXIT_OK
    logs.setup(_verbosest(config))
    return run(config)


def _verbosest(config: Config) -> str:
    levels = [side.log_level for side in (config.server, config.client) if side is not None]
    return min(levels, key=python_log_level)


def run(config: Config) -> int:
    soft, hard = raise_open_files_limit()
    log.info("backhaul %s starting; open files limit %d (hard %d)", __version__, soft, hard)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    app = App(config)
    try:
        app.start()
    except TransportError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    if config.server is not None and config.client is not None:
        _describe(config)
    while not stop.wait(3600):
        pass
    app.stop()
    log.info("stopped")
    return EXIT_OK


def _describe(config: Config) -> None:
    """For a file with both sides (the demo): say which public port forwards where."""
    assert config.server is not None and config.client is not None
    for mapping in config.server.ports:
        host, port = mapping.listen_addr
        dialed = summary.dial_text(mapping.target, config.client)
        print(f"{host}:{port} -> tunnel {config.server.bind_addr} -> {dialed}", flush=True)
