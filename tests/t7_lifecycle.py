"""Layer 7: guests started for real (namespaces, mounts, pivot_root, capabilities), small
skeleton guests running Debian's busybox-static; stopped and checked for leftovers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from guests import (
    BUSYBOX,
    IDLE,
    STEADY,
    debian_guest,
    eventually,
    gone,
    host_mounts,
    pid_ns,
    procs_in_ns,
)

from conftest import REPO, flags, inode
from unify.progress import human
from vsstore import attrs
from vsstore.config import Paths
from vsstore.errors import EXIT_CONFIG, EXIT_STATE
from vsstore.lifecycle import cgroups
from vsstore.lifecycle.cli import _unify_after

# -- build ------------------------------------------------------------------------------


def test_build_skeleton_makes_tree_and_configuration(vs, host):
    vs("build", "web", "-m", "skeleton", "--hostname", "web.example", "--context", "42")
    root, conf = host.root / "web", host.conf / "web"
    assert {"bin", "dev", "etc", "proc", "tmp", "usr", "var"} <= set(os.listdir(root))
    assert os.stat(root / "tmp").st_mode & 0o7777 == 0o1777
    assert (conf / "context").read_text() == "42\n"
    assert (conf / "uts/nodename").read_text() == "web.example\n"
    assert os.readlink(conf / "vdir") == str(root)
    p = vs("build", "web", "-m", "skeleton", check=False)
    assert p.returncode == EXIT_STATE and "exists already" in p.stderr
    vs("build", "second", "-m", "skeleton")
    assert (host.conf / "second/context").read_text() == "43\n"  # the next free one
    p = vs("build", "third", "-m", "nosuch", check=False)
    assert p.returncode == EXIT_CONFIG and "unknown" in p.stderr
    assert not (host.conf / "third").exists() and not (host.root / "third").exists()


def test_a_failed_build_leaves_nothing_behind(vs, host):
    p = vs("build", "deb", "-m", "debootstrap", "--", "--variant=minbase", check=False)
    assert p.returncode == EXIT_CONFIG and "-d bookworm" in p.stderr  # names the fix
    p = vs(
        "build",
        "deb",
        "-m",
        "debootstrap",
        "--",
        "-d",
        "nosuchsuite",
        "-m",
        "file:///nonexistent",
        check=False,
    )
    assert p.returncode == EXIT_CONFIG and "debootstrap" in p.stderr
    p = vs("build", "c", "-m", "clone", "--", "--source", "nosuch", check=False)
    assert p.returncode == EXIT_CONFIG and "nosuch" in p.stderr
    for name in ("deb", "c"):
        assert not (host.conf / name).exists() and not (host.root / name).exists()


def test_clone_links_what_the_source_shares_and_copies_the_rest(vs, host):
    lib = b"a shared library " * 500
    for g in ("g0", "g1"):
        vs.guest(g, files={"usr/lib/libx.so": lib, f"etc/own-{g}": g.encode()})
    host.vsunify("run", "g0", "g1")
    vs("build", "g2", "-m", "clone", "--", "--source", "g1")
    new = host.root / "g2"
    assert inode(new / "usr/lib/libx.so") == inode(host.root / "g1/usr/lib/libx.so")
    assert flags(new / "usr/lib/libx.so") == "UIa"
    assert (new / "etc/own-g1").read_bytes() == b"g1"
    assert inode(new / "etc/own-g1") != inode(host.root / "g1/etc/own-g1")
    assert (host.conf / "g2/apps/init/cmd.start").read_text().startswith("/bin/sh")
    assert os.readlink(new / "bin/sh") == "busybox"
    assert inode(new / "bin/busybox") == inode(host.root / "g1/bin/busybox")
    private = new / "etc/own-g1"
    fd = os.open(private, os.O_RDONLY)
    attrs.set_immutable(fd, True)  # a guest's own immutable file goes too
    os.close(fd)
    vs("delete", "g2", "--force")
    assert not new.exists() and not (host.conf / "g2").exists()
    assert (host.root / "g1/usr/lib/libx.so").read_bytes() == lib
    assert flags(host.root / "g1/usr/lib/libx.so") == "UIa"


# -- start, exec, stop ------------------------------------------------------------------


def test_a_started_guest_sees_its_own_processes_hostname_and_mounts(vs, host):
    vs.guest("g1", conf={"uts/nodename": "g1.inside\n"})
    vs("start", "g1")
    ps = vs.exec("g1", "ps", "-o", "pid,args")
    lines = [ln.split(None, 1) for ln in ps.strip().splitlines()[1:]]
    assert lines[0] == ["1", f"/bin/sh -c {IDLE}"]
    assert all(int(pid) < 50 for pid, _ in lines)  # no host process in sight
    assert vs.exec("g1", "hostname").strip() == "g1.inside"
    mounts = [ln.split()[1] for ln in vs.exec("g1", "cat", "/proc/mounts").splitlines()]
    assert mounts[0] == "/" and "/proc" in mounts and "/dev/pts" in mounts
    assert not any(str(host.base) in m for m in mounts)
    assert sorted(vs.exec("g1", "ls", "/dev").split()) == sorted(
        [
            "console",
            "full",
            "null",
            "ptmx",
            "pts",
            "random",
            "shm",
            "tty",
            "urandom",
            "zero",
            "fd",
            "stdin",
            "stdout",
            "stderr",
        ]
    )
    st = vs.state("g1")
    assert procs_in_ns(pid_ns(st["init_pid"]))  # the guest's processes, seen from the host
    assert "is running" in vs("status", "g1").stdout
    assert vs("running", "g1").returncode == 0


def test_the_host_filesystem_is_out_of_reach(vs, host):
    secret = host.base / "secret"
    secret.write_text("host only")
    vs.guest("g1")
    vs("start", "g1")
    for path in (str(secret), f"/proc/1/root{secret}", f"/proc/1/cwd{secret}"):
        p = vs("exec", "g1", "cat", path, check=False)
        assert p.returncode != 0 and "host only" not in p.stdout
    assert sorted(vs.exec("g1", "ls", "/").split()) == sorted(os.listdir(host.root / "g1"))
    p = vs("exec", "g1", "cat", "/proc/sys/kernel/hostname")
    assert p.stdout.strip() == "g1"
    p = vs("exec", "g1", "sh", "-c", "echo x > /proc/sys/kernel/hostname", check=False)
    assert p.returncode != 0  # /proc/sys is read-only


def test_an_fstab_target_behind_a_symlink_is_mounted_inside_the_guest(vs, host):
    outside = host.base / "outside"
    outside.mkdir()
    root = vs.guest("g1", conf={"fstab": "none /mnt/escape tmpfs size=1m 0 0\n"})
    (root / "mnt").mkdir()
    os.symlink(str(outside), root / "mnt/escape")  # absolute: leads out, if followed naively
    (root / str(outside).lstrip("/")).mkdir(parents=True)  # where it leads inside the guest
    vs("start", "g1")
    assert str(outside) not in host_mounts()
    inside = [ln.split()[1] for ln in vs.exec("g1", "cat", "/proc/mounts").splitlines()]
    assert str(outside) in inside  # resolved as the guest sees it: in its own tree
    vs.exec("g1", "sh", "-c", "echo in-tmpfs > /mnt/escape/f")
    assert not (outside / "f").exists() and not (root / str(outside).lstrip("/") / "f").exists()


def test_a_missing_fstab_target_fails_clearly_and_starts_nothing(vs, host):
    vs.guest("g1", conf={"fstab": "none /nosuch tmpfs size=1m 0 0\n"})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG
    assert "fstab:1" in p.stderr and "/nosuch" in p.stderr and "Traceback" not in p.stderr
    assert vs.state("g1") is None and vs("running", "g1", check=False).returncode == 1


def test_dropped_capabilities_are_really_gone(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    status = vs.exec("g1", "cat", "/proc/self/status")
    bnd = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapBnd")), 16)
    eff = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff")), 16)
    for cap in (21, 27, 16, 9, 2):  # SYS_ADMIN, MKNOD, SYS_MODULE, LINUX_IMMUTABLE, DAC_READ_SEARCH
        assert not bnd & (1 << cap) and not eff & (1 << cap)
    assert eff & 1 and eff & (1 << 1)  # CHOWN, DAC_OVERRIDE kept: root in its own tree
    p = vs("exec", "g1", "mknod", "/tmp/null", "c", "1", "3", check=False)
    assert p.returncode != 0 and "not permitted" in p.stderr
    p = vs("exec", "g1", "mount", "-t", "tmpfs", "none", "/tmp", check=False)
    assert p.returncode != 0
    init_status = vs.exec("g1", "cat", "/proc/1/status")
    assert "CapBnd:\t" + f"{bnd:016x}" in init_status


def test_bcapabilities_give_a_guest_one_more(vs, host):
    vs.guest("g1", conf={"bcapabilities": "CAP_MKNOD\n!CAP_CHOWN\n"})
    vs("start", "g1")
    vs.exec("g1", "mknod", "/tmp/null", "c", "1", "3")
    eff = vs.exec("g1", "grep", "CapEff", "/proc/self/status").split()[1]
    assert not int(eff, 16) & 1


def test_a_bad_capability_name_is_a_clear_error_before_anything_starts(vs, host):
    vs.guest("g1", conf={"bcapabilities": "CAP_BOGUS\n"})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG
    assert "bcapabilities" in p.stderr and "CAP_BOGUS" in p.stderr
    assert vs.state("g1") is None


def test_exec_and_enter_pass_the_exit_code_through(vs, host):
    vs.guest("g1", files={"etc/motd": b"not a program\n"})
    vs("start", "g1")
    assert vs("exec", "g1", "sh", "-c", "exit 7", check=False).returncode == 7
    assert vs("exec", "g1", "sh", "-c", "kill -9 $$", check=False).returncode == 137
    p = vs("exec", "g1", "/nosuch", check=False)  # as a shell says it: 127 not found
    assert p.returncode == 127 and "cannot run /nosuch" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert vs("exec", "g1", "nosuch-in-path", check=False).returncode == 127
    assert vs("exec", "g1", "/etc/motd", check=False).returncode == 126  # not executable
    assert vs("exec", "g1", "/etc", check=False).returncode == 126
    p = vs("enter", "g1", input="echo inside $(hostname)\nexit 3\n", check=False)
    assert p.returncode == 3 and "inside g1" in p.stdout


def test_start_twice_and_stop_twice_give_clear_messages(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_STATE and "already running" in p.stderr
    vs("stop", "g1")
    p = vs("stop", "g1", check=False)
    assert p.returncode == EXIT_STATE and "not running" in p.stderr
    p = vs("exec", "g1", "true", check=False)
    assert p.returncode == EXIT_STATE and "not running" in p.stderr
    assert vs("status", "g1", check=False).returncode == 3


def test_stop_leaves_no_process_and_no_mount_even_if_init_ignores_sigterm(vs, host):
    vs.guest(
        "g1",
        init='trap "" TERM; sleep 1000 & sh -c "trap \\"\\" TERM; sleep 1000" & '
        "while :; do sleep 1; done",
        conf={"apps/init/stop-timeout": "1\n"},
    )
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = pid_ns(st["init_pid"])
    assert len(procs_in_ns(ns_ino)) >= 4
    vs("stop", "g1")
    assert procs_in_ns(ns_ino) == []
    assert gone(st["monitor_pid"])
    assert not any(str(host.root) in m for m in host_mounts())
    assert vs.state("g1") is None
    vs("start", "g1")  # and it starts again
    assert vs("running", "g1").returncode == 0


def test_a_guest_whose_init_exits_is_cleaned_up(vs, host):
    vs.guest("g1", init="sleep 1")
    vs("start", "g1")
    st = vs.state("g1")
    assert eventually(lambda: vs.state("g1") is None)
    # The monitor removes the state, then says "stopped" and exits: not at once.
    assert eventually(lambda: gone(st["monitor_pid"]))
    assert "init ended (exit 0)" in (host.base / "log/vserver-g1.log").read_text()


def test_sysv_style_keeps_the_guest_up_after_rc_returns(vs, host):
    root = vs.guest("g1", conf={"apps/init/style": "sysv\n"})
    os.unlink(host.conf / "g1/apps/init/cmd.start")
    (root / "etc/init.d").mkdir(parents=True)
    (root / "etc/init.d/rc").write_text("#!/bin/sh\necho rc $1 >> /var/log/rc.log\n")
    os.chmod(root / "etc/init.d/rc", 0o755)
    vs("start", "g1")
    assert eventually(lambda: (root / "var/log/rc.log").exists())
    assert vs("running", "g1").returncode == 0  # rc 3 returned; the guest stays
    init = vs.state("g1")["init_pid"]
    assert os.readlink(f"/proc/{init}/exe") == "/memfd:vsguest (deleted)"  # our helper
    with open(f"/proc/{init}/status") as f:  # a few pages, not a forked Python's 11 MiB
        anon = next(int(ln.split()[1]) for ln in f if ln.startswith("RssAnon"))
    assert anon < 512
    vs("stop", "g1")
    assert (root / "var/log/rc.log").read_text() == "rc 3\nrc 0\n"


def test_vserver_stat_agrees_with_an_independent_count(vs, host):
    vs.guest("g1", init="sleep 1000 & sleep 1000 & " + STEADY)
    vs.guest("g2", init=STEADY)
    vs("start", "g1")
    vs("start", "g2")
    rows = {r["name"]: r for r in vs.stat()}
    assert set(rows) == {"g1", "g2"}
    for name, row in rows.items():
        procs = procs_in_ns(pid_ns(vs.state(name)["init_pid"]))
        assert row["processes"] == len(procs)
        rss = 0
        for pid in procs:
            with open(f"/proc/{pid}/status") as f:
                rss += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")) * 1024
        assert abs(row["rss"] - rss) <= 0.1 * rss
    assert rows["g1"]["processes"] >= 3


def test_a_dangling_vdir_breaks_neither_build_nor_stat_nor_unify_of_other_guests(vs, host, capsys):
    gone = host.conf / "gone"
    gone.mkdir(parents=True)
    (gone / "context").write_text("77\n")
    os.symlink(host.base / "nowhere", gone / "vdir")
    vs.guest("g1")
    assert (host.conf / "g1/context").read_text() == "78\n"  # its context stays taken
    vs.guest("g2")
    assert _unify_after(Paths.from_env(host.env), "g1") == 0  # what vapt-get runs afterwards
    assert "left out of vsunify: guest 'gone'" in capsys.readouterr().err
    assert inode(host.root / "g1/bin/busybox") == inode(host.root / "g2/bin/busybox")
    vs("start", "g1")
    assert [r["name"] for r in vs.stat()] == ["g1"]
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vsstore.lifecycle.cli import stat_main; sys.exit(stat_main([]))",
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and p.stdout.rstrip().endswith(" g1"), p
    p = vs("status", "gone", check=False)  # that guest alone gets the error
    assert p.returncode == EXIT_CONFIG and str(gone / "vdir") in p.stderr
    vs("stop", "g1")


# -- through the overlay -----------------------------------------------------------------


def test_a_cow_guest_changes_a_shared_file_while_another_still_sees_the_original(vs, host):
    shared = b"the same data in every guest\n" * 50
    for g in ("g1", "g2"):
        vs.guest(g, files={"usr/share/data": shared})
    host.vsunify("run", "g1", "g2")
    obj = host.root / "g2/usr/share/data"
    assert os.stat(obj).st_nlink == 3
    (host.conf / "g1/cow").touch()
    vs("start", "g1")
    vs("start", "g2")
    assert vs.state("g1")["cow"] == str(host.base / "run/cow")
    vs.exec("g1", "sh", "-c", "echo changed-in-g1 >> /usr/share/data")
    assert vs.exec("g1", "cat", "/usr/share/data").endswith("changed-in-g1\n")
    assert vs.exec("g2", "cat", "/usr/share/data").encode() == shared
    assert obj.read_bytes() == shared and flags(obj) == "UIa"
    assert (host.root / "g1/usr/share/data").read_bytes() == shared + b"changed-in-g1\n"
    assert "copy-up g1:/usr/share/data" in (host.base / "log/vscow.log").read_text()
    p = host.vsunify("run", "g1", check=False)
    assert p.returncode != 0 and "cow overlay" in p.stderr
    vs("stop", "g1")
    assert str(host.base / "run/cow") not in host_mounts()  # nobody else used it
    assert vs.exec("g2", "cat", "/usr/share/data").encode() == shared


def test_a_configured_interface_is_a_veth_pair_reaching_the_guest(vs, host):
    vs.guest(
        "g1",
        conf={
            "interfaces/0/ip": "10.231.7.2\n",
            "interfaces/0/prefix": "24\n",
            "interfaces/0/hostip": "10.231.7.1\n",
            "context": "77\n",
        },
    )
    (host.root / "g1/bin/ip").symlink_to("busybox")
    vs("start", "g1")
    links = vs.exec("g1", "ip", "-o", "link")
    assert {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines()} == {
        "lo",
        "eth0",
    }  # the host's interfaces are not there
    assert "10.231.7.2/24" in vs.exec("g1", "ip", "addr", "show", "eth0")
    hostside = subprocess.run(
        ["ip", "-o", "addr", "show", "vs77g1.0"], capture_output=True, text=True, check=True
    ).stdout
    assert "10.231.7.1/24" in hostside
    p = subprocess.run(
        [BUSYBOX, "ping", "-c", "1", "-W", "5", "10.231.7.2"], capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    vs("stop", "g1")
    assert subprocess.run(["ip", "link", "show", "vs77g1.0"], capture_output=True).returncode != 0


def test_unified_debian_guests_run_one_through_cow_one_directly(vs, host):
    for g in ("deb1", "deb2"):
        debian_guest(host, g)
    (host.conf / "deb1/cow").touch()
    host.vsunify("run", "deb1", "deb2")
    doc = "usr/share/doc/base-files/README"
    original = (host.root / "deb2" / doc).read_bytes()
    assert flags(host.root / "deb2" / doc) == "UIa"
    vs("start", "deb1")
    vs("start", "deb2")
    for g in ("deb1", "deb2"):
        assert "VERSION_CODENAME=bookworm" in vs.exec(g, "cat", "/etc/os-release")
        assert (
            vs.exec(g, "dpkg-query", "-W", "-f", "${Status}", "base-files")
            == "install ok installed"
        )
        vs.exec(g, "dpkg", "--verify", "base-files")  # every shared file reads right
    vs.exec("deb1", "sed", "-i", "s/Debian/Changed/", "/" + doc)  # new file, rename over
    assert "Changed" in vs.exec("deb1", "cat", "/" + doc)
    assert vs.exec("deb2", "cat", "/" + doc).encode() == original
    assert (host.root / "deb2" / doc).read_bytes() == original
    assert flags(host.root / "deb2" / doc) == "UIa"
    st1, st2 = vs.state("deb1"), vs.state("deb2")
    vs("stop", "deb1")
    vs("stop", "deb2")
    for st in (st1, st2):
        assert gone(st["init_pid"]) and gone(st["monitor_pid"])
    assert not any(str(host.base) in m for m in host_mounts())


def _mapped_inodes(pid: int) -> set[tuple[str, int]]:
    with open(f"/proc/{pid}/maps") as f:
        return {(ln.split()[3], int(ln.split()[4])) for ln in f if int(ln.split()[4])}


def test_memory_of_two_running_guests_sharing_a_binary_is_shared(vs, host):
    for g in ("g1", "g2"):
        vs.guest(g)
    host.vsunify("run", "g1", "g2", "--no-default-excludes")  # busybox becomes one inode
    vs("start", "g1")
    vs("start", "g2")
    inits = [vs.state(g)["init_pid"] for g in ("g1", "g2")]
    common = _mapped_inodes(inits[0]) & _mapped_inodes(inits[1])
    assert common  # independently: both inits map the same inode
    html, prom = host.base / "report.html", host.base / "report.prom"
    rep = json.loads(
        host.vsunify(
            "report",
            "--json",
            "--memory",
            "--no-record",
            "g1",
            "g2",
            "--html",
            str(html),
            "--prom",
            str(prom),
        ).stdout
    )
    mem = rep["memory"]
    t = mem["total"]  # the same measurement in the page and the Prometheus file
    assert (
        f"<p>{human(t['with_unification'])} in page cache for the guests' mapped files; "
        f"{human(t['without_unification'])} without unification "
    ) in html.read_text()
    samples = dict(
        ln.rsplit(" ", 1) for ln in prom.read_text().splitlines() if not ln.startswith("#")
    )
    assert int(samples["vsstore_host_file_memory_bytes"]) == t["with_unification"]
    for g in ("g1", "g2"):
        assert (
            int(samples[f'vsstore_guest_shared_file_memory_bytes{{guest="{g}"}}'])
            == mem["guests"][g]["shared_rss"]
        )
    table = host.vsunify("report", "--memory", "--no-record", "g1", "g2").stdout
    assert "file-backed memory of running guests:" in table
    assert re.search(
        r"\n  g1 +\d+ +\S+ \S+ +\S+ \S+\n  g2 +\d+ +\S+ \S+ +\S+ \S+\n  host: "
        r".+ with unification, .+ without \(.+ saved\)$",
        table.rstrip("\n"),
    ), table
    for g in ("g1", "g2"):
        assert mem["guests"][g]["shared_rss"] > 0
        assert mem["guests"][g]["shared_rss"] <= mem["guests"][g]["file_rss"]
    t = mem["total"]
    assert t["without_unification"] > t["with_unification"] > 0
    assert t["saved"] == t["without_unification"] - t["with_unification"]
    assert mem["top_shared"][0]["path"].endswith("/bin/busybox")
    assert mem["top_shared"][0]["guests"] == 2
    if cgroups.detect().version:  # the cgroup's charge, as vserver-stat shows it
        for g in ("g1", "g2"):
            assert mem["guests"][g]["cgroup"]["memory"] > 0
    st = vs.stat_memory()
    assert {r["name"] for r in st["guests"]} == {"g1", "g2"}
    assert all(r["shared_file_rss"] > 0 for r in st["guests"])
    text = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vsstore.lifecycle.cli import "
            "stat_main; sys.exit(stat_main(['--memory']))",
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(
        r"\nfile-backed memory: \S+ with unification, \S+ without; per guest "
        r"\(mapped/shared\): g1 \S+/\S+, g2 \S+/\S+\n$",
        text,
    ), text
