"""Layer 7: operations over many guests: the nightly ``vsunify run --all`` beside a running
cow guest, package commands over ``--all``, ``--running`` and ``--mark`` followed by one
vsunify run over every guest touched."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from guests import Vserver

from conftest import REPO, Host
from vsstore.errors import EXIT_CONFIG, EXIT_OK, EXIT_PARTIAL

SHARED = b"the same data in every guest\n" * 50


def test_run_all_skips_a_running_cow_guest_with_a_warning_and_exit_6(vs, host):
    for g in ("g1", "g2", "g3"):
        vs.guest(g, files={"usr/share/data": SHARED})
    (host.conf / "g1/cow").touch()
    vs("start", "g1")
    p = host.vsunify("run", "--json", "--all", check=False)
    assert p.returncode == EXIT_PARTIAL, p.stderr
    assert "warning: guest 'g1' skipped: the cow overlay" in p.stderr
    assert json.loads(p.stdout)["guests"] == 2  # the others are unified all the same
    assert (
        os.stat(host.root / "g2/usr/share/data").st_ino
        == os.stat(host.root / "g3/usr/share/data").st_ino
    )
    assert os.stat(host.root / "g1/usr/share/data").st_nlink == 1
    # named explicitly, the guest is still refused (the busy code): nothing is done
    p = host.vsunify("run", "g1", "g2", check=False)
    assert p.returncode == 5 and "cow overlay" in p.stderr
    vs("stop", "g1")
    assert host.vsunify("run", "--all").returncode == EXIT_OK
    assert os.stat(host.root / "g1/usr/share/data").st_nlink == 4


# A package manager stand-in (a guest's own shell script, run inside the guest through
# the overlay): it records its call and installs the same new file in every guest.
PKG = b"""#!/bin/sh
echo "$(basename $0) $*" >> /pkg-calls
mkdir -p /usr/share/fleet
echo "one new file, the same in every guest after the upgrade" > /usr/share/fleet/new.txt
touch -t 202001010000 /usr/share/fleet/new.txt
"""
NEW = "usr/share/fleet/new.txt"


def _fleet_guest(vs: Vserver, host: Host, name: str, mark: str | None = None) -> Path:
    root = vs.guest(
        name,
        files={"usr/bin/apt-get": PKG, "usr/bin/rpm": PKG, "var/lib/dpkg/status": b""},
        conf={"apps/init/mark": f"{mark}\n"} if mark else None,
    )
    for tool in ("usr/bin/apt-get", "usr/bin/rpm"):
        os.chmod(root / tool, 0o755)
    for applet in ("mkdir", "touch", "basename"):
        os.symlink("busybox", root / "bin" / applet)
    return root


def _runs(host: Host) -> int:
    db = sqlite3.connect(host.index)
    try:
        return int(db.execute("SELECT count(*) FROM run").fetchone()[0])
    finally:
        db.close()


def _wrapper(vs: Vserver, prog: str, *args: str) -> subprocess.CompletedProcess[str]:
    fn = {"vapt-get": "vapt_get_main", "vrpm": "vrpm_main"}[prog]
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from vsstore.lifecycle.cli import {fn} as m; sys.exit(m(sys.argv[1:]))",
            *args,
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _calls(host: Host, name: str) -> list[str]:
    f = host.root / name / "pkg-calls"
    return f.read_text().splitlines() if f.exists() else []


def test_vapt_get_by_mark_runs_in_the_marked_guests_then_one_vsunify(vs, host):
    for name, mark in (("g1", "web"), ("g2", "web"), ("g3", "db"), ("g4", None)):
        _fleet_guest(vs, host, name, mark)
    host.vsunify("run", "--all")
    runs = _runs(host)
    p = _wrapper(vs, "vapt-get", "--mark", "web", "--", "install", "-y", "nginx")
    assert p.returncode == EXIT_OK, p.stdout + p.stderr
    assert _calls(host, "g1") == _calls(host, "g2") == ["apt-get install -y nginx"]
    assert _calls(host, "g3") == _calls(host, "g4") == []
    assert _runs(host) == runs + 1  # one vsunify run for the two guests
    assert os.stat(host.root / "g1" / NEW).st_ino == os.stat(host.root / "g2" / NEW).st_ino
    # vrpm --all: every configured guest, still one run
    p = _wrapper(vs, "vrpm", "--all", "--", "-qa")
    assert p.returncode == EXIT_OK, p.stdout + p.stderr
    assert all(_calls(host, g)[-1] == "rpm -qa" for g in ("g1", "g2", "g3", "g4"))
    assert _runs(host) == runs + 2
    assert len({os.stat(host.root / g / NEW).st_ino for g in ("g1", "g2", "g3", "g4")}) == 1
    # a mark nobody has: a clear error, nothing run
    p = _wrapper(vs, "vapt-get", "--mark", "nosuch", "--", "update")
    assert p.returncode == EXIT_CONFIG and "apps/init/mark" in p.stderr


def test_vserver_running_pkg_touches_only_running_guests(vs, host):
    for name in ("g1", "g2", "g3"):
        _fleet_guest(vs, host, name)
    vs("start", "g2")
    p = vs("pkg", "--running", "update")  # the selection where the name goes
    assert p.returncode == EXIT_OK, p.stdout + p.stderr
    assert _calls(host, "g2") == ["apt-get update"]
    assert _calls(host, "g1") == _calls(host, "g3") == []
    # a guest without a package manager fails alone; the others are done (exit 6)
    (host.root / "g3/var/lib/dpkg/status").unlink()
    p = vs("pkg", "--all", "upgrade", check=False)
    assert p.returncode == EXIT_PARTIAL, p.stdout + p.stderr
    assert "g3: error: cannot tell the guest's package manager" in p.stderr
    assert "failed in 1 of 3 guests: g3 (exit 3)" in p.stderr
    assert _calls(host, "g1") == ["apt-get upgrade -y"]
    assert _calls(host, "g2") == ["apt-get update", "apt-get upgrade -y"]
    p = vs("start", "--all", check=False)
    assert p.returncode == EXIT_CONFIG and "apt-get, pkg, rpm only" in p.stderr


def test_the_follow_up_vsunify_waits_for_the_lock_and_says_so(vs, host):
    _fleet_guest(vs, host, "g1")
    _fleet_guest(vs, host, "g2")
    lock = host.base / "run" / "vsunify.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a nightly run holds it
        os.write(fd, b"4242\n")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from vsstore.lifecycle.cli import vapt_get_main as m; "
                "sys.exit(m(sys.argv[1:]))",
                "--all",
                "--",
                "upgrade",
            ],
            cwd=REPO,
            env=vs.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        seen = ""
        while "waiting up to" not in seen:
            line = proc.stderr.readline()
            assert line, seen  # it must wait, not give up
            seen += line
        assert "vsunify lock (held by pid 4242)" in seen
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, seen + err
    assert os.stat(host.root / "g1" / NEW).st_ino == os.stat(host.root / "g2" / NEW).st_ino
