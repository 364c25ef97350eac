"""The Debian package agrees with the code: the version, the units it installs, the examples."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from backhaul import __version__
from tests.harness import REPO

pytestmark = pytest.mark.timeout(30)

DEBIAN = REPO / "debian"


def test_changelog_version_is_the_programs() -> None:
    """Catches: a release that bumps __version__ but not debian/changelog (or the other way)."""
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.match(r"^backhaul \(([^)]+)\) ", first)
    assert match, first
    assert match.group(1) == __version__, "a native package's version is the program's version"


def test_units_and_examples_the_package_installs() -> None:
    """Catches: an install rule that no longer matches contrib/systemd, or an example config that
    does not pass ``backhaul check``."""
    rule = (DEBIAN / "backhaul.install").read_text()
    assert "contrib/systemd/*.service lib/systemd/system/" in rule
    assert sorted(path.name for path in (REPO / "contrib/systemd").glob("*.service")), "no unit to install"
    rules = (DEBIAN / "rules").read_text()
    for name in ("server", "client"):
        assert f"examples/{name}.toml debian/backhaul/etc/backhaul/example-{name}.toml" in rules
        done = subprocess.run([sys.executable, "-m", "backhaul", "check", "-c", str(REPO / f"examples/{name}.toml")],
                              cwd=REPO, capture_output=True, text=True, timeout=20, check=False)
        assert done.returncode == 0, done.stderr
