"""Command line: ``backhaul -c config.toml`` runs it, ``backhaul check -c config.toml`` explains it.

Exit codes: 0 after a clean stop, 1 when a port cannot be bound, 78 (EX_CONFIG) for a bad config.
Signals: SIGHUP (or a change of the file) reloads the config; SIGTERM or SIGINT drains (stop
accepting, let open connections finish for up to drain_timeout), a second one stops at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from backhaul import __version__, summary
from backhaul import log as logs
from backhaul.app import App, raise_open_files_limit, refusals
from backhaul.config import CREDENTIAL, Config, load, python_log_level
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
        logs.error_line(str(exc))
        return EXIT_CONFIG
    problems = refusals(config)
    if problems:
        for problem in problems:
            logs.error_line(problem)
        return EXIT_CONFIG
    if args.command == "check":
        print(summary.describe(config), end="")
        return EXIT_OK
    if args.check:
        print(f"backhaul: {args.config}: ok")
        return EXIT_OK
    logs.setup(_verbosest(config))
    try:
        return run(config)
    except Exception:   # a bug: its traceback is why the service failed, so it goes out at err too
        log.exception("stopped by an unexpected error")
        return EXIT_RUNTIME


def _verbosest(config: Config) -> str:
    levels = [side.log_level for side in (config.server, config.client) if side is not None]
    return min(levels, key=python_log_level)


WATCH_EVERY = 2.0   # seconds between looks at the config file (as the Go program's hot reload)


def run(config: Config) -> int:
    soft, hard = raise_open_files_limit()
    log.info("backhaul %s starting; open files limit %d (hard %d)", __version__, soft, hard)
    for name, side in (("server", config.server), ("client", config.client)):
        if side is not None and side.token_is_default:
            log.warning('[%s]: no token is set, so the default of v0.7.2, known to anyone, is in use: set token, '
                        'token_file or the systemd credential "%s", the same on both sides', name, CREDENTIAL)
    wake = threading.Event()
    now = threading.Event()      # a second stop signal: no more waiting
    stops: list[str] = []
    reloads: list[str] = []

    def on_stop(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stops:
            log.info("received %s again: stopping now", name)
            now.set()
        else:
            log.info("received %s, shutting down", name)
        stops.append(name)
        wake.set()

    def on_reload(_signum: int, _frame: object) -> None:
        reloads.append("SIGHUP")
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_reload)
    app = App(config)
    try:
        app.start()
    except TransportError as exc:
        log.error("%s", exc)
        return EXIT_RUNTIME
    if config.server is not None and config.client is not None:
        _describe(config)
    seen = _file_state(config.source)
    while not stops:
        wake.wait(WATCH_EVERY)
        wake.clear()
        if stops:
            break
        state = _file_state(config.source)
        if reloads or (state is not None and state != seen):
            why = "received SIGHUP" if reloads else "the config file changed"
            reloads.clear()
            seen = state if state is not None else seen
            _reload(app, why)
    app.drain(_drain_timeout(app.config), now)
    app.stop()
    log.info("stopped")
    return EXIT_OK


def _file_state(path: str) -> tuple[int, int, int, int] | None:
    """What tells a changed file: its inode (an editor's rename), size and modification time."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # gone for a moment (being replaced): look again next time
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _reload(app: App, why: str) -> None:
    """Read the file again and apply it; a file that does not load leaves the running config."""
    source = app.config.source
    log.info("%s: reloading %s", why, source)
    try:
        new = load(source)
    except ConfigError as exc:
        log.error("reload refused: %s; the running config stays", exc)
        return
    if app.reload(new):
        logs.set_level(_verbosest(new))


def _drain_timeout(config: Config) -> int:
    return max(side.drain_timeout for side in (config.server, config.client) if side is not None)


def _describe(config: Config) -> None:
    """For a file with both sides (the demo): say which public port forwards where."""
    assert config.server is not None and config.client is not None
    for mapping in config.server.ports:
        host, port = mapping.listen_addr
        dialed = summary.dial_text(mapping.target, config.client)
        print(f"{host}:{port} -> tunnel {config.server.bind_addr} -> {dialed}", flush=True)
