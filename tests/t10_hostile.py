"""Layer 10: hostile guests (issue 13): no escape from a guest, and no guest (nor a careless
command line) can change what another guest or the host sees.  Guests are busybox
skeletons started for real (t7's helpers); every test cleans up also when it fails."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import pytest

from t7_lifecycle import IDLE, Vserver, _gone, _host_mounts, _pid_ns, _procs_in_ns
from vsstore import cgroups
from vsstore.lifecycle import alive

LAYOUT = cgroups.detect()
needs_cgroups = pytest.mark.skipif(LAYOUT.version == 0, reason=f"no cgroups: {LAYOUT.why}")


@pytest.fixture
def vs(host):  # type: ignore[no-untyped-def]
    """t7's ``vserver`` runner; afterwards every guest with a run state is stopped (or
    killed), also when the test failed."""
    v = Vserver(host)
    try:
        yield v
    finally:
        for f in sorted((host.base / "run/guests").glob("*.json")):
            st = json.loads(f.read_text())
            v("stop", st["name"], check=False)
            for pid, started in ((st["init_pid"], st["init_start"]),
                                 (st["monitor_pid"], st["monitor_start"])):
                if alive(pid, started):  # stop failed: never a reused pid
                    os.kill(pid, signal.SIGKILL)


def _leftovers(host, st: dict, ns_ino: int) -> list[str]:  # type: ignore[no-untyped-def]
    """What a stopped guest left behind: processes, mounts, its cgroup, its run state."""
    out = [f"process {p}" for p in _procs_in_ns(ns_ino)]
    out += [f"mount {m}" for m in _host_mounts() if str(host.root) in m]
    out += [f"cgroup {d}" for d in st["cgroup"].values() if os.path.exists(d)]
    if not _gone(st["monitor_pid"]):
        out.append(f"monitor {st['monitor_pid']}")
    if (host.base / "run/guests" / f"{st['name']}.json").exists():
        out.append("run state")
    return out


# -- item 10: stop never fails on a cgroup that goes away, and needs only the run state ---

def test_stop_succeeds_in_every_one_of_many_start_stop_cycles(vs, host):
    """stop raced the monitor's clean-up (ENODEV from a freezer.state of a cgroup removed
    meanwhile), and a stop right after start hit an init that had no handler yet."""
    vs.guest("g1")
    for i in range(80):
        vs("start", "g1")
        st = vs.state("g1")
        ns_ino = _pid_ns(st["init_pid"])
        p = vs("stop", "g1", check=False)
        assert p.returncode == 0, f"cycle {i}: stop exited {p.returncode}: {p.stderr}"
        assert _leftovers(host, st, ns_ino) == [], f"cycle {i}"


@needs_cgroups
@pytest.mark.parametrize("when", ["removed before", "removed while writing"])
def test_killing_a_cgroup_that_vanishes_is_not_an_error(monkeypatch, when):
    cg = cgroups.create(LAYOUT, f"t10-gone-{os.getpid()}", None, cgroups.Limits())
    try:
        if when == "removed before":
            for d in cg.dirs.values():
                d.rmdir()
        else:  # the monitor removes it between kill's open and write of a control file
            real = cgroups._write_file
            seen: list[str] = []

            def write_then_vanish(p, value):  # type: ignore[no-untyped-def]
                with open(p, "w") as f:
                    for d in cg.dirs.values():
                        if d.exists():
                            d.rmdir()
                    try:
                        f.write(value + "\n")
                        f.flush()
                    except OSError as e:
                        seen.append(errno.errorcode[e.errno])
                        raise
                monkeypatch.setattr(cgroups, "_write_file", real)
            monkeypatch.setattr(cgroups, "_write_file", write_then_vanish)
        cg.kill()
        cg.remove()
        assert cg.pids() == []
        if when != "removed before":
            assert seen == ["ENODEV"]  # what the kernel says to a write into a removed one
    finally:
        for d in cg.dirs.values():
            if d.exists():
                d.rmdir()


@pytest.mark.parametrize("rel,text", [
    ("rlimits/nofile", "many\n"), ("cgroup/memory.max", "lots\n"),
    ("apps/init/style", "bogus\n"), ("bcapabilities", "CAP_BOGUS\n"),
    ("apps/init/stop-timeout", "soon\n")])
def test_stop_works_from_the_run_state_whatever_the_configuration_says_now(
        vs, host, rel, text):
    root = vs.guest("g1", conf={"apps/init/cmd.stop": "/bin/sh\n-c\necho stopped > "
                                                       "/var/log/stop-ran\n"})
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = _pid_ns(st["init_pid"])
    conf = host.conf / "g1"
    (conf / rel).parent.mkdir(parents=True, exist_ok=True)
    (conf / rel).write_text(text)
    (conf / "apps/init/cmd.stop").write_text("/bin/sh\n-c\necho changed > /var/log/stop-ran\n")
    assert vs("start", "g1", check=False).returncode != 0  # the configuration is broken
    p = vs("stop", "g1", check=False)
    assert p.returncode == 0, p.stderr
    assert _leftovers(host, st, ns_ino) == []
    assert (root / "var/log/stop-ran").read_text() == "stopped\n"  # the command it started with


def test_stop_works_with_the_configuration_gone_and_an_old_run_state(vs, host):
    vs.guest("g1", init=IDLE)
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = _pid_ns(st["init_pid"])
    f = host.base / "run/guests/g1.json"
    old = {k: v for k, v in st.items() if k not in (
        "stop", "stop_signal", "stop_timeout", "keep_caps", "rlimits", "nice")}
    f.write_text(json.dumps(old))  # written by a vsstore before these fields existed
    shutil.move(host.conf / "g1", host.base / "g1.conf")
    try:
        p = vs("stop", "g1", check=False)
        assert p.returncode == 0, p.stderr
        assert _leftovers(host, st, ns_ino) == []
    finally:
        shutil.move(host.base / "g1.conf", host.conf / "g1")
