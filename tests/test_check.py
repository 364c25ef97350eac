"""``backhaul check -c FILE``: the settings in effect with defaults filled in and the token
redacted, the addresses the process would listen on and dial, exit 0 or 78; nothing is opened."""

from __future__ import annotations

import dataclasses
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from backhaul import cli
from backhaul.config import ClientConfig, ServerConfig, file_keys, load, parse
from tests.harness import HOST, REPO, client_toml, free_port, server_toml, toml_section

pytestmark = pytest.mark.timeout(30)

TOKEN = random.Random(7).randbytes(24).hex()


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def without_secrets(report: str) -> str:
    """The report with its redacted lines dropped: what is left must be TOML again."""
    return "\n".join(line for line in report.splitlines() if not re.match(r"^\w+ = <", line))


def same_but_token(ours: object, theirs: object) -> None:
    for key in dataclasses.fields(ours):  # type: ignore[arg-type]
        if key.name not in ("token", "token_is_default", "token_source"):
            assert getattr(ours, key.name) == getattr(theirs, key.name), key.name


def test_server_report_has_every_key_in_effect_and_hides_the_token(tmp_path: Path, capsys) -> None:
    """Catches: a key missing from the report, a default not filled in, a value written so that it
    reads back differently, the token printed, a range listed port by port or dialed wrongly."""
    bind_port = free_port()
    path = tmp_path / "server.toml"
    path.write_text(server_toml(bind_port, ["2000-2002", f"{HOST}:4000=db.local:5432", "4001=5201"], TOKEN,
                                nodelay=True, mux_con=3, sniffer_log="stats \"q\".json"))
    code, out, err = check(path, capsys)
    assert code == 0 and err == "", err
    assert TOKEN not in out
    assert "token = <redacted, set in the file>" in out.splitlines()
    for key in file_keys(ServerConfig):
        assert len(re.findall(rf"^{key.name} = ", out, re.M)) == 1, key.name

    again = parse(without_secrets(out), "report")
    assert again.client is None and again.server is not None
    same_but_token(again.server, load(str(path)).server)
    assert again.server.channel_size == 2048 and again.server.mux_con == 3  # a default, and a value set

    listens = out.split("# listens on:\n", 1)[1].split("# dials:\n", 1)
    assert listens[0].splitlines() == [
        f"#   tcp {HOST}:{bind_port}  tunnel (tcp)",
        '#   tcp 0.0.0.0:2000-2002  public, ports entry "2000-2002": '
        "the client dials 127.0.0.1:2000 ... 127.0.0.1:2002 (each port its own)",
        f'#   tcp {HOST}:4000  public, ports entry "{HOST}:4000=db.local:5432": the client dials db.local:5432',
        f'#   tcp 0.0.0.0:4001  public, ports entry "4001=5201": the client dials {HOST}:5201',
    ]
    assert listens[1] == "#   nothing\n"
    with socket.create_server((HOST, bind_port)):  # nothing was opened
        pass


def test_client_report_names_the_server_and_the_forwarder(tmp_path: Path, capsys) -> None:
    """Catches: the client's dial addresses or forwarder rules missing, an unset token shown
    (or shown as its default value), the report not TOML apart from the secret."""
    path = tmp_path / "client.toml"
    path.write_text(toml_section("client", {"remote_addr": "203.0.113.1:3080", "retry_interval": 3,
                                            "forwarder": ["5201=10.0.0.9:9090", "22=10.0.0.5:22"]}))
    code, out, err = check(path, capsys)
    assert code == 0 and err == "", err
    assert 'token = <not set: the default of v0.7.2, unless systemd passes the credential "token">' \
        in out.splitlines()
    assert "musix" not in out
    for key in file_keys(ClientConfig):
        assert len(re.findall(rf"^{key.name} = ", out, re.M)) == 1, key.name
    same_but_token(parse(without_secrets(out), "report").client, load(str(path)).client)
    listens, dials = out.split("# listens on:\n", 1)[1].split("# dials:\n", 1)
    assert listens == "#   nothing\n"
    assert dials.splitlines() == [
        "#   tcp 203.0.113.1:3080  the server (tcp)",
        "#   tcp the targets the server sends: a bare port as 127.0.0.1:PORT, host:port as written",
        "#   tcp 10.0.0.9:9090  for the target '5201' (forwarder)",
        "#   tcp 10.0.0.5:22  for the target '22' (forwarder)",
    ]


