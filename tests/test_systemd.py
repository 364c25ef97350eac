"""systemd integration: sd_notify over a real AF_UNIX datagram socket (path and abstract), the
watchdog fed by the reactor (a wedged reactor stops it), journald-style log lines, and the unit
files as ``systemd-analyze`` judges them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backhaul.app import App
from backhaul.config import parse
from backhaul.log import JournalFormatter, to_journal
from backhaul.systemd import Notifier
from tests.harness import HOST, REPO, REQUIRED, free_port
from tests.notify import NotifySocket

pytestmark = pytest.mark.timeout(60)

UNITS = REPO / "contrib" / "systemd"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    path = str(tmp_path / "notify")
    listener = NotifySocket(path)
    try:
        yield path, listener
    finally:
        listener.close()


def test_notify_reaches_a_path_socket_and_an_abstract_one(notify_socket: tuple[str, NotifySocket]) -> None:
    """Catches: messages not sent as one datagram, fields not newline-joined, '@' not mapped to an abstract name."""
    path, listener = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    try:
        assert notifier.ready("serving 2 ports")
        assert listener.messages(1.0)[0][1] == "READY=1\nSTATUS=serving 2 ports"
    finally:
        notifier.close()
    name = f"backhaul-test-{os.getpid()}-{time.monotonic_ns()}"
    abstract = NotifySocket(b"\0" + name.encode())
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.stopping("draining 3 connections")
        assert notifier.reloading()
        got = [message for _, message in abstract.messages(1.0)]
        assert got[0] == "STOPPING=1\nSTATUS=draining 3 connections"
        assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading the configuration", got[1]), got[1]
    finally:
        notifier.close()
        abstract.close()


def test_no_notify_socket_means_no_messages_and_no_errors() -> None:
    """Catches: a notifier that fails or opens sockets when the program is not run by systemd."""
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert not notifier.ready("x") and not notifier.watchdog()
    notifier.close()


def test_watchdog_interval_only_for_this_process() -> None:
    """Catches: WATCHDOG_USEC taken for another process (WATCHDOG_PID) or misread as seconds."""
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    assert Notifier({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 0.5
    assert Notifier({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_watchdog_pings_stop_while_the_reactor_is_wedged(notify_socket: tuple[str, NotifySocket]) -> None:
    """Catches: pings from a thread of their own (they would go on while the reactor hangs), no READY
    after the listeners open, no STOPPING at the end."""
    path, listener = notify_socket
    public = free_port()
    config = parse(f'[server]\nbind_addr = "{HOST}:{free_port()}"\nports = ["{HOST}:{public}=5201"]\n', "test.toml")
    app = App(config, workers=2, notifier=Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}))
    app.start()
    try:
        ready = listener.wait_for("READY=1", 5)
        assert "STATUS=server: tcp tunnel port" in ready and "no client" in ready, ready
        with socket.create_connection((HOST, public), timeout=5):
            pass  # READY came after the public port was open
        pings = [t for t, m in listener.messages(1.0) if m == "WATCHDOG=1"]
        assert len(pings) >= 5, f"expected a ping every 0.1 s, got {len(pings)} in 1 s"

        wedged = threading.Event()

        def hang() -> None:   # a handler that hangs the event loop
            wedged.set()
            time.sleep(1.5)

        app.reactor.call_soon(hang)
        assert wedged.wait(5)
        listener.messages(0.05)   # pings sent before it hung are queued already: drop them
        during = [m for _, m in listener.messages(1.1) if m == "WATCHDOG=1"]
        assert during == [], f"pings went on while the reactor was wedged: {len(during)}"
        after = [m for _, m in listener.messages(1.0) if m == "WATCHDOG=1"]
        assert len(after) >= 3, "pings did not resume once the reactor was free"
    finally:
        app.stop()
    assert any(m.startswith("STOPPING=1") for _, m in listener.messages(0.5))


def test_journal_lines_carry_the_priority_and_no_timestamp(tmp_path: Path) -> None:
    """Catches: no <N> prefix (journald files every line as info), a timestamp doubled with the journal's,
    a JOURNAL_STREAM that does not name our stderr taken for the journal."""
    formatter = JournalFormatter()
    levels = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
    for level, priority in levels.items():
        record = logging.LogRecord("backhaul.server", level, __file__, 1, "port %d open", (80,), None)
        assert formatter.format(record) == f"<{priority}>{logging.getLevelName(level)} backhaul.server: port 80 open"
    record = logging.LogRecord("backhaul", logging.ERROR, __file__, 1, "two\nlines", (), None)
    assert formatter.format(record) == "<3>ERROR backhaul: two\n<3>lines"

    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        assert to_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stream)
        assert not to_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, other)
        assert not to_journal({}, stream)
        assert not to_journal({"JOURNAL_STREAM": "garbage"}, stream)


# ------------------------------------------------------------------------------------------------
# the unit files

def _analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if REQUIRED:
            pytest.fail("systemd-analyze is missing (.ci/run installs systemd from Debian)")
        pytest.skip("systemd-analyze is not installed")
    return found


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart pointing at this Python's backhaul (verify checks that the
    program exists; the installed one is /usr/bin/backhaul)."""
    script = tmp_path / "bin" / "backhaul"
    script.parent.mkdir()
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m backhaul \"$@\"\n")
    script.chmod(0o755)
    for unit in ("backhaul.service", "backhaul@.service"):
        text = (UNITS / unit).read_text()
        assert "ExecStart=/usr/bin/backhaul " in text
        (tmp_path / unit).write_text(text.replace("/usr/bin/backhaul", str(script)))
    return tmp_path


