"""Layer 7: guests in a user namespace of their own over an idmapped root (issue 16):
guest root is an unprivileged host uid, its files look and stay as on disk, what it keeps
of its capabilities holds inside its namespace only, and vsunify shares inodes across
guests with different ranges and a classic one.  Real guests (busybox skeletons), and the
static probe of t10_seccomp for the calls busybox has no applet for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from guests import BUSYBOX, host_mounts, pid_ns, procs_in_ns, static_program
from t7_admin import _list

from conftest import REPO
from vsstore.errors import EXIT_CONFIG, EXIT_STATE

R1, R2 = 2_000_000_000 - 2 * 65536, 2_000_000_000 - 4 * 65536  # two ranges of our own

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <unistd.h>

/* probe CALL...: make each call and print "CALL ERRNO" (0: it succeeded); chattr-i acts
 * on /etc/sealed (immutable), trusted on /etc/plain */
static long call(const char *n)
{
    if (!strcmp(n, "chattr-i")) {
        int fd = open("/etc/sealed", O_RDONLY), flags = 0;
        if (fd < 0 || ioctl(fd, FS_IOC_GETFLAGS, &flags) < 0) return -1;
        flags &= ~FS_IMMUTABLE_FL;
        return ioctl(fd, FS_IOC_SETFLAGS, &flags);
    }
    if (!strcmp(n, "trusted")) return setxattr("/etc/plain", "trusted.x", "1", 1, 0);
    if (!strcmp(n, "keyctl")) return syscall(SYS_keyctl, 0, -3, 0);
    if (!strcmp(n, "bpf")) {  /* a map only a holder of CAP_BPF may create */
        unsigned int attr[16] = { 7 /* STACK_TRACE */, 4, 8, 1 };
        return syscall(SYS_bpf, 0 /* MAP_CREATE */, attr, sizeof attr);
    }
    if (!strcmp(n, "open_by_handle_at")) {
        struct file_handle *h = malloc(sizeof *h + 128);
        int mnt;
        h->handle_bytes = 128;
        if (name_to_handle_at(AT_FDCWD, "/etc", h, &mnt, 0) < 0) return -1;
        return open_by_handle_at(AT_FDCWD, h, O_RDONLY);
    }
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        long r = call(argv[i]);
        printf("%s %d\n", argv[i], r < 0 ? errno : 0);
    }
    return 0;
}
"""
EPERM = 1


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_program(tmp_path_factory.mktemp("userns"), PROBE_C)


def _userns_guest(vs, host, name, start=None, conf=None, files=None):
    root = vs.guest(name, conf=conf, files=files)
    args = ["enable"] + (["--start", str(start)] if start else [])
    out = vs("userns", name, *args).stdout
    assert "user namespace enabled" in out
    return root


def _status(pid: int) -> dict[str, str]:
    text = open(f"/proc/{pid}/status").read()
    return dict(ln.split(":\t", 1) for ln in text.splitlines() if ":\t" in ln)


def test_guest_root_is_uid_0_inside_and_an_unprivileged_uid_outside(vs, host):
    _userns_guest(vs, host, "g1", start=R1)
    assert (host.conf / "g1/userns/uid").read_text() == f"{R1} 65536\n"
    listed = json.loads(_list(vs, "--json"))["guests"]
    assert [g["userns"] for g in listed] == [R1]
    vs("start", "g1")
    assert vs.exec("g1", "id", "-u").strip() == "0"
    assert vs.exec("g1", "id", "-g").strip() == "0"
    rows = [ln.split() for ln in _list(vs).splitlines()]
    assert rows[0][6] == "ROOT" and rows[1][:2] == ["g1", "running"] and rows[1][6] == str(R1)
    assert vs.exec("g1", "cat", "/proc/self/uid_map").split() == ["0", str(R1), "65536"]
    assert vs.exec("g1", "cat", "/proc/self/gid_map").split() == ["0", str(R1), "65536"]
    st = vs.state("g1")
    assert st["userns"] == [R1, 65536, R1, 65536]
    s = _status(st["init_pid"])
    assert s["Uid"].split() == [str(R1)] * 4  # the host sees START+0
    assert s["Gid"].split() == [str(R1)] * 4
    # the guest's files look as they are on disk: root's are root's
    assert vs.exec("g1", "stat", "-c", "%u:%g", "/bin/busybox").strip() == "0:0"
    assert "user namespace" in vs("status", "g1").stdout


