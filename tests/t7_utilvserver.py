"""Layer 7: a configuration taken from a util-vserver host (tests/fixtures/utilvserver: the
layout of util-vserver's /etc/vservers/NAME, with entries only a Linux-VServer kernel knew)
starts a busybox guest and says what it ignores; ``vserver NAME check``; util-vserver's
build options."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from guests import IDLE, Vserver

from conftest import REPO, Host
from vsstore.config import Paths, resolve_guest
from vsstore.errors import EXIT_CONFIG
from vsstore.lifecycle import guestconf

FIXTURE = REPO / "tests/fixtures/utilvserver/web"

# init records which signal stop sent (util-vserver's killseq names SIGUSR1)
INIT = (
    'trap "echo usr1 > /stopped-by; exit 0" USR1; trap "echo term > /stopped-by; exit 0" '
    "TERM; " + IDLE.split("; ", 1)[1]
)


def _util_vserver_guest(vs: Vserver, host: Host, name: str = "web") -> Path:
    root = vs.guest(name, init=INIT)
    for applet in ("ip", "ash"):
        os.symlink("busybox", root / "bin" / applet)
    shutil.copytree(FIXTURE, host.conf / name, symlinks=True, dirs_exist_ok=True)
    return root


def test_check_lists_every_entry_and_what_is_ignored(vs, host):
    _util_vserver_guest(vs, host)
    p = vs("check", "web")
    lines = {ln.split()[1]: ln.split()[0] for ln in p.stdout.splitlines()[:-1]}
    assert p.stdout.splitlines()[-1] == "guest web can start"
    for used in (
        "vdir",
        "context",
        "fstab",
        "interfaces/dev",
        "interfaces/prefix",
        "interfaces/00/ip",
        "interfaces/03/bcast",
        "interfaces/03/nodev",
        "interfaces/02/disabled",
        "uts/nodename",
        "uts/domainname",
        "rlimits/nproc.hard",
        "cgroup/pids.max",
        "apps/init/killseq",
        "shell",
    ):
        assert lines.pop(used) == "used", used
    for ignored in (
        "name",
        "flags",
        "ccapabilities",
        "uts/release",
        "uts/machine",
        "rlimits/nproc.min",
        "rlimits/anon.hard",
        "cgroup/name",
        "interfaces/00/novlandev",
        "dlimits/0/directory",
        "sched/fill-rate",
        "run",
        "fstab:1",  # util-vserver's default fstab: /proc and /dev/pts, which start mounts
        "fstab:3",
    ):
        assert lines.pop(ignored) == "ignored", ignored
    assert "Linux-VServer kernel" in p.stdout  # each with its reason
    assert f"the guest's root tree: {host.root / 'web'}" in p.stdout
    j = json.loads(vs("check", "web", "--json").stdout)
    assert j["can_start"] and {e["path"] for e in j["entries"]} >= {"rlimits/nproc.min"}
    # an entry start refuses: check says which and why, and exits with start's code
    (host.conf / "web/cgroup/cpuset.cpus").write_text("0-1\n")
    p = vs("check", "web", check=False)
    assert p.returncode == EXIT_CONFIG
    assert "refused  cgroup/cpuset.cpus" in p.stdout
    assert p.stdout.splitlines()[-1].startswith("guest web cannot start: ")
    assert vs("start", "web", check=False).returncode == EXIT_CONFIG


def test_a_util_vserver_configuration_starts_with_what_maps(vs, host):
    root = _util_vserver_guest(vs, host)
    p = vs("start", "web")
    assert "ignored (see 'vserver web check'): " in p.stderr
    assert "rlimits/nproc.min" in p.stderr and "cgroup/name" in p.stderr
    assert "fstab:1" in p.stderr
    # util-vserver's fstab lines for /proc and /dev/pts: ours are mounted, not theirs
    mounts = vs.exec("web", "cat", "/proc/self/mounts")
    assert [ln.split()[2] for ln in mounts.splitlines() if ln.split()[1] == "/tmp"] == ["tmpfs"]
    for target in ("/proc", "/dev/pts"):  # one mount each: start's own
        assert len([ln for ln in mounts.splitlines() if ln.split()[1] == target]) == 1
    assert vs.exec("web", "hostname").strip() == "web.example.org"
    assert vs.exec("web", "cat", "/proc/sys/kernel/domainname").strip() == "example.org"
    # interfaces/dev names the guest's interface; two addresses on eth0 share it
    eth0 = vs.exec("web", "ip", "-4", "addr", "show", "eth0")
    assert "inet 10.77.1.2/23" in eth0 and "inet 10.77.1.3/23" in eth0
    eth1 = vs.exec("web", "ip", "-4", "addr", "show", "eth1")
    assert "inet 10.78.0.2/24 brd 10.78.0.255" in eth1
    assert "10.77.9.9" not in vs.exec("web", "ip", "-4", "addr")  # disabled
    limits = vs.exec("web", "cat", "/proc/self/limits")
    assert [ln.split()[2:4] for ln in limits.splitlines() if ln.startswith("Max processes")] == [
        ["400", "500"]
    ]
    # shell: what enter runs
    p = vs("enter", "web", input="echo shell=$0\nexit 0\n")
    assert "shell=/bin/ash" in p.stdout, p.stdout + p.stderr
    # killseq: its first signal is what stop sends
    vs("stop", "web")
    assert (root / "stopped-by").read_text() == "usr1\n"


def test_build_takes_util_vserver_network_options(vs, host):
    vs(
        "build",
        "test2",
        "-m",
        "skeleton",
        "--hostname",
        "test2.nowhe.re",
        "--interface",
        "10.0.1.2",
        "--interface",
        "alias=eth1:10.0.2.5/24",
        "--netdev",
        "eth0",
        "--netprefix",
        "23",
        "--context",
        "44",
    )
    c = host.conf / "test2"
    assert (c / "interfaces/dev").read_text() == "eth0\n"
    assert (c / "interfaces/prefix").read_text() == "23\n"
    cfg = guestconf.load(resolve_guest("test2", Paths.from_env()))
    assert [(str(i.ip), i.name) for i in cfg.interfaces] == [
        ("10.0.1.2/23", "eth0"),
        ("10.0.2.5/24", "eth1"),
    ]
    assert cfg.context == 44 and cfg.nodename == "test2.nowhe.re"
    p = vs(
        "build", "bad", "-m", "skeleton", "--interface", "10.0.0.1", "--netprefix", "x", check=False
    )
    assert p.returncode == EXIT_CONFIG and "--netprefix" in p.stderr
    assert not (host.conf / "bad").exists()
