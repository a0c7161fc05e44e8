"""Runtime state shared between commands: which guests run (their run state, processes and
cgroup usage) and which guest trees the cow overlay serves now.

The lifecycle writes ``$VSSTORE_RUNDIR/guests/NAME.json`` (init's and the monitor's pid with
their start times, so a reused pid is never taken for the guest, and what stop needs);
``vscow mount`` writes ``$VSSTORE_RUNDIR/vscow/<mountpoint>.json`` (pid, mount point, guest
roots).  ``vsunify`` and ``vserver-stat`` read them: relinking files under a running overlay
would leave the daemon's view and the kernel's caches stale."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

from .config import Paths
from .errors import ConfigError


def cow_state_file(paths: Paths, mountpoint: str) -> Path:
    return paths.rundir / "vscow" / (mountpoint.strip("/").replace("/", "_") + ".json")


def write_cow_state(state_file: Path, st: dict[str, object]) -> None:
    """Replace an overlay's state file whole (temporary name, then rename over): a reader,
    or a command killed while writing, never leaves it half written."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_name(f".{state_file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(st))
    os.replace(tmp, state_file)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path and " - fuse.vscow " in line for line in f)


def cow_served(paths: Paths) -> dict[str, str]:
    """Real path of every guest root a live overlay serves -> its mount point."""
    out: dict[str, str] = {}
    d = paths.rundir / "vscow"
    if not d.is_dir():
        return out
    for f in d.glob("*.json"):
        try:
            state = json.loads(f.read_text())
            pid, at, guests = int(state["pid"]), str(state["mountpoint"]), state["guests"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not os.path.exists(f"/proc/{pid}") or not _mounted(at):
            continue  # a stale record: the overlay is gone
        for root in guests.values():
            out[os.path.realpath(root)] = at
    return out


# -- guests that run ----------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None  # ended; only its parent has not collected it yet
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    """Is ``pid`` still the process that started at ``started`` (and not a zombie)?"""
    t = start_time(pid)
    return t is not None and t == started


@dataclass
class RunState:
    name: str
    init_pid: int
    init_start: int
    monitor_pid: int
    monitor_start: int
    root: str
    cow: str | None
    started: float
    context: int | None
    reaper: bool = False  # pid 1 is our reaping process (style sysv/none), not the guest's
    style: str = ""  # apps/init/style at start ("": a run state from before it was kept)
    cgroup: dict[str, str] = dataclasses.field(default_factory=dict)  # its directories
    # What stop needs, as the guest was started: stop works from the run state alone,
    # whatever the configuration says now (run states written before these fields
    # existed get the defaults).
    stop: list[str] | None = None  # the stop command, run inside; else stop_signal to init
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 10.0
    keep_caps: list[int] | None = None  # capabilities the stop command keeps (None: default)
    rlimits: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # res: soft, hard
    nice: int | None = None
    seccomp: list[str] | None = None  # +NAME/-NAME against the default filter (seccomp.Policy)
    userns: list[int] | None = None  # uid start, count, gid start, count (lifecycle.userns)

    @property
    def running(self) -> bool:
        return alive(self.init_pid, self.init_start)

    @property
    def monitoring(self) -> bool:
        return alive(self.monitor_pid, self.monitor_start)


def state_file(paths: Paths, name: str) -> Path:
    return paths.rundir / "guests" / f"{name}.json"


def read_state(paths: Paths, name: str) -> RunState | None:
    try:
        return RunState(**json.loads(state_file(paths, name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(
            f"{state_file(paths, name)}: unreadable run state ({e}); remove "
            f"it if guest {name} is not running"
        ) from None


def write_state(paths: Paths, st: RunState) -> None:
    f = state_file(paths, st.name)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(st.__dict__))
    os.replace(tmp, f)


def running(paths: Paths, name: str) -> RunState | None:
    st = read_state(paths, name)
    return st if st is not None and st.running else None


def guest_pids(st: RunState, own: bool = True) -> list[int]:
    """Every process in the guest's pid namespace (host pids); ``own=False`` leaves out a
    pid 1 of ours (the reaper of sysv/none guests: our code, not the guest's)."""
    want = ns_id(st.init_pid, "pid")
    if want is None or not st.running:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and ns_id(d, "pid") == want:
            out.append(int(d))
    if not own and st.reaper:
        out = [p for p in out if p != st.init_pid]
    return out


def ns_id(pid: int | str, kind: str) -> tuple[int, int] | None:
    """(dev, inode) of a process's namespace of ``kind`` ("pid", "mnt", ...), None if gone."""
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def cgroup_usage(dirs: dict[str, str]) -> dict[str, int | None]:
    """What a guest's cgroup (its directories per hierarchy, from its run state) is charged:
    memory (and its file-backed vs anonymous part), CPU time, and its limits."""
    d = {k: Path(v) for k, v in dirs.items()}
    out: dict[str, int | None] = {}
    d2 = d.get("unified")
    if d2 is not None:
        out["memory"] = _read_int(d2 / "memory.current")
        st = _stat_file(d2 / "memory.stat")
        out["memory_file"], out["memory_anon"] = st.get("file"), st.get("anon")
        out["cpu_usec"] = _stat_file(d2 / "cpu.stat").get("usage_usec")
        out["memory_max"] = _read_int(d2 / "memory.max")
        out["pids_max"] = _read_int(d2 / "pids.max")
        return out
    m = d.get("memory")
    if m is not None:
        out["memory"] = _read_int(m / "memory.usage_in_bytes")
        st = _stat_file(m / "memory.stat")
        out["memory_file"], out["memory_anon"] = st.get("total_cache"), st.get("total_rss")
        lim = _read_int(m / "memory.limit_in_bytes")
        out["memory_max"] = None if lim is None or lim >= 2**62 else lim
    ca = d.get("cpuacct")
    if ca is not None:
        ns_ = _read_int(ca / "cpuacct.usage")
        out["cpu_usec"] = None if ns_ is None else ns_ // 1000
    p = d.get("pids")
    if p is not None:
        out["pids_max"] = _read_int(p / "pids.max")
    return out


def _read_int(p: Path) -> int | None:
    try:
        t = p.read_text().strip()
    except OSError:
        return None
    return int(t) if t.lstrip("-").isdigit() else None


def _stat_file(p: Path) -> dict[str, int]:
    try:
        return {
            k: int(v)
            for k, v in (ln.split() for ln in p.read_text().splitlines() if len(ln.split()) == 2)
        }
    except (OSError, ValueError):
        return {}