@pytest.mark.parametrize("unit", ["backhaul.service", "backhaul@demo.service"])
def test_units_verify_clean(units: Path, unit: str) -> None:
    """Catches: a misspelt or misplaced directive, a bad ExecStart, anything systemd would warn about."""
    done = subprocess.run([_analyze(), "verify", "--man=no", unit], cwd=units, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)


@pytest.mark.parametrize("unit", ["backhaul.service", "backhaul@.service"])
def test_units_expose_little(units: Path, unit: str) -> None:
    """Catches: hardening dropped from a unit (systemd-analyze security scores above 2.0)."""
    done = subprocess.run([_analyze(), "security", "--offline=true", "--no-pager", unit], cwd=units,
                          capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) <= 2.0, done.stdout


def test_units_have_the_service_contract() -> None:
    """Catches: a unit that no longer waits for READY, reloads with SIGHUP, is watched or restarts."""
    for unit in ("backhaul.service", "backhaul@.service"):
        lines = set((UNITS / unit).read_text().splitlines())
        for wanted in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                       "DynamicUser=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                       "AmbientCapabilities=CAP_NET_BIND_SERVICE", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                       "SystemCallFilter=@system-service", "RestartPreventExitStatus=78"):
            assert wanted in lines, f"{unit}: {wanted}"
        assert any(line.startswith("WatchdogSec=") for line in lines), unit
    assert "ExecStart=/usr/bin/backhaul -c /etc/backhaul/%i.toml" in (UNITS / "backhaul@.service").read_text()


def test_units_fail_once_reload_visibly_share_a_host_and_get_the_token_as_a_credential() -> None:
    """Catches: a check before the start (Restart= retries its failure, RestartPreventExitStatus does
    not cover it, so a bad config restart-loops); a reload that signals without checking the file
    first (a refused config, yet `systemctl reload` succeeds); state directories of the two units
    that cannot coexist (/var/lib/backhaul a directory for one, a symlink for the other); a
    token file that must exist or cannot be root's alone; the manual not named."""
    for unit, name in (("backhaul.service", "backhaul"), ("backhaul@.service", "%i")):
        lines = [line for line in (UNITS / unit).read_text().splitlines() if not line.startswith("#")]
        assert not [line for line in lines if line.startswith("ExecStartPre")], unit
        reloads = [line for line in lines if line.startswith("ExecReload=")]
        assert reloads == [f"ExecReload=/usr/bin/env -u CREDENTIALS_DIRECTORY /usr/bin/backhaul -c "
                           f"/etc/backhaul/{name}.toml --check",
                           "ExecReload=/bin/kill -HUP $MAINPID"], unit
        assert f"StateDirectory=backhaul/{name}" in lines and f"WorkingDirectory=%S/backhaul/{name}" in lines
        assert f"LoadCredential=token:/etc/backhaul/{name}.token" in lines and "SetCredential=token:\\n" in lines
        assert "Documentation=man:backhaul(1)" in lines