def test_what_guest_root_creates_is_stored_as_uid_0_and_its_users_as_theirs(vs, host):
    root = _userns_guest(vs, host, "g1", start=R1)
    vs("start", "g1")
    vs.exec("g1", "sh", "-c", "echo hi > /made-by-root && mkdir /d && chown 1000:1000 /d")
    st = os.stat(root / "made-by-root")
    assert (st.st_uid, st.st_gid) == (0, 0)  # through the idmap: shareable with any guest
    assert vs.exec("g1", "stat", "-c", "%u", "/made-by-root").strip() == "0"
    assert os.stat(root / "d").st_uid == 1000


def _calls(vs, name: str, *calls: str) -> dict[str, int]:
    out = vs.exec(name, "/bin/probe", *calls)
    return {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines()}


def test_the_default_filter_refuses_the_issues_calls_in_a_namespaced_guest(vs, host, probe):
    root = _userns_guest(vs, host, "g1", start=R1, files={"bin/probe": probe.read_bytes()})
    os.chmod(root / "bin/probe", 0o755)
    vs("start", "g1")
    got = _calls(vs, "g1", "keyctl", "bpf", "open_by_handle_at")
    assert got == {"keyctl": EPERM, "bpf": EPERM, "open_by_handle_at": EPERM}


def test_capabilities_hold_only_inside_its_namespace(vs, host, probe):
    """Granted CAP_SYS_ADMIN and CAP_LINUX_IMMUTABLE (and bpf let through the filter), guest
    root can neither lift the immutable flag, nor set trusted.* attributes, nor use bpf:
    those need the host's namespace.  A classic guest with the same grants can (so the
    test shows what the namespace adds)."""
    conf = {
        "bcapabilities": "CAP_SYS_ADMIN\nCAP_LINUX_IMMUTABLE\n",
        "seccomp": "+bpf\n",
    }
    files = {"bin/probe": probe.read_bytes(), "etc/sealed": b"x\n", "etc/plain": b"y\n"}
    roots = {
        "cls": vs.guest("cls", conf=conf, files=files),
        "usr": _userns_guest(vs, host, "usr", start=R1, conf=conf, files=files),
    }
    got = {}
    for name, root in roots.items():
        os.chmod(root / "bin/probe", 0o755)
        subprocess.run(["chattr", "+i", str(root / "etc/sealed")], check=True)
        vs("start", name)
        got[name] = _calls(vs, name, "chattr-i", "trusted", "bpf")
        vs.exec(name, "busybox", "mkdir", "-p", "/m")
        mount = vs("exec", name, "mount", "-t", "tmpfs", "none", "/m", check=False)
        got[name]["mount"] = mount.returncode
        vs("stop", name)
        subprocess.run(["chattr", "-i", str(root / "etc/sealed")], check=True)
    assert got["cls"]["trusted"] == 0 and got["cls"]["chattr-i"] == 0  # the grant works
    assert got["cls"]["bpf"] != EPERM
    assert {k: got["usr"][k] for k in ("trusted", "chattr-i", "bpf")} == dict.fromkeys(
        ("trusted", "chattr-i", "bpf"), EPERM
    )
    # mounting is its own namespace's business (as with systemd-nspawn -U); a classic
    # guest's mounts would be the host's, and its filter refuses them
    assert got["usr"]["mount"] == 0 and got["cls"]["mount"] != 0
    assert not [m for m in host_mounts() if m.endswith("/m")]


