"""What the journal files at err: every line explaining a failed start or a refused reload; the
connect-retry line thinned out (the first and the last attempt always there); a warning at start
when the default token is in use."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backhaul import cli
from backhaul import log as logs
from tests.harness import HOST, REPO, Launcher, client_toml, free_port, server_toml

pytestmark = pytest.mark.timeout(60)


def run_as_under_systemd(tmp_path: Path, *args: str) -> tuple[int, list[str]]:
    """``python -m backhaul ARGS`` with stderr a file that JOURNAL_STREAM names, as systemd sets it."""
    err_path = tmp_path / "stderr"
    environ = {key: value for key, value in os.environ.items() if key != "CREDENTIALS_DIRECTORY"}
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        code = subprocess.run([sys.executable, "-m", "backhaul", *args], cwd=REPO, env=environ,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=30).returncode
    return code, err_path.read_text().splitlines()


@pytest.mark.parametrize("how", [(), ("--check",), ("check",)])
def test_a_refused_config_is_an_err_line_in_the_journal(tmp_path: Path, how: tuple[str, ...]) -> None:
    """Catches: the line that says why the service did not start (or why `systemctl reload`'s
    check failed) filed at info, where `journalctl -p err` does not show it."""
    path = tmp_path / "bad.toml"
    path.write_text(server_toml(free_port(), ["5201"], chanel_size=1))
    code, lines = run_as_under_systemd(tmp_path, *how[:1], "-c", str(path), *how[1:])
    assert code == 78
    assert lines == [f"<3>backhaul: {path}: server.chanel_size: unknown key; did you mean 'channel_size'?"], lines


def test_a_port_that_cannot_be_bound_is_an_err_line(tmp_path: Path) -> None:
    """Catches: a start that fails on a taken port explained at a lower priority than err."""
    with socket.create_server((HOST, 0)) as taken:
        port = taken.getsockname()[1]
        path = tmp_path / "server.toml"
        path.write_text(server_toml(port, [f"{HOST}:{free_port()}=5201"], "a-token"))
        code, lines = run_as_under_systemd(tmp_path, "-c", str(path))
    assert code == 1
    assert [line for line in lines if line.startswith("<3>")], lines
    assert all(line.startswith(("<3>", "<6>")) for line in lines), lines


def test_a_refused_reload_and_the_default_token_in_the_journal(launcher: Launcher) -> None:
    """Catches: a refused reload below err; no word at start that the default token is in use
    (or one when a token is set)."""
    default = launcher.start("default", server_toml(free_port(), [f"{HOST}:{free_port()}=5201"], token=""),
                             env={"JOURNAL_STREAM": ""})
    warning = default.wait_for_log("the default of v0.7.2, known to anyone, is in use")
    assert warning.startswith("<4>WARNING backhaul: [server]: no token is set"), warning
    default.wait_for_log("tunnel listening")
    default.config.write_text("[server]\nbind_adr = 1\n")
    default.proc.send_signal(signal.SIGHUP)
    refused = default.wait_for_log("reload refused")
    assert refused.startswith(f"<3>ERROR backhaul: reload refused: {default.config}: server.bind_adr: "), refused
    assert default.alive()
    named = launcher.start("named", server_toml(free_port(), [f"{HOST}:{free_port()}=5201"], "a-token-of-its-own"),
                           env={"JOURNAL_STREAM": ""})
    named.wait_for_log("tunnel listening")
    assert not named.lines("default of v0.7.2"), named.log()


def test_the_client_warns_at_start_when_it_has_no_token(launcher: Launcher) -> None:
    """Catches: the default-token warning given only once a client connects (here none can)."""
    client = launcher.start("client", client_toml(free_port(), token=""), env={"JOURNAL_STREAM": ""})
    line = client.wait_for_log("default of v0.7.2")
    assert line.startswith("<4>WARNING backhaul: [client]: no token is set"), line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_lines_thin_out_and_keep_the_first_and_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a line per retry while a server stays down; the count of the attempts held back
    missing; the last attempt before connecting (or stopping) lost; one server's run of
    failures holding back another's."""
    clock = Clock()
    monkeypatch.setattr(logs.time, "monotonic", clock)
    stream = io.StringIO()
    logger = logging.getLogger("backhaul.test-retries")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        retries = logs.RetryLog(logger, first_gap=1.0, longest=8.0)
        for attempt in range(42):   # one attempt a second for 42 s
            retries.warning("a:1", "cannot connect to server %s: refused (%d)", "a:1", attempt)
            if attempt == 5:
                retries.warning("b:2", "cannot connect to server %s: refused", "b:2")
            clock.now += 1.0
        retries.settle()
        lines = stream.getvalue().splitlines()
    finally:
        logger.removeHandler(handler)
    assert lines[0] == "cannot connect to server a:1: refused (0)"
    assert lines[1] == "cannot connect to server a:1: refused (1)"   # 1 s later: nothing held back
    assert lines[2] == "cannot connect to server a:1: refused (3) (1 more like it; the next line in 4 s at most)"
    assert "cannot connect to server b:2: refused" in lines
    a_lines = [line for line in lines if "a:1" in line]
    assert len(a_lines) < 10            # 40 attempts, gaps of 1, 2, 4, 8, 8 ... s
    assert a_lines[-1] == "cannot connect to server a:1: refused (41) (the last of 2 since the line before)"
    held = sum(int(re.findall(r"\d+", line)[-2 if "the next line" in line else -1])
               for line in a_lines if "more like it" in line or "the last of" in line)
    assert held + len(a_lines) - 1 == 42    # every attempt is a line or counted in one
    retries.settle()                    # a settled log starts over: the next failure is a first again
    assert stream.getvalue().splitlines() == lines


def test_an_unexpected_error_is_an_err_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a bug that ends the process leaving its traceback at info in the journal."""
    path = tmp_path / "server.toml"
    path.write_text(server_toml(free_port(), ["5201"]))

    def broken(_config: object) -> int:
        raise RuntimeError("a bug")

    logger = logging.getLogger("backhaul")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    with open(tmp_path / "stderr", "w+") as err:
        st = os.fstat(err.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr(sys, "stderr", err)
        monkeypatch.setattr(cli, "run", broken)
        try:
            assert cli.main(["-c", str(path)]) == cli.EXIT_RUNTIME
        finally:
            logger.handlers[:], logger.level, logger.propagate = saved
        err.seek(0)
        lines = err.read().splitlines()
    assert lines[0] == "<3>ERROR backhaul: stopped by an unexpected error", lines
    assert lines[-1] == "<3>RuntimeError: a bug", lines
    assert all(line.startswith("<3>") for line in lines), lines
