"""The manual page and the key descriptions it is made from: every key of the file has one line
beside its definition, its documented default is the loader's, and the page lists every key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from backhaul import __version__, cli, manpage
from backhaul.config import ClientConfig, ServerConfig, file_keys, parse

pytestmark = pytest.mark.timeout(30)

SIDES = {"server": ServerConfig, "client": ClientConfig}
MINIMAL = {"server": '[server]\nbind_addr = "0.0.0.0:3080"\n', "client": '[client]\nremote_addr = "192.0.2.1:3080"\n'}


@pytest.mark.parametrize("section", SIDES)
def test_every_key_has_a_one_line_description(section: str) -> None:
    """Catches: a key added to ServerConfig/ClientConfig without its description (use setting())."""
    for key in file_keys(SIDES[section]):
        doc = key.metadata.get("doc", "")
        assert doc.strip(), f"{section}.{key.name} has no description: define it with setting(default, doc)"
        assert "\n" not in doc and len(doc) <= 110, f"{section}.{key.name}: one short line, please"


@pytest.mark.parametrize("section", SIDES)
def test_documented_defaults_are_the_loaders(section: str) -> None:
    """Catches: a default changed in the loader but not beside the key (the man page would lie)."""
    loaded = getattr(parse(MINIMAL[section]), section)
    for key in file_keys(SIDES[section]):
        if key.name not in ("bind_addr", "remote_addr"):
            assert getattr(loaded, key.name) == key.default, f"{section}.{key.name}"


def test_the_page_lists_every_key_under_its_table() -> None:
    """Catches: a key missing from the page, or listed under the wrong table."""
    page = manpage.render()
    server = page.split('.SS "[server]"\n', 1)[1].split('.SS "[client]"\n', 1)[0]
    client = page.split('.SS "[client]"\n', 1)[1].split(".SH ", 1)[0]
    for section, text in (("server", server), ("client", client)):
        listed = re.findall(r"^\.TP\n\\fB(\w+)\\fR = ", text, re.M)
        assert listed == [key.name for key in file_keys(SIDES[section])], section
    assert f'"backhaul {__version__}"' in page.splitlines()[0]
    for option in ("\\-\\-config", "\\-\\-check", "\\-\\-version", "\\fBcheck\\fR"):
        assert option in page, option
    assert f".TP\n\\fB{cli.EXIT_CONFIG}\\fR\n" in page


def test_text_is_escaped_for_groff() -> None:
    """Catches: a description starting with '.' read as a request, or hyphens and backslashes
    left for groff to reinterpret."""
    assert manpage.escape(".hidden\n'quote") == "\\&.hidden\n\\&'quote"
    assert manpage.escape("a-b\\c") == "a\\-b\\ec"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
def test_groff_renders_the_page_without_warnings() -> None:
    """Catches: markup that groff warns about (lintian reports those as errors in the page)."""
    done = subprocess.run([sys.executable, "-m", "backhaul.manpage"], capture_output=True, text=True, timeout=20,
                          check=True, env={**os.environ, "SOURCE_DATE_EPOCH": "1790000000"})
    assert done.stdout.startswith('.TH BACKHAUL 1 "2026-09-21" ')
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=done.stdout, capture_output=True,
                              text=True, timeout=20, check=False)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr
