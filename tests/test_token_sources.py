"""Where the token comes from: the key token, token_file, or the systemd credential "token" in
$CREDENTIALS_DIRECTORY. One of them at most; `check` says which, never what the token is."""

from __future__ import annotations

from pathlib import Path

import pytest

from backhaul import cli, config
from backhaul.config import DEFAULT_TOKEN, MAX_TOKEN_BYTES, changed_keys, load
from backhaul.errors import ConfigError
from tests.harness import Launcher, Service, Tunnel, echo_works

pytestmark = pytest.mark.timeout(60)


SECRET = "s3cr3t-0f-the-tunnel"
# Parsed only: nothing binds or dials these addresses.
SERVER = '[server]\nbind_addr = "198.51.100.1:3080"\n'
CLIENT = '[client]\nremote_addr = "198.51.100.1:3080"\n'


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test run under systemd must not see the credentials of the unit running it."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None) -> Path:
    """A credentials directory as systemd makes it, holding "token" unless ``token`` is None."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    if token is not None:
        write(directory / "token", token, 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


def test_token_file_relative_to_the_config_with_its_line_ending_dropped(tmp_path: Path) -> None:
    """Catches: the file's newline kept in the token (the handshake would fail against a peer with
    the same token in its config), a relative path taken from the working directory."""
    write(tmp_path / "tunnel.token", SECRET + "\n", 0o600)
    config = load(str(write(tmp_path / "c.toml", SERVER + 'token_file = "tunnel.token"\n')))
    assert config.server is not None
    assert (config.server.token, config.server.token_is_default) == (SECRET, False)
    assert config.server.token_source == f"from token_file {tmp_path / 'tunnel.token'}"


def test_the_credential_gives_the_token_to_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: $CREDENTIALS_DIRECTORY not read, or read by one side of a file only."""
    directory = credentials(tmp_path, monkeypatch, SECRET + "\r\n")
    config = load(str(write(tmp_path / "c.toml", SERVER + CLIENT)))
    for side in (config.server, config.client):
        assert side is not None
        assert (side.token, side.token_is_default) == (SECRET, False)
        assert side.token_source == f"from the systemd credential 'token' ({directory / 'token'})"


def test_an_empty_or_absent_credential_leaves_the_token_to_the_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: the units' fallback (SetCredential=token:\\n, an empty line) taken as a token, or as
    a conflict with the token of the file; a missing credential taken as an error."""
    directory = credentials(tmp_path, monkeypatch, "\n")
    config = load(str(write(tmp_path / "c.toml", SERVER + 'token = "in-file"\n')))
    assert config.server is not None and (config.server.token, config.server.token_source) == ("in-file",
                                                                                             "set in the file")
    (directory / "token").unlink()
    config = load(str(tmp_path / "c.toml"))
    assert config.server is not None and config.server.token == "in-file"
    config = load(str(write(tmp_path / "d.toml", SERVER)))
    assert config.server is not None and (config.server.token, config.server.token_is_default) == (DEFAULT_TOKEN,
                                                                                                   True)


@pytest.mark.parametrize(("text", "files", "credential", "problem"), [
    (SERVER + 'token = "a"\ntoken_file = "t"\n', {"t": "b"}, None, "server.token_file: token is set as well; keep one"),
    (SERVER + 'token = "a"\n', {}, "b", "server.token: the systemd credential 'token' ("),
    (SERVER + 'token_file = "t"\n', {"t": "b"}, "c", "server.token_file: the systemd credential 'token' ("),
    (SERVER + 'token_file = "t"\n', {}, None, "server.token_file = 't': cannot read the file: no such file"),
    (SERVER + 'token_file = "t"\n', {"t": "\n"}, None, "server.token_file = 't': the file is empty"),
    (SERVER + 'token_file = "t"\n', {"t": SECRET + "\nmore\n"}, None, "holds more than one line"),
    (SERVER + 'token_file = "t"\n', {"t": "x" * (MAX_TOKEN_BYTES + 1)}, None,
     f"server.token_file = 't': the token in the file is longer than the handshake carries ({MAX_TOKEN_BYTES} "),
    (CLIENT + 'token_file = 7\n', {}, None, "client.token_file = 7: expected a string"),
    (CLIENT, {}, "x" * MAX_TOKEN_BYTES, "/token: the systemd credential 'token': the token in the file is longer "),
])
def test_a_token_given_twice_or_unreadable_is_refused_without_showing_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text: str,
        files: dict[str, str], credential: str | None, problem: str) -> None:
    """Catches: one source silently winning over another, a bad token file accepted, a token
    (from any source) shown in the error."""
    if credential is not None:
        credentials(tmp_path, monkeypatch, credential + SECRET)
    for name, content in files.items():
        write(tmp_path / name, content.replace("b", "b" + SECRET), 0o600)
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    assert problem in str(caught.value)
    assert SECRET not in str(caught.value)
    assert cli.main(["check", "-c", str(path)]) == cli.EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and problem in err and SECRET not in err


def test_check_says_where_the_token_came_from_and_never_what_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Catches: check printing the token read from a file or a credential, or not saying which."""
    write(tmp_path / "t", SECRET)
    path = write(tmp_path / "c.toml", SERVER + 'token_file = "t"\n')
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert f"token = <redacted, from token_file {tmp_path / 't'}>" in out.splitlines()
    assert 'token_file = "t"' in out.splitlines()
    directory = credentials(tmp_path, monkeypatch, SECRET)
    path = write(tmp_path / "c.toml", CLIENT)
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    assert f"token = <redacted, from the systemd credential 'token' ({directory / 'token'})>" in out.splitlines()


