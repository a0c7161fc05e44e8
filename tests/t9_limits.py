"""Layer 9: guests started under their limits for real: a cgroup per guest (the layout this
machine has: v1 controllers one per hierarchy, or v2), rlimits and nice; stop through the
cgroup; vserver-stat against an independent count from /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from guests import IDLE, eventually, gone, pid_ns, procs_in_ns

from conftest import REPO
from vsstore.errors import EXIT_CONFIG
from vsstore.lifecycle import cgroups, guest_cgroup

LAYOUT = cgroups.detect()
pytestmark = pytest.mark.skipif(LAYOUT.version == 0, reason=f"no cgroups here: {LAYOUT.why}")


def _cg(vs, name: str) -> cgroups.GuestCgroup:  # type: ignore[no-untyped-def]
    cg = guest_cgroup(vs.state(name)["cgroup"])
    assert cg is not None and all(d.is_dir() for d in cg.dirs.values())
    return cg


def test_a_guest_runs_in_its_own_cgroup_which_stop_removes(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    cg = _cg(vs, "g1")
    st = vs.state("g1")
    assert st["init_pid"] in cg.pids()
    own = open("/proc/self/cgroup").read()
    for d in cg.dirs.values():  # beneath the cgroup this command runs in
        assert d.name == "vserver-g1"
    assert str(os.getpid()) not in (next(iter(cg.dirs.values())) / "cgroup.procs").read_text()
    p = vs("exec", "g1", "cat", "/proc/self/cgroup")
    assert "vserver-g1" in p.stdout  # exec'd processes join it too
    vs("stop", "g1")
    assert not any(d.exists() for d in cg.dirs.values())
    assert open("/proc/self/cgroup").read() == own


def test_pids_max_bounds_a_fork_bomb_and_the_host_goes_on(vs, host):
    vs.guest("g1", conf={"cgroup/pids.max": "30\n"})
    vs("start", "g1")
    p = vs(
        "exec",
        "g1",
        "sh",
        "-c",
        "i=0; while [ $i -lt 100 ]; do sleep 100 </dev/null "
        ">/dev/null 2>&1 & i=$((i+1)); done 2>/dev/null; "
        "echo started",
        check=False,
    )
    procs = procs_in_ns(pid_ns(vs.state("g1")["init_pid"]))
    assert len(procs) <= 30
    assert len(_cg(vs, "g1").pids()) <= 30
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    assert "started" in p.stdout or p.returncode != 0
    vs("stop", "g1")
    assert procs_in_ns(pid_ns(os.getpid())) != []


def test_memory_max_stops_a_greedy_process_and_the_rest_go_on(vs, host):
    vs.guest("g1", conf={"cgroup/memory.max": "64M\n"})
    (host.root / "g1/bin/dd").symlink_to("busybox")
    vs("start", "g1")
    p = vs("exec", "g1", "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1", check=False)
    assert p.returncode != 0  # killed by the OOM killer (137) or its allocation failed
    assert vs("running", "g1").returncode == 0  # init goes on
    assert vs.exec("g1", "echo", "alive").strip() == "alive"
    limit = _cg(vs, "g1").usage()["memory_max"]
    assert limit == 64 << 20


def test_rlimits_and_nice_are_seen_inside(vs, host):
    vs.guest(
        "g1",
        conf={
            "rlimits/nofile": "321\n",
            "rlimits/nproc.soft": "500\n",
            "rlimits/nproc.hard": "600\n",
            "nice": "7\n",
        },
    )
    vs("start", "g1")
    assert vs.exec("g1", "sh", "-c", "ulimit -n").strip() == "321"
    limits = vs.exec("g1", "cat", "/proc/1/limits")
    line = next(ln for ln in limits.splitlines() if ln.startswith("Max processes"))
    assert line.split()[2:4] == ["500", "600"]
    stat = vs.exec("g1", "cat", "/proc/1/stat")
    assert stat.rpartition(")")[2].split()[16] == "7"  # field 19: nice


def test_stop_ends_a_process_that_escaped_with_setsid_and_a_double_fork(vs, host):
    vs.guest("g1")
    (host.root / "g1/bin/setsid").symlink_to("busybox")
    vs("start", "g1")
    vs.exec(
        "g1",
        "setsid",
        "sh",
        "-c",
        "sh -c 'sleep 1000 </dev/null >/dev/null 2>&1 &' </dev/null >/dev/null 2>&1 &",
    )
    cg = _cg(vs, "g1")
    st = vs.state("g1")
    assert eventually(lambda: len(cg.pids()) >= 3)
    escaped = [p for p in cg.pids() if p != st["init_pid"]]
    vs("stop", "g1")
    assert all(gone(p) for p in escaped)
    assert not any(d.exists() for d in cg.dirs.values())


def test_vserver_stat_agrees_with_proc(vs, host):
    vs.guest("g1", init='x=$(head -c 30000000 /dev/zero | tr "\\0" a); sleep 1000 & ' + IDLE)
    (host.root / "g1/bin/tr").symlink_to("busybox")
    vs("start", "g1")
    st = vs.state("g1")
    procs = procs_in_ns(pid_ns(st["init_pid"]))
    assert eventually(lambda: _anon(procs) > 25_000_000)
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vsstore.lifecycle.cli import "
            "stat_main; sys.exit(stat_main(['--json']))",
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        check=True,
    )
    row = next(r for r in json.loads(p.stdout) if r["name"] == "g1")
    procs = procs_in_ns(pid_ns(st["init_pid"]))
    assert row["processes"] == len(procs) == row["cgroup"]["processes"]
    anon = _anon(procs)
    assert abs(row["cgroup"]["memory_anon"] - anon) <= 0.1 * anon
    assert row["cgroup"]["memory"] >= row["cgroup"]["memory_anon"]
    table = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from vsstore.lifecycle.cli import stat_main; sys.exit(stat_main([]))",
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CHARGED" in table and "g1" in table


def _anon(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += (
                    next((int(ln.split()[1]) for ln in f if ln.startswith("RssAnon")), 0) * 1024
                )
        except FileNotFoundError:
            pass
    return total


@pytest.mark.parametrize(
    "rel,text,words",
    [
        ("rlimits/nofile", "many\n", "not a limit"),
        ("rlimits/bogus", "5\n", "unknown resource limit"),
        ("cgroup/memory.max", "lots\n", "not a size"),
        ("cgroup/io.max", "5\n", "unknown cgroup setting"),
        ("nice", "40\n", "not a nice level"),
    ],
)
def test_a_bad_limit_is_a_clear_error_and_nothing_starts(vs, host, rel, text, words):
    vs.guest("g1", conf={rel: text})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG and rel.split("/")[-1] in p.stderr and words in p.stderr
    assert "Traceback" not in p.stderr
    assert vs.state("g1") is None
    assert cgroups.existing(LAYOUT, "g1", None) is None


def test_without_cgroups_start_warns_and_applies_rlimits_alone(vs, host):
    vs.guest("g1", conf={"rlimits/nofile": "222\n", "cgroup/pids.max": "30\n"})
    vs.env["VSSTORE_CGROUPS"] = "none"
    p = vs("start", "g1")
    assert "warning" in p.stderr and "VSSTORE_CGROUPS=none" in p.stderr
    assert "cgroup/ settings ignored" in p.stderr
    assert vs.state("g1")["cgroup"] == {}
    assert cgroups.existing(LAYOUT, "g1", None) is None
    assert vs.exec("g1", "sh", "-c", "ulimit -n").strip() == "222"
    vs("stop", "g1")
