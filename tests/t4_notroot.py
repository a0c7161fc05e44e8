"""Layer 4: every command that needs root, run for real by an unprivileged uid (``setpriv``
to nobody), says so in one line with its own exit code and does nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, Host
from vsstore.errors import EXIT_NOTROOT

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

ENTRY = {
    "vsunify": ("unify.cli", "main"),
    "vsattr": ("vsstore.vsattr", "main"),
    "vscow": ("cow.cli", "main"),
    "vserver": ("vsstore.lifecycle.cli", "main"),
    "vserver-stat": ("vsstore.lifecycle.cli", "stat_main"),
    "vapt-get": ("vsstore.lifecycle.cli", "vapt_get_main"),
    "vrpm": ("vsstore.lifecycle.cli", "vrpm_main"),
    "vserver-start": ("vsstore.lifecycle.marks", "start_main"),
    "vserver-stop": ("vsstore.lifecycle.marks", "stop_main"),
}

COMMANDS = [
    "vsunify run --all",
    "vsunify run g",
    "vsunify deunify g",
    "vsunify gc",
    "vsunify report --all",
    "vsunify demo",
    "vserver g build",
    "vserver new build -m skeleton",
    "vserver g start",
    "vserver g stop",
    "vserver g status",
    "vserver g exec true",
    "vserver g enter",
    "vserver g delete --force",
    "vserver g suexec nobody true",
    "vserver list",
    "vserver list --json",
    "vserver-start --mark default",
    "vserver-stop --mark default",
    "vserver g apt-get update",
    "vserver g pkg upgrade",
    "vserver-stat",
    "vapt-get g -- update",
    "vrpm g -- -qa",
    "vscow mount --at {base}/cow g",
    "vscow umount {base}/cow",
    "vsattr set {base}/vservers/g/usr/f",
    "vsattr clear --immutable {base}/vservers/g/usr/f",
]


def _as_nobody(host: Host, line: str) -> subprocess.CompletedProcess[str]:
    prog, *args = line.format(base=host.base).split()
    mod, fn = ENTRY[prog]
    return subprocess.run(
        [
            *NOBODY,
            sys.executable,
            "-c",
            f"import sys; from {mod} import {fn}; sys.exit({fn}(sys.argv[1:]))",
            *args,
        ],
        cwd=REPO,
        env={**os.environ, **host.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def readable_host(host: Host) -> Host:
    """A configured guest g; the test directory readable by anyone (so that what a command
    meets first is its own privilege check, not a directory it cannot enter)."""
    host.guest("g", {"usr/f": b"data" * 10})
    os.chmod(host.base, 0o755)
    return host


@pytest.mark.parametrize("line", COMMANDS)
def test_a_command_that_needs_root_says_so_in_one_line(readable_host, line):
    host = readable_host
    before = sorted(p.name for p in host.base.rglob("*"))
    p = _as_nobody(host, line)
    assert p.returncode == EXIT_NOTROOT, p.stdout + p.stderr
    assert p.stdout == "" and len(p.stderr.splitlines()) == 1, p.stderr
    assert "needs root" in p.stderr and "run it as root" in p.stderr
    assert sorted(p.name for p in host.base.rglob("*")) == before  # nothing done


def test_what_needs_no_root_still_works_for_others(readable_host):
    host = readable_host
    p = _as_nobody(host, "vsattr show {base}/vservers/g/usr/f")
    assert p.returncode == 0, p.stderr
    p = _as_nobody(host, "vscow status")
    assert p.returncode == 0, p.stderr
    p = _as_nobody(host, "vserver g check")  # reads the configuration only
    assert p.returncode == 0 and "guest g can start" in p.stdout, p.stdout + p.stderr