def test_a_reload_sees_a_new_token_in_the_file_and_not_a_moved_file(tmp_path: Path) -> None:
    """Catches: a token_file whose content changed not counted as a token change (the tunnel would
    keep the old token), or a renamed file with the same token restarting the tunnel."""
    write(tmp_path / "t", SECRET)
    path = write(tmp_path / "c.toml", SERVER + 'token_file = "t"\n')
    old = load(str(path)).server
    write(tmp_path / "u", SECRET)
    write(path, SERVER + 'token_file = "u"\n')
    moved = load(str(path)).server
    write(tmp_path / "u", SECRET + "2")
    changed = load(str(path)).server
    assert old is not None and moved is not None and changed is not None
    assert changed_keys(old, moved) == []
    assert changed_keys(old, changed) == ["token"]


def test_a_config_only_root_may_read_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches: a 0600 config under the units' own user failing with no word on what to do."""
    path = write(tmp_path / "c.toml", SERVER, 0o600)

    def as_another_user(name: str, mode: str = "r") -> object:
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(config, "open", as_another_user, raising=False)  # root reads a file of any mode
    with pytest.raises(ConfigError, match=r"Permission denied \(this process runs as uid \d+\); keep the token "
                       r"out of it \(token_file, or the systemd credential 'token'\) and make it readable"):
        load(str(path))


def test_a_tunnel_whose_tokens_come_from_a_credential_and_a_token_file(launcher: Launcher, echo_service: Service,
                                                                       tmp_path: Path) -> None:
    """Catches: a token read from $CREDENTIALS_DIRECTORY or token_file that differs from the same
    token in a config (a newline kept, a wrong file), either one printed, a default-token warning
    although a token was given; a wrong token in a token_file let in."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    write(directory / "token", SECRET + "\n", 0o400)
    write(tmp_path / "client.token", SECRET + "\n", 0o600)
    write(tmp_path / "wrong.token", SECRET + "-not\n", 0o600)
    tunnel = Tunnel(launcher, [str(echo_service.port)], token="")
    tunnel.server = launcher.start("server", tunnel.server_text, env={"CREDENTIALS_DIRECTORY": str(directory)})
    tunnel.wait_listening()
    tunnel.client = launcher.start("client", tunnel.client_text + f'token_file = "{tmp_path / "client.token"}"\n')
    tunnel.wait_connected()
    echo_works(tunnel.public[0], size=200_000, seed=3)
    wrong = launcher.start("wrong", tunnel.client_text + f'token_file = "{tmp_path / "wrong.token"}"\n')
    tunnel.server.wait_for_log("wrong token")
    wrong.wait_for_log("cannot connect to server")
    for proc in (tunnel.server, tunnel.client, wrong):
        assert SECRET not in proc.log(), proc.name
        assert not proc.lines("default of v0.7.2"), proc.log()