def test_exec_enter_suexec_veth_and_cgroup_work_inside(vs, host):
    root = _userns_guest(
        vs,
        host,
        "g1",
        start=R1,
        conf={
            "interfaces/0/ip": "10.231.9.2\n",
            "interfaces/0/prefix": "24\n",
            "interfaces/0/hostip": "10.231.9.1\n",
            "context": "79\n",
            "uts/nodename": "inside.example\n",
            "fstab": "none /tmp tmpfs size=1m,mode=1777 0 0\n",
            "cgroup/pids.max": "50\n",
        },
        files={"etc/passwd": b"root:x:0:0::/root:/bin/sh\nwww:x:33:33::/var/www:/bin/sh\n"},
    )
    (root / "bin/ip").symlink_to("busybox")
    vs("start", "g1")
    assert vs.exec("g1", "hostname").strip() == "inside.example"
    assert "10.231.9.2/24" in vs.exec("g1", "ip", "addr", "show", "eth0")
    p = subprocess.run(
        [BUSYBOX, "ping", "-c", "1", "-W", "5", "10.231.9.2"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    # the fstab tmpfs is the guest root's to use, like the rest of its tree
    vs.exec("g1", "sh", "-c", "touch /tmp/x && chown 33 /tmp/x")
    assert vs.exec("g1", "stat", "-c", "%u", "/tmp/x").strip() == "33"
    assert vs("suexec", "g1", "www", "id", "-u").stdout.strip() == "33"
    out = vs("enter", "g1", input="id -u; cat /proc/self/uid_map\nexit\n").stdout
    assert "0" in out.split() and str(R1) in out.split()
    assert "vserver-g1" in vs.exec("g1", "cat", "/proc/self/cgroup")
    st = vs.state("g1")
    limits = [
        Path(d) / "pids.max" for d in st["cgroup"].values() if (Path(d) / "pids.max").exists()
    ]
    assert limits and all(f.read_text().strip() == "50" for f in limits)
    assert st["init_pid"] in [
        int(x) for f in limits for x in (f.parent / "cgroup.procs").read_text().split()
    ]
    assert vs.exec("g1", "cat", "/proc/self/limits")  # readable, and /proc is the guest's
    ps = vs.exec("g1", "ps", "-o", "pid")
    assert all(int(p) < 50 for p in ps.split()[1:])
    (row,) = [r for r in vs.stat() if r["name"] == "g1"]  # vserver-stat sees it as any guest
    assert row["processes"] == len(procs_in_ns(pid_ns(vs.state("g1")["init_pid"])))
    assert row["processes"] >= 1 and row["context"] == 79
    vs("stop", "g1")
    assert not [m for m in host_mounts() if str(host.base) in m]
    assert subprocess.run(["ip", "link", "show", "vs79g1.0"], capture_output=True).returncode != 0


def test_enable_disable_and_refusals(vs, host):
    vs.guest("g1")
    vs.guest("g2")
    assert "no user namespace" in vs("userns", "g1", "show").stdout
    out = vs("userns", "g1", "enable").stdout
    start = int((host.conf / "g1/userns/uid").read_text().split()[0])
    assert str(start) in out and start % 65536 == 0 and start >= 65536
    vs("userns", "g2", "enable")
    start2 = int((host.conf / "g2/userns/uid").read_text().split()[0])
    assert abs(start2 - start) >= 65536  # never the same ids
    assert f"{start}..{start + 65535}" in vs("userns", "g1", "show").stdout
    vs("build", "g3", "-m", "skeleton", "--userns")
    start3 = int((host.conf / "g3/userns/uid").read_text().split()[0])
    assert start3 not in (start, start2)
    vs("build", "g4", "-m", "clone", "--", "--source", "g2")  # a copy gets a range of its own
    start4 = int((host.conf / "g4/userns/uid").read_text().split()[0])
    assert start4 not in (start, start2, start3)
    p = vs("userns", "g2", "enable", "--start", str(start + 10), check=False)
    assert p.returncode == EXIT_CONFIG and "overlap" in p.stderr
    p = vs("userns", "g2", "enable", "--start", "1000", check=False)
    assert p.returncode == EXIT_CONFIG and "at least" in p.stderr
    vs("start", "g1")
    p = vs("userns", "g1", "disable", check=False)
    assert p.returncode == EXIT_STATE and "stop it first" in p.stderr
    vs("stop", "g1")
    assert "removed" in vs("userns", "g1", "disable").stdout
    assert not (host.conf / "g1/userns").exists()
    vs("start", "g1")
    assert vs.state("g1")["userns"] is None
    vs("stop", "g1")
    # a cow guest cannot have one; exec --cow of a namespaced guest is refused
    (host.conf / "g1/cow").write_text("")
    p = vs("userns", "g1", "enable", check=False)
    assert p.returncode == EXIT_CONFIG and "cow" in p.stderr
    p = vs("exec", "g2", "--cow", "true", check=False)
    assert p.returncode == EXIT_CONFIG and "user namespace" in p.stderr
    for flag in ("cow", "spaces/hostnet"):  # written after enable: start refuses, naming both
        (host.conf / "g2" / flag).parent.mkdir(exist_ok=True)
        (host.conf / "g2" / flag).write_text("")
        p = vs("start", "g2", check=False)
        assert p.returncode == EXIT_CONFIG and "exclude each other" in p.stderr
        assert flag in p.stderr and vs.state("g2") is None
        (host.conf / "g2" / flag).unlink()
    # bad files: one line naming the file
    (host.conf / "g2/userns/gid").write_text("lots\n")
    p = vs("start", "g2", check=False)
    assert p.returncode == EXIT_CONFIG and "userns/gid" in p.stderr and "auto" in p.stderr
    (host.conf / "g2/userns/gid").unlink()
    p = vs("start", "g2", check=False)
    assert p.returncode == EXIT_CONFIG and "userns/gid" in p.stderr
    # 'auto' written by hand is resolved at start and recorded
    (host.conf / "g2/userns/uid").write_text("auto\n")
    (host.conf / "g2/userns/gid").write_text("auto\n")
    vs("start", "g2")
    assert (host.conf / "g2/userns/uid").read_text().split()[1] == "65536"
    vs("stop", "g2")


def test_two_namespaced_guests_and_a_classic_one_share_inodes_after_vsunify(vs, host):
    common = {"usr/lib/libshared.so": os.urandom(40_000)}
    roots = {
        "a": _userns_guest(vs, host, "a", start=R1, files=common),
        "b": _userns_guest(vs, host, "b", start=R2, files=common),
        "c": vs.guest("c", files=common),
    }
    # a file guest root writes inside a namespaced guest lands as uid 0 on disk, so the
    # next vsunify can share it with the classic guest's identical one
    vs("start", "a")
    vs.exec("a", "sh", "-c", "echo same-content-for-all > /usr/lib/written.txt")
    vs("stop", "a")
    for name in ("b", "c"):
        (roots[name] / "usr/lib/written.txt").write_text("same-content-for-all\n")
        os.utime(
            roots[name] / "usr/lib/written.txt",
            ns=(os.stat(roots["a"] / "usr/lib/written.txt").st_mtime_ns,) * 2,
        )
    p = subprocess.run(
        [sys.executable, "-m", "unify.cli", "run", "--all", "--min-size", "1"],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    for rel in ("usr/lib/libshared.so", "bin/busybox", "usr/lib/written.txt"):
        inos = {os.stat(r / rel).st_ino for r in roots.values()}
        assert len(inos) == 1, rel
    for name in ("a", "b", "c"):
        vs("start", name)
    for name in ("a", "b"):  # the shared, immutable files are theirs to read and run
        assert vs.exec(name, "stat", "-c", "%u %h", "/usr/lib/libshared.so").split()[0] == "0"
        p = vs("exec", name, "sh", "-c", "echo x >> /usr/lib/libshared.so", check=False)
        assert p.returncode != 0  # still sealed for guest root
    for name in ("a", "b", "c"):
        vs("stop", name)


def test_a_debootstrapped_systemd_guest_boots_in_its_namespace_and_stops_clean(vs, host):
    from t7_boot import _leftovers, _systemd_guest

    root = _systemd_guest(host, "sd")
    vs("userns", "sd", "enable", "--start", str(R1))
    vs("start", "sd")
    st = vs.state("sd")
    ns_ino = pid_ns(st["init_pid"])
    try:
        r = vs(
            "exec", "sd", "timeout", "60", "systemctl", "is-system-running", "--wait", check=False
        )
        if r.stdout.strip() not in ("running", "degraded"):
            failed = vs("exec", "sd", "systemctl", "--failed", "--no-pager", check=False)
            pytest.fail(f"systemd says {r.stdout.strip()!r}: {r.stderr}\n{failed.stdout}")
        assert vs("exec", "sd", "systemctl", "is-active", "cron").stdout.strip() == "active"
        assert _status(st["init_pid"])["Uid"].split()[0] == str(R1)
        for pid in procs_in_ns(ns_ino):  # no process of the guest is a host uid below START
            assert int(_status(pid)["Uid"].split()[0]) >= R1
        # its cgroup2 directory is delegated to its root, as systemd-nspawn -U does
        assert os.stat(st["cgroup"]["cgroup2"]).st_uid == R1
        assert "0::/init.scope" in vs("exec", "sd", "cat", "/proc/1/cgroup").stdout.split()
        mid = root / "etc/machine-id"
        assert len(mid.read_text().strip()) == 32 and os.stat(mid).st_uid == 0
        vs("stop", "sd")
    finally:
        vs("stop", "sd", check=False)
    assert _leftovers(host, st, ns_ino) == []


def test_the_guests_root_made_by_build_is_a_barrier_a_namespaced_guest_still_starts_behind(
    vs, host
):
    """build makes the guests' root (when missing) mode 000, as util-vserver's barrier: no
    host user passes it, and neither could a namespaced guest's root, which never needs to
    (its tree is reopened through descriptors, never by the host's path)."""
    host.root.rmdir()
    _userns_guest(vs, host, "g1", start=R1)
    assert os.stat(host.root).st_mode & 0o7777 == 0
    vs("start", "g1")
    assert vs.exec("g1", "id", "-u").strip() == "0"
    vs("stop", "g1")
