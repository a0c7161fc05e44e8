"""Layer 10: hostile guests (issue 13): no escape from a guest, and no guest (nor a careless
command line) can change what another guest or the host sees.  Guests are busybox
skeletons started for real (t7's helpers); every test cleans up also when it fails."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from t7_lifecycle import IDLE, Vserver, _gone, _host_mounts, _pid_ns, _procs_in_ns
from vsstore import cgroups
from vsstore.errors import EXIT_CONFIG
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


# -- item 6: a guest's network is its own unless its configuration says otherwise ---------

PROBE_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
/* netprobe IFINDEX PORT ABSTRACT: what a guest's root can reach of the host's network */
int main(int argc, char **argv) {
    if (argc != 4) return 9;
    struct if_nameindex *ifs = if_nameindex(), *i;
    for (i = ifs; i && i->if_index; i++) printf("interface %s\n", i->if_name);
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) printf("packet socket: %s\n", strerror(errno));
    else {
        struct sockaddr_ll a = {0};
        a.sll_family = AF_PACKET; a.sll_protocol = htons(ETH_P_ALL);
        a.sll_ifindex = atoi(argv[1]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
            printf("packet bind: %s\n", strerror(errno));
        else printf("packet bind: bound\n");
    }
    int t = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in = {0};
    in.sin_family = AF_INET; in.sin_port = htons(atoi(argv[2]));
    in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(t, (struct sockaddr *)&in, sizeof in) < 0)
        printf("tcp 127.0.0.1: %s\n", strerror(errno));
    else { write(t, "probe\n", 6); printf("tcp 127.0.0.1: connected\n"); }
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un un = {0};
    un.sun_family = AF_UNIX;
    size_t n = strlen(argv[3]);
    memcpy(un.sun_path + 1, argv[3], n);  /* sun_path[0] = 0: the abstract namespace */
    if (connect(u, (struct sockaddr *)&un, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0)
        printf("abstract unix: %s\n", strerror(errno));
    else { write(u, "probe\n", 6); printf("abstract unix: connected\n"); }
    return 0;
}
"""


