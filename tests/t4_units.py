"""Layer 4: the systemd units in contrib/ as shipped: ``systemd-analyze verify`` (offline;
systemd need not be pid 1) accepts them without a single warning, with their commands
pointing at this checkout's console scripts instead of /usr/local/bin (``--man=no``: the
man pages named in Documentation= are not shipped)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

ANALYZE = shutil.which("systemd-analyze")
UNITS = {  # unit file -> instance names it is verified as
    "vserver@.service": ["vserver@web1.service"],
    "vservers@.service": ["vservers@default.service"],
    "vsunify.service": [],
    "vsunify.timer": [],
}
pytestmark = pytest.mark.skipif(
    ANALYZE is None,
    reason="no systemd-analyze (Debian's systemd package; scripts/setup installs it)",
)


def _installed(tmp_path: Path) -> Path:
    """The units with /usr/local/bin/ pointing at the venv's scripts, as install would."""
    bindir = Path(sys.executable).parent
    out = tmp_path / "units"
    out.mkdir()
    for name in UNITS:
        text = (REPO / "contrib" / name).read_text()
        (out / name).write_text(text.replace("/usr/local/bin/", f"{bindir}/"))
    return out


def test_the_guest_units_pass_systemd_analyze_verify(tmp_path):
    d = _installed(tmp_path)
    for name, instances in UNITS.items():
        for unit in [name, *instances]:
            if unit != name:
                shutil.copy(d / name, d / unit)
            p = subprocess.run(
                [ANALYZE, "verify", "--man=no", str(d / unit)], capture_output=True, text=True
            )
            assert (p.returncode, p.stdout + p.stderr) == (0, ""), unit


def test_the_units_run_our_commands(tmp_path):
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    one = (REPO / "contrib/vserver@.service").read_text()
    assert "ExecStart=/usr/local/bin/vserver %i start" in one
    assert "ExecStop=/usr/local/bin/vserver %i stop" in one
    mark = (REPO / "contrib/vservers@.service").read_text()
    assert "ExecStart=/usr/local/bin/vserver-start --mark %i" in mark
    assert "ExecStop=/usr/local/bin/vserver-stop --mark %i" in mark
    assert {"vserver", "vserver-start", "vserver-stop"} <= set(scripts)


def test_verify_sees_a_broken_unit(tmp_path):
    """The check's own check: a misspelt key and a missing command are reported."""
    d = _installed(tmp_path)
    text = (d / "vserver@.service").read_text()
    bad = text.replace("Type=forking", "Typ=forking").replace(
        f"{Path(sys.executable).parent}/vserver %i start", "/nonexistent/vserver %i start"
    )
    (d / "vserver@x.service").write_text(bad)
    p = subprocess.run(
        [ANALYZE, "verify", str(d / "vserver@x.service")], capture_output=True, text=True
    )
    assert "Typ" in p.stderr and "/nonexistent/vserver" in p.stderr