def test_a_status_page_is_among_what_a_side_listens_on(tmp_path: Path, capsys) -> None:
    """Catches: the status page's address left out of what the process would listen on."""
    path = tmp_path / "client.toml"
    path.write_text(toml_section("client", {"remote_addr": "203.0.113.1:3080", "web_port": 8080}))
    code, out, err = check(path, capsys)
    assert code == 0, err
    listens = out.split("# listens on:\n", 1)[1].split("# dials:\n", 1)[0]
    assert listens.splitlines() == ["#   tcp 127.0.0.1:8080  status page, /metrics, /healthz (client)"]


def test_edge_ip_is_what_a_ws_client_dials(tmp_path: Path, capsys) -> None:
    """Catches: a ws client reported as dialing remote_addr when it connects to its CDN edge."""
    pytest.importorskip("wsproto")
    path = tmp_path / "client.toml"
    path.write_text(client_toml(3080, TOKEN, transport="wss", edge_ip="198.51.100.10"))
    code, out, err = check(path, capsys)
    assert code == 0, err
    assert (f"#   tcp 198.51.100.10:3080  the server through the CDN edge (Host and SNI {HOST}:3080) "
            "(wss with TLS)") in out.splitlines()


def test_a_bad_config_exits_78_with_one_line(tmp_path: Path, capsys) -> None:
    """Catches: check printing a report (or exit 0) for a file the program would refuse, or the
    token appearing in the error."""
    misspelt = tmp_path / "misspelt.toml"
    misspelt.write_text(f'[server]\nbind_adr = "{HOST}:3080"\ntoken = "{TOKEN}"\n')
    bad_value = tmp_path / "bad_value.toml"
    bad_value.write_text(server_toml(free_port(), ["4000=5201"], TOKEN, udp_max_flows=0))
    for path, key in ((misspelt, "server.bind_adr"), (bad_value, "server.udp_max_flows")):
        code, out, err = check(path, capsys)
        assert code == cli.EXIT_CONFIG, (path, out)
        assert out == ""
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"backhaul: {path}: {key}"), err
        assert TOKEN not in err


def test_check_as_a_command_line(tmp_path: Path) -> None:
    """Catches: ``python -m backhaul check -c FILE`` not parsed as the check command (it would run),
    or ``--check`` no longer answering with its one line."""
    path = tmp_path / "both.toml"
    port = free_port()
    path.write_text(server_toml(port, [f"{HOST}:{free_port()}=5201"]) + client_toml(port))
    for args, first in ((["check", "-c", str(path)], f"# {path}: ok; "),
                        (["-c", str(path), "--check"], f"backhaul: {path}: ok")):
        done = subprocess.run([sys.executable, "-m", "backhaul", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=20, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(first), done.stdout[:200]
        assert "e2e-token" not in done.stdout


def test_a_failover_client_lists_its_servers_in_order(tmp_path: Path, capsys) -> None:
    """Catches: check showing only the first server of a remote_addr list, the order lost, the
    local address or the failback rule left out, or the list not reading back as a list."""
    path = tmp_path / "client.toml"
    path.write_text(toml_section("client", {"remote_addr": ["203.0.113.1:3080", "backup.example:443"],
                                            "local_addr": "192.0.2.7", "failback_idle": 30}))
    code, out, err = check(path, capsys)
    assert code == 0 and err == "", err
    assert 'remote_addr = ["203.0.113.1:3080", "backup.example:443"]' in out.splitlines()
    same_but_token(parse(without_secrets(out), "report").client, load(str(path)).client)
    dials = out.split("# dials:\n", 1)[1].splitlines()
    assert dials[:3] == [
        "#   tcp 203.0.113.1:3080  server 1 of 2 (tcp) from 192.0.2.7",
        "#   tcp backup.example:443  server 2 of 2 (tcp) from 192.0.2.7",
        "#       the first that answers, the next when its session ends; back to an earlier one that answers "
        "again after 30 s without users",
    ]