@pytest.fixture(scope="module")
def netprobe(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A static probe a guest runs: packet socket on a host interface, TCP to 127.0.0.1,
    an abstract unix socket (each only a connect; nothing is sent on the wire)."""
    cc = shutil.which("gcc")
    if cc is None:
        pytest.skip("no gcc to build the network probe (scripts/setup installs it)")
    d = tmp_path_factory.mktemp("netprobe")
    (d / "netprobe.c").write_text(PROBE_C)
    p = subprocess.run([cc, "-static", "-O1", "-o", str(d / "netprobe"), str(d / "netprobe.c")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return d / "netprobe"


class HostListeners:
    """Services only the host should reach: TCP on 127.0.0.1 and an abstract unix socket;
    every connection and what it sent is recorded."""

    def __init__(self) -> None:
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.abstract = f"vsstore-t10-{os.getpid()}-{self.port}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.abstract)
        self.got: list[tuple[str, bytes]] = []
        self.threads = []
        for kind, s in (("tcp", self.tcp), ("unix", self.unix)):
            s.listen(8)
            t = threading.Thread(target=self._serve, args=(kind, s), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, kind: str, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return  # closed
            with c:
                c.settimeout(5)
                try:
                    self.got.append((kind, c.recv(100)))
                except OSError:
                    self.got.append((kind, b""))

    def close(self) -> None:
        for s in (self.tcp, self.unix):
            s.close()


@pytest.fixture
def listeners():  # type: ignore[no-untyped-def]
    h = HostListeners()
    try:
        yield h
    finally:
        h.close()


def _host_interface() -> tuple[str, int]:
    for index, name in socket.if_nameindex():
        if name != "lo":
            return name, index
    pytest.skip("the host has no network interface but lo")


def _net_guest(vs, netprobe: Path, conf: dict[str, str] | None = None) -> Path:  # type: ignore[no-untyped-def]
    root = vs.guest("g1", conf=conf)
    shutil.copy(netprobe, root / "bin/netprobe")
    for applet in ("nc", "ping"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def _probe(vs, listeners, *, cow: bool = False) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run the probe in guest g1 (exec, or exec --cow); what it saw."""
    _name, index = _host_interface()
    args = ["--cow"] if cow else []
    out = vs("exec", "g1", *args, "/bin/netprobe", str(index), str(listeners.port),
             listeners.abstract).stdout
    seen: dict[str, object] = {"interfaces": set()}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key.startswith("interface "):
            seen["interfaces"].add(key.split()[1])  # type: ignore[union-attr]
        else:
            seen[key] = value
    seen["proc_net_dev"] = {ln.split(":")[0].strip() for ln in vs.exec(
        "g1", *args, "cat", "/proc/net/dev").splitlines()[2:]}
    return seen


def test_a_guest_without_interfaces_sees_loopback_only_and_reaches_nothing_of_the_host(
        vs, host, netprobe, listeners):
    _net_guest(vs, netprobe)
    p = vs("start", "g1")
    assert "hostnet" not in p.stderr
    seen = _probe(vs, listeners)
    assert seen["interfaces"] == {"lo"} and seen["proc_net_dev"] == {"lo"}
    # It keeps CAP_NET_RAW (ping), in its own namespace: a packet socket opens, but no
    # host interface exists there to bind it to.
    assert seen["packet bind"] == "No such device"
    assert seen["tcp 127.0.0.1"] == "Connection refused"
    assert seen["abstract unix"] == "Connection refused"
    p = vs("exec", "g1", "sh", "-c", f"echo hello | nc 127.0.0.1 {listeners.port}",
           check=False)
    assert p.returncode != 0
    assert vs("exec", "g1", "ping", "-c", "1", "-W", "5", "127.0.0.1").stdout  # its own lo is up
    assert listeners.got == []  # nothing of the guest's ever reached the host's services
    st = vs.state("g1")
    assert os.stat(f"/proc/{st['init_pid']}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


def test_spaces_hostnet_shares_the_host_network_without_raw_sockets_and_warns(
        vs, host, netprobe, listeners):
    _net_guest(vs, netprobe, conf={"spaces/hostnet": ""})
    p = vs("start", "g1")
    assert "warning" in p.stderr and "spaces/hostnet" in p.stderr
    assert "spaces/hostnet" in (host.base / "log/vserver-g1.log").read_text()
    seen = _probe(vs, listeners)
    host_if = {"lo", _host_interface()[0]}  # (other test runs add and remove veths)
    assert host_if <= seen["interfaces"] and host_if <= seen["proc_net_dev"]
    assert seen["packet socket"] == "Operation not permitted"  # CAP_NET_RAW is gone
    assert seen["tcp 127.0.0.1"] == "connected" and seen["abstract unix"] == "connected"
    vs("exec", "g1", "sh", "-c", f"echo hello | nc 127.0.0.1 {listeners.port}")
    assert _eventually_true(lambda: ("tcp", b"hello\n") in listeners.got)
    vs("stop", "g1")
    (host.conf / "g1/bcapabilities").write_text("CAP_NET_RAW\n")  # asked for by name
    vs("start", "g1")
    assert _probe(vs, listeners)["packet bind"] == "bound"


def test_exec_cow_on_a_stopped_guest_gets_a_network_of_its_own(vs, host, netprobe, listeners):
    _net_guest(vs, netprobe)
    seen = _probe(vs, listeners, cow=True)
    assert seen["interfaces"] == {"lo"} and seen["proc_net_dev"] == {"lo"}
    assert seen["tcp 127.0.0.1"] == "Connection refused"
    assert seen["abstract unix"] == "Connection refused"
    assert listeners.got == []
    (host.conf / "g1/spaces").mkdir()
    (host.conf / "g1/spaces/hostnet").touch()
    seen = _probe(vs, listeners, cow=True)
    assert _host_interface()[0] in seen["interfaces"]
    assert seen["tcp 127.0.0.1"] == "connected"


def test_hostnet_and_interfaces_exclude_each_other(vs, host):
    vs.guest("g1", conf={"spaces/hostnet": "", "interfaces/0/ip": "10.231.8.2\n"})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG and "Traceback" not in p.stderr
    assert "spaces/hostnet" in p.stderr and "interfaces" in p.stderr
    assert vs.state("g1") is None


def _eventually_true(check, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    import time
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True
