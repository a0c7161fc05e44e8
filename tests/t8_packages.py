"""Layer 8: package upgrades inside unified Debian guests (copies of the cached debootstrap
corpus): through the overlay (`exec --cow`, `vapt-get`), running and stopped, with a
package built here by dpkg-deb; and the protection when no wrapper is used."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guests import CORPUS, Vserver, debian_guest, eventually, host_mounts

from conftest import REPO, flags, inode

pytestmark = pytest.mark.skipif(
    not (CORPUS / "bookworm-minbase/.complete").exists(),
    reason=f"no Debian corpus in {CORPUS}: run bench/corpus.sh (scripts/setup test does)",
)

SAME = b"this file does not change between versions\n" * 100
V1 = b"version one\n" * 300
V2 = b"version two\n" * 300


def _deb(work: Path, version: str, text: bytes) -> Path:
    """vstest VERSION: /usr/share/vstest/same.txt (equal in both) and version.txt."""
    root = work / f"vstest-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: vstest\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\n"
        f"Description: vsstore test package\n"
    )
    d = root / "usr/share/vstest"
    d.mkdir(parents=True)
    (d / "same.txt").write_bytes(SAME)
    (d / "version.txt").write_bytes(text)
    for p in (d / "same.txt", d / "version.txt"):
        os.utime(p, (1_600_000_000, 1_600_000_000))
    out = work / f"vstest_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture
def debs(host):  # type: ignore[no-untyped-def]
    """Guests a and b (Debian), vstest 1.0 installed in both, unified; returns Vserver."""
    vs = Vserver(host)
    (host.root).mkdir(exist_ok=True)
    work = host.base / "debs"
    work.mkdir()
    pkgs = {"1.0": _deb(work, "1.0", V1), "2.0": _deb(work, "2.0", V2)}
    for g in ("a", "b"):
        debian_guest(host, g)
        for p in pkgs.values():
            (host.root / g / "root" / p.name).write_bytes(p.read_bytes())
        r = vs("exec", g, "--cow", "dpkg", "-i", f"/root/{pkgs['1.0'].name}")
        assert r.returncode == 0
    host.vsunify("run", "a", "b")
    vs.pkgs = {v: f"/root/{p.name}" for v, p in pkgs.items()}  # type: ignore[attr-defined]
    try:
        yield vs
    finally:
        for g in ("a", "b"):
            if vs.state(g):
                vs("stop", g, check=False)


VERSION = "usr/share/vstest/version.txt"
SAME_F = "usr/share/vstest/same.txt"


def _object_of(host, rel: str) -> tuple[int, bytes, int, str]:  # type: ignore[no-untyped-def]
    p = host.root / "b" / rel
    st = os.stat(p)
    return st.st_ino, p.read_bytes(), st.st_mode, flags(p)


def _verify(vs, g: str, running: bool) -> None:  # type: ignore[no-untyped-def]
    p = vs("exec", g, *([] if running else ["--cow"]), "dpkg", "--verify", "vstest", check=False)
    assert p.returncode == 0 and p.stdout == "", p.stdout + p.stderr


def _upgrade_flow(vs, host, running: bool) -> None:  # type: ignore[no-untyped-def]
    a, b = host.root / "a", host.root / "b"
    assert inode(a / VERSION) == inode(b / VERSION) and flags(b / VERSION) == "UIa"
    shared = _object_of(host, VERSION)
    if running:
        vs("start", "a")
    p = vs("exec", "a", "--cow", "dpkg", "-i", vs.pkgs["2.0"], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (a / VERSION).read_bytes() == V2
    if running:  # the running guest sees the change at once
        assert vs.exec("a", "cat", "/" + VERSION).encode() == V2
    assert (b / VERSION).read_bytes() == V1
    assert _object_of(host, VERSION) == shared  # the shared inode: content, mode, flags
    assert os.stat(b / VERSION).st_nlink >= 2
    _verify(vs, "a", running)
    _verify(vs, "b", False)
    # b upgrades too, through vapt-get (a local .deb, no network): then both share v2
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vsstore.lifecycle.cli import "
            "vapt_get_main as m; sys.exit(m(sys.argv[1:]))",
            "b",
            "--",
            "install",
            "-y",
            vs.pkgs["2.0"],
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (b / VERSION).read_bytes() == V2
    assert inode(a / VERSION) == inode(b / VERSION)  # shared again, also while a runs
    assert flags(a / VERSION) == "UIa"
    assert inode(a / SAME_F) == inode(b / SAME_F)
    _verify(vs, "b", False)
    # removing the package in a leaves b intact
    p = vs("exec", "a", "--cow", "dpkg", "-r", "vstest", check=False)
    assert p.returncode == 0, p.stderr
    assert not (a / VERSION).exists()
    assert (b / VERSION).read_bytes() == V2 and (b / SAME_F).read_bytes() == SAME
    _verify(vs, "b", False)
    assert not any(
        "vscow" in m or "/run/cow" in m for m in host_mounts() if str(host.base) in m
    )  # no temporary overlay left


def test_upgrade_a_stopped_guest_through_the_overlay(debs, host):
    _upgrade_flow(debs, host, running=False)


def test_upgrade_a_running_guest_through_the_overlay(debs, host):
    _upgrade_flow(debs, host, running=True)
    assert debs("running", "a").returncode == 0


def test_a_package_manager_run_directly_fails_and_changes_no_other_guest(debs, host):
    b_before = (host.root / "b" / VERSION).read_bytes()
    shared = _object_of(host, VERSION)
    debs("start", "a")
    p = debs("exec", "a", "apt-get", "install", "-y", debs.pkgs["2.0"], check=False)
    assert p.returncode != 0
    assert "Operation not permitted" in p.stdout + p.stderr
    assert (host.root / "b" / VERSION).read_bytes() == b_before
    assert _object_of(host, VERSION) == shared
    status = debs("status", "a").stdout
    assert "vapt-get a" in status and "exec --cow" in status


def test_a_killed_upgrade_leaves_no_mount_behind(debs, host):
    cow = str(host.base / "run/cow")
    p = debs("exec", "a", "--cow", "sh", "-c", "kill -9 $$", check=False)
    assert p.returncode == 137
    assert cow not in host_mounts()
    # the vserver process itself signalled, then killed outright
    proc = _exec_cow_in_background(debs, cow, "sleep", "60")
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # passed on to the command; the share goes
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert cow not in host_mounts()
    proc = _exec_cow_in_background(debs, cow, "sleep", "2")
    proc.kill()  # no clean-up at all: its share is swept by the next exec --cow
    proc.wait()
    time.sleep(2.5)  # the command ends by itself
    state = json.loads(next((host.base / "run/vscow").glob("*.json")).read_text())
    assert f"a~{proc.pid}" in state["guests"]
    assert debs("exec", "b", "--cow", "true").returncode == 0  # sweeps the stale share
    assert cow not in host_mounts()


def _exec_cow_in_background(vs, cow: str, *cmd: str) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """``vserver a exec --cow CMD`` started, returned once the overlay is mounted."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsstore.lifecycle.cli", "a", "exec", "--cow", *cmd],
        cwd=REPO,
        env=vs.env,
    )
    if not eventually(lambda: cow in host_mounts()):
        proc.kill()
        raise AssertionError("the overlay never came up")
    return proc


def test_vsunify_leaves_out_a_guest_whose_package_manager_holds_its_lock(debs, host):
    for g in "ab":  # something to do
        (host.root / g / "usr/share/extra").write_bytes(b"x" * 5000)
        os.utime(host.root / g / "usr/share/extra", (1_600_000_000, 1_600_000_000))
    fd = os.open(host.root / "a/var/lib/dpkg/lock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # as dpkg does (fcntl write lock)
        p = host.vsunify("run", "a", "b", check=False)
        assert p.returncode == 6
        assert (
            f"guest 'a' skipped: a package manager (pid {os.getpid()}) holds "
            f"/var/lib/dpkg/lock" in p.stderr
        )
        assert os.stat(host.root / "a/usr/share/extra").st_nlink == 1
    finally:
        os.close(fd)
    host.vsunify("run", "a", "b")
    assert inode(host.root / "a/usr/share/extra") == inode(host.root / "b/usr/share/extra")
