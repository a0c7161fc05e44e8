"""Layer 7: guests that boot their own init: the init style build detects, start's refusals
(an unknown style, a start command the style would not run), the console on a real pty,
and a debootstrapped bookworm guest booting systemd (from the cached corpus,
bench/corpus.sh's bookworm-systemd; skipped with the reason when it is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from guests import BUSYBOX, CORPUS, eventually, gone, host_mounts, pid_ns, procs_in_ns
from t10_hostile import Admin

from vsstore.errors import EXIT_BUSY, EXIT_CONFIG, EXIT_STATE
from vsstore.lifecycle import initstyle
from vsstore.safetree import GuestTree

SYSTEMD_GUEST = CORPUS / "bookworm-systemd"


def _leftovers(host, st: dict, ns_ino: int | None) -> list[str]:  # type: ignore[no-untyped-def]
    out = [f"process {p}" for p in procs_in_ns(ns_ino)] if ns_ino else []
    out += [f"mount {m}" for m in host_mounts() if str(host.base) in m]
    out += [f"cgroup {d}" for d in st["cgroup"].values() if os.path.exists(d)]
    if not gone(st["monitor_pid"]):
        out.append(f"monitor {st['monitor_pid']}")
    if (host.base / "run/guests" / f"{st['name']}.json").exists():
        out.append("run state")
    if (host.base / "run/guests" / f"{st['name']}.console").exists():
        out.append("console socket")
    return out


# -- the init style ---------------------------------------------------------------------


def _style(root: Path) -> str:
    with GuestTree(root) as t:
        return initstyle.detect(t).style


def test_init_style_is_detected_from_sbin_init_resolved_inside_the_guest(tmp_path):
    root = tmp_path / "g"
    (root / "sbin").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "lib/systemd").mkdir(parents=True)
    assert _style(root) == "none"  # nothing to run
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    os.symlink("../bin/busybox", root / "sbin/init")
    assert _style(root) == "plain"  # busybox init: inittab or rcS
    os.unlink(root / "sbin/init")
    (root / "lib/systemd/systemd").write_bytes(b"\x7fELF...")
    os.symlink("/lib/systemd/systemd", root / "sbin/init")  # absolute: inside the root
    assert _style(root) == "systemd"
    os.unlink(root / "sbin/init")
    (root / "sbin/init").write_bytes(b"\x7fELF...INIT_VERSION=sysvinit-3.06...")
    assert _style(root) == "sysv"
    os.unlink(root / "sbin/init")
    (root / "sbin/init").write_text("#!/bin/sh\nexec /bin/sh\n")
    assert _style(root) == "plain"
    os.unlink(root / "sbin/init")
    # A link out of the guest is resolved inside it: the host's init is never looked at.
    os.symlink("/sbin/init", root / "sbin/init")
    assert _style(root) == "none"
    os.unlink(root / "sbin/init")
    os.mkfifo(root / "sbin/init")  # never opened for reading (it would block)
    assert _style(root) == "none"
    os.unlink(root / "sbin/init")
    os.symlink("../../../../../../../../../usr/lib/systemd/systemd", root / "sbin/init")
    assert _style(root) == "none"  # the host has one there; the guest has not


def test_build_writes_the_detected_style(vs, host):
    p = vs("build", "sk", "-m", "skeleton")
    assert (host.conf / "sk/apps/init/style").read_text() == "none\n"
    assert "init style none (no /sbin/init)" in p.stdout


def test_the_debootstrapped_systemd_guest_is_detected_as_systemd():
    if not (SYSTEMD_GUEST / ".complete").exists():
        pytest.skip(f"no {SYSTEMD_GUEST} (bench/corpus.sh builds it)")
    assert _style(SYSTEMD_GUEST) == "systemd"


@pytest.mark.parametrize(
    "conf,file,says",
    [
        ({"apps/init/style": "bogus\n"}, "apps/init/style", "unknown style 'bogus'"),
        ({"apps/init/style": "none\n"}, "apps/init/cmd.start", "style none runs no start"),
    ],
)
def test_start_refuses_an_unknown_style_and_a_start_command_it_would_ignore(
    vs, host, conf, file, says
):
    vs.guest("g1", conf=conf)  # with a cmd.start
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG, p.stderr
    assert str(host.conf / "g1" / file) in p.stderr and says in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert vs.state("g1") is None
    assert not any(str(host.base) in m for m in host_mounts())


def test_start_says_what_it_did_in_one_line(vs, host):
    vs.guest("g1")
    p = vs("start", "g1")
    st = vs.state("g1")
    (line,) = p.stdout.strip().splitlines()
    assert f"guest g1 started: style plain, init pid {st['init_pid']}" in line
    assert "vserver g1 console" in line


# -- the console --------------------------------------------------------------------------

ECHO = 'echo console-up; while read -r line; do echo "got:$line"; done'


def test_console_shows_init_output_takes_keys_and_detaches(vs, host):
    vs.guest("g1", init=ECHO, conf={"apps/init/stop-signal": "SIGKILL\n"})
    vs("start", "g1")
    st = vs.state("g1")
    log = host.base / "log/vserver-g1.log"
    assert eventually(lambda: "console-up\n" in log.read_text())  # the log, CR LF made LF
    with Admin(vs, "g1", "console") as a:
        a.expect(b"Ctrl-] three times")
        a.send(b"hello console\r")
        a.expect(b"got:hello console")
        # The admin's terminal is not the guest's: init's stdin is the guest's own pty.
        with Admin(vs, "g1", "console") as b:  # one admin at a time
            assert b.wait() == EXIT_BUSY
            assert b"attached in another session" in b.out
        a.send(b"\x1d\x1d\x1d")
        assert a.wait() == 0
        assert b"Detached" in a.out
    assert vs("running", "g1").returncode == 0  # detaching leaves the guest running
    assert eventually(lambda: "got:hello console\n" in log.read_text())
    ns_ino = pid_ns(st["init_pid"])
    with Admin(vs, "g1", "console") as a:  # attached again, then the guest stops
        a.expect(b"Ctrl-] three times")
        vs("stop", "g1")
        assert a.wait() == 0
        assert b"The guest stopped" in a.out
    assert _leftovers(host, st, ns_ino) == []
    p = vs("console", "g1", check=False)
    assert p.returncode == EXIT_STATE and "not running" in p.stderr


def test_init_console_is_dev_console_a_pty_of_the_guest(vs, host):
    vs.guest(
        "g1",
        init="ls -l /proc/self/fd/0 /proc/self/fd/1 > /var/log/fds; stat -c %t:%T /dev/console "
        "> /var/log/console; exec sleep 1000",
        conf={"apps/init/stop-signal": "SIGKILL\n"},
    )
    root = host.root / "g1"
    (root / "var/log").mkdir(parents=True, exist_ok=True)
    vs("start", "g1")
    assert eventually(
        lambda: (root / "var/log/console").exists() and (root / "var/log/console").read_text()
    )
    fds = (root / "var/log/fds").read_text()
    assert "/dev/pts/0" in fds, fds  # init's stdio: the slave of the guest's devpts
    major = int((root / "var/log/console").read_text().split(":")[0], 16)
    assert major == 136  # a pty slave (Unix98), bound over /dev/console


def test_ttys_are_ptys_of_the_guest_named_to_init_and_attachable(vs, host):
    vs.guest(
        "g1",
        init="printf 'on-%s\\n' tty1 > /dev/tty1; "  # (the log names the command)
        'while read -r l < /dev/tty2; do echo "tty2:$l" > /dev/tty2; done',
        conf={"apps/init/stop-signal": "SIGKILL\n", "apps/init/ttys": "2\n"},
    )
    vs("start", "g1")
    env = vs.exec("g1", "cat", "/proc/1/environ").split("\0")
    assert "container_ttys=pts/1 pts/2" in env  # systemd's getty generator reads it
    with Admin(vs, "g1", "console", "--tty", "1") as a:
        a.expect(b"on-tty1")  # written before anyone attached: it waited in the pty
        a.send(b"\x1d\x1d\x1d")
        assert a.wait() == 0
    with Admin(vs, "g1", "console", "--tty", "2") as a:
        a.expect(b"Ctrl-] three times")
        a.send(b"x\r")
        a.expect(b"tty2:x")
        a.send(b"\x1d\x1d\x1d")
        assert a.wait() == 0
    assert "on-tty1" not in (host.base / "log/vserver-g1.log").read_text()  # not logged
    p = vs("console", "g1", "--tty", "3", check=False)
    assert p.returncode == EXIT_CONFIG and "apps/init/ttys" in p.stderr
    (host.conf / "g1/apps/init/ttys").write_text("many\n")
    vs("stop", "g1")
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG and "apps/init/ttys" in p.stderr


# -- a guest that boots systemd -------------------------------------------------------------


def _systemd_guest(host, name: str) -> Path:  # type: ignore[no-untyped-def]
    if not (SYSTEMD_GUEST / ".complete").exists():
        pytest.skip(f"no {SYSTEMD_GUEST} (bench/corpus.sh builds it)")
    root = host.root / name
    subprocess.run(["cp", "-a", str(SYSTEMD_GUEST), str(root)], check=True)
    (root / "etc/machine-id").write_text("")  # as a fresh image: start makes one
    c = host.conf / name
    (c / "apps/init").mkdir(parents=True)
    os.symlink(root, c / "vdir")
    with GuestTree(root) as t:
        (c / "apps/init/style").write_text(initstyle.detect(t).style + "\n")
    return root


def test_a_debootstrapped_bookworm_guest_boots_systemd_and_stops_clean(vs, host):
    root = _systemd_guest(host, "sd")
    assert (host.conf / "sd/apps/init/style").read_text() == "systemd\n"
    p = vs("start", "sd")
    assert "style systemd" in p.stdout
    st = vs.state("sd")
    ns_ino = pid_ns(st["init_pid"])
    try:
        r = vs(
            "exec", "sd", "timeout", "60", "systemctl", "is-system-running", "--wait", check=False
        )
        state = r.stdout.strip()
        if state not in ("running", "degraded"):
            failed = vs("exec", "sd", "systemctl", "--failed", "--no-pager", check=False)
            pytest.fail(f"systemd says {state!r}: {r.stderr}\n{failed.stdout}")
        assert vs("exec", "sd", "systemctl", "is-active", "cron").stdout.strip() == "active"
        env = vs("exec", "sd", "cat", "/proc/1/environ").stdout.split("\0")
        assert "container=vserver" in env
        mounts = {
            ln.split()[1]: ln.split()
            for ln in vs("exec", "sd", "cat", "/proc/self/mounts").stdout.splitlines()
        }
        assert mounts["/run"][2] == "tmpfs" and mounts["/tmp"][2] == "tmpfs"
        assert mounts["/sys"][2] == "sysfs" and "ro" in mounts["/sys"][3].split(",")
        assert mounts["/sys/fs/cgroup"][2] == "cgroup2"
        # Its own cgroup namespace (exec joins it too), systemd in its own scope:
        assert "0::/init.scope" in vs("exec", "sd", "cat", "/proc/1/cgroup").stdout.split()
        mid = (root / "etc/machine-id").read_text().strip()
        assert len(mid) == 32 and int(mid, 16)  # written at start: it was empty
        assert "systemd" in (host.base / "log/vserver-sd.log").read_text()  # its console
        t0 = time.monotonic()
        vs("stop", "sd")
        print(f"stop took {time.monotonic() - t0:.1f} s")
    finally:
        vs("stop", "sd", check=False)
    assert _leftovers(host, st, ns_ino) == []
    assert "Exiting container" in (host.base / "log/vserver-sd.log").read_text()
