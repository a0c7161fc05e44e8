"""One cgroup per guest, on cgroup v2 or on v1 controllers mounted one per hierarchy.

The layout is detected at run time from /proc/self/mountinfo and /proc/self/cgroup.  A
guest's cgroup is created beneath the cgroup the ``vserver`` command runs in (each v1
hierarchy has its own), or beneath ``/etc/vservers/.defaults/cgroup/parent`` (a path from
the hierarchy's root, e.g. a delegated ``vsstore.slice``); the host's own layout is never
disturbed.  Settings come from ``/etc/vservers/NAME/cgroup/``, one file per interface file
(v2 names ``memory.max``, ``memory.high``, ``pids.max``, ``cpu.max``, ``cpu.weight``, or
util-vserver's v1 names ``memory.limit_in_bytes``, ``memory.soft_limit_in_bytes``,
``cpu.shares``, ``cpu.cfs_quota_us``, ``cpu.cfs_period_us``), translated to what the host has.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from vsstore import runtime
from vsstore.errors import ConfigError, VsError

V2_SETTINGS = ("memory.max", "memory.high", "pids.max", "cpu.max", "cpu.weight")
V1_NAMES = {
    "memory.limit_in_bytes": "memory.max",
    "memory.soft_limit_in_bytes": "memory.high",
    "cpu.shares": "cpu.weight",
    "cpu.cfs_quota_us": "cpu.max",
    "cpu.cfs_period_us": "cpu.max",
}
CONTROLLERS = ("memory", "pids", "cpu")
_SIZE = re.compile(r"^(\d+)([KMGT]?)$", re.I)
# A cgroup removed while we use it: its files are gone (ENOENT) or, opened before the
# removal, answer ENODEV.
GONE = (errno.ENOENT, errno.ENODEV)


# -- settings: read, check, translate -------------------------------------------------------


def _bytes(text: str, where: str) -> int | None:
    """'64M', '1048576', 'max' or -1 -> bytes (None: no limit)."""
    t = text.strip()
    if t in ("max", "-1", "inf"):
        return None
    m = _SIZE.match(t)
    if not m:
        raise ConfigError(f"{where}: {t!r} is not a size; write bytes, with K, M, G or T, or max")
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


def _int(text: str, where: str, lo: int, hi: int, what: str) -> int:
    try:
        v = int(text.strip())
    except ValueError:
        raise ConfigError(f"{where}: {text.strip()!r} is not a number; write {what}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"{where}: {v} is out of range {lo}..{hi}; write {what}")
    return v


@dataclass
class Limits:
    """A guest's cgroup settings, in v2 terms (None: not set)."""

    memory_max: int | None = None  # bytes; -1 none
    memory_high: int | None = None
    pids_max: int | None = None  # -1 none
    cpu_quota: int | None = None  # microseconds per period; -1 none
    cpu_period: int = 100_000
    cpu_weight: int | None = None  # 1..10000 (v1 shares: weight * 1024 / 100)
    given: dict[str, str] = field(default_factory=dict)  # file name -> where, for messages

    def empty(self) -> bool:
        return not self.given


def read_limits(d: Path) -> Limits:
    """Read and check ``/etc/vservers/NAME/cgroup/``; a bad file is an error naming it."""
    lim = Limits()
    if not d.is_dir():
        return lim
    for f in sorted(d.iterdir()):
        # name: util-vserver's name for the guest's cgroup (vsstore names it after the guest)
        if f.name.startswith(".") or f.name in ("parent", "name"):
            continue
        if f.name not in V2_SETTINGS and f.name not in V1_NAMES:
            raise ConfigError(
                f"{f}: unknown cgroup setting; use one of "
                f"{', '.join(V2_SETTINGS)} (or v1: {', '.join(V1_NAMES)})"
            )
        text, where = f.read_text().strip(), str(f)
        lim.given[f.name] = where
        if f.name in ("memory.max", "memory.limit_in_bytes"):
            b = _bytes(text, where)
            lim.memory_max = -1 if b is None else b
        elif f.name in ("memory.high", "memory.soft_limit_in_bytes"):
            b = _bytes(text, where)
            lim.memory_high = -1 if b is None else b
        elif f.name == "pids.max":
            lim.pids_max = -1 if text == "max" else _int(text, where, 1, 2**22, "a count or max")
        elif f.name == "cpu.max":
            parts = text.split()
            if not 1 <= len(parts) <= 2:
                raise ConfigError(
                    f"{where}: {text!r}: write 'QUOTA PERIOD' in microseconds (or 'max PERIOD')"
                )
            lim.cpu_quota = (
                -1 if parts[0] == "max" else _int(parts[0], where, 1000, 2**40, "microseconds")
            )
            if len(parts) == 2:
                lim.cpu_period = _int(parts[1], where, 1000, 1_000_000, "microseconds")
        elif f.name == "cpu.cfs_quota_us":
            q = _int(text, where, -1, 2**40, "microseconds or -1")
            lim.cpu_quota = -1 if q < 0 else q
        elif f.name == "cpu.cfs_period_us":
            lim.cpu_period = _int(text, where, 1000, 1_000_000, "microseconds")
        elif f.name == "cpu.weight":
            lim.cpu_weight = _int(text, where, 1, 10000, "1..10000 (100 is the default)")
        elif f.name == "cpu.shares":
            shares = _int(text, where, 2, 262144, "2..262144 (1024 is the default)")
            lim.cpu_weight = max(1, min(10000, round(shares * 100 / 1024)))
    return lim


def v2_files(lim: Limits) -> dict[str, str]:
    """What to write into a v2 cgroup."""
    out = {}
    if lim.memory_max is not None:
        out["memory.max"] = "max" if lim.memory_max < 0 else str(lim.memory_max)
    if lim.memory_high is not None:
        out["memory.high"] = "max" if lim.memory_high < 0 else str(lim.memory_high)
    if lim.pids_max is not None:
        out["pids.max"] = "max" if lim.pids_max < 0 else str(lim.pids_max)
    if lim.cpu_quota is not None:
        out["cpu.max"] = f"{'max' if lim.cpu_quota < 0 else lim.cpu_quota} {lim.cpu_period}"
    if lim.cpu_weight is not None:
        out["cpu.weight"] = str(lim.cpu_weight)
    return out


def v1_files(lim: Limits) -> dict[tuple[str, str], str]:
    """What to write into v1 hierarchies: (controller, file) -> value."""
    out: dict[tuple[str, str], str] = {}
    if lim.memory_max is not None:
        out[("memory", "memory.limit_in_bytes")] = str(lim.memory_max)
    if lim.memory_high is not None:
        out[("memory", "memory.soft_limit_in_bytes")] = str(lim.memory_high)
    if lim.pids_max is not None:
        out[("pids", "pids.max")] = "max" if lim.pids_max < 0 else str(lim.pids_max)
    if lim.cpu_quota is not None:
        out[("cpu", "cpu.cfs_period_us")] = str(lim.cpu_period)
        out[("cpu", "cpu.cfs_quota_us")] = str(lim.cpu_quota)
    if lim.cpu_weight is not None:
        out[("cpu", "cpu.shares")] = str(max(2, round(lim.cpu_weight * 1024 / 100)))
    return out


# -- the host's layout ----------------------------------------------------------------------


@dataclass
class Layout:
    """Where the controllers are: v2 (one directory) or v1 (a directory per controller)."""

    version: int  # 2, 1, or 0 (none usable)
    v2_root: Path | None = None  # mount point
    v2_self: str = "/"  # our cgroup, from the root
    v1: dict[str, tuple[Path, str]] = field(default_factory=dict)  # ctl -> (mount, our path)
    why: str = ""


def _self_cgroups(text: str) -> tuple[str | None, dict[str, str]]:
    """Our cgroup on v2 and per v1 controller, from /proc/self/cgroup."""
    v2, v1 = None, {}
    for line in text.splitlines():
        hid, ctls, path = line.split(":", 2)
        if hid == "0" and ctls == "":
            v2 = path
        else:
            for c in ctls.split(","):
                v1[c] = path
    return v2, v1


def detect(mountinfo: str | None = None, self_cgroup: str | None = None) -> Layout:
    """The host's layout.  VSSTORE_CGROUPS=none makes guests run without cgroups (rlimits
    alone), for hosts where another manager owns the hierarchy."""
    if mountinfo is None and os.environ.get("VSSTORE_CGROUPS") == "none":
        return Layout(0, why="cgroups switched off (VSSTORE_CGROUPS=none)")
    mountinfo = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    self_cgroup = self_cgroup if self_cgroup is not None else Path("/proc/self/cgroup").read_text()
    my2, my1 = _self_cgroups(self_cgroup)
    v2_mount = None
    v1_mounts: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, _src, opts = (right.split() + ["", "", ""])[:3]
        if fstype == "cgroup2" and v2_mount is None:
            v2_mount = Path(fields[4])
        elif fstype == "cgroup":
            for o in opts.split(","):
                if o in CONTROLLERS + ("cpuacct", "freezer"):
                    v1_mounts.setdefault(o, Path(fields[4]))
    if v2_mount is not None and my2 is not None:
        try:
            have = (v2_mount / my2.lstrip("/") / "cgroup.controllers").read_text().split()
        except OSError:
            have = []
        if {"memory", "pids"} <= set(have):
            return Layout(2, v2_root=v2_mount, v2_self=my2)
    v1 = {c: (m, my1.get(c, "/")) for c, m in v1_mounts.items()}
    if {"memory", "pids"} & set(v1):
        return Layout(1, v1=v1)
    return Layout(
        0, why="no cgroup v2 with memory and pids controllers, and no v1 memory or pids hierarchy"
    )


# -- a guest's cgroup -------------------------------------------------------------------------


@dataclass
class GuestCgroup:
    """The directories of one guest's cgroup: one on v2, one per controller on v1."""

    dirs: dict[str, Path]  # "unified" -> dir (v2), or controller -> dir (v1)

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in self.dirs.values()]

    def join(self, pid: int = 0) -> None:
        """Move process ``pid`` (0: this one) into the guest's cgroup, everywhere."""
        for f in self.procs_files():
            f.write_text(f"{pid or os.getpid()}\n")

    def pids(self) -> list[int]:
        """Every process in the cgroup, in its sub-cgroups too (a booted systemd moves
        them into its slices, on cgroup2)."""
        v2 = self.dirs.get("unified") or self.dirs.get("cgroup2")
        d = v2 or self.dirs.get("pids") or self.dirs.get("memory")
        if d is None:
            return []
        out: list[int] = []
        for sub in [d, *(_subtree(d) if v2 is not None else [])]:
            try:
                out += [int(x) for x in _read(sub / "cgroup.procs").split()]
            except OSError as e:
                if e.errno not in GONE:  # removed meanwhile: nobody is left in it
                    raise
        return out

    def kill(self, timeout: float = 10.0) -> None:
        """End every process in the cgroup: cgroup.kill on v2; freeze, SIGKILL, thaw on v1
        (a frozen process cannot fork a new one meanwhile), in rounds until it is empty or
        ``timeout`` has passed.  Another process may end the guest at the same time (the
        monitor cleans up while ``stop`` kills) and remove the cgroup: ENOENT or ENODEV on
        any of its files means "already gone", never an error."""
        try:
            self._kill(timeout)
        except OSError as e:
            if e.errno not in GONE:
                raise

    def _kill(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        d2 = self.dirs.get("unified") or self.dirs.get("cgroup2")
        fz = self.dirs.get("freezer")
        while True:
            if d2 is not None and (d2 / "cgroup.kill").exists():
                _write_file(d2 / "cgroup.kill", "1")
            else:
                if fz is not None:
                    self._freeze(fz, end)
                try:
                    self._signal_all(signal.SIGKILL)
                finally:
                    if fz is not None:  # a killed process ends only once thawed
                        _write_file(fz / "freezer.state", "THAWED")
            settle = min(end, time.monotonic() + 0.5)
            while self.pids() and time.monotonic() < settle:
                time.sleep(0.01)
            if not self.pids() or time.monotonic() >= end:
                return

    @staticmethod
    def _freeze(fz: Path, end: float) -> None:
        """Freeze the v1 freezer cgroup ``fz`` and wait until it is (or ``end``: a task
        stuck in the kernel does not freeze; it is killed all the same).  Whoever else
        kills the guest at the same time may thaw it meanwhile: then freeze it again."""
        while True:
            state = _read(fz / "freezer.state").strip()
            if state == "FROZEN" or time.monotonic() >= end:
                return
            if state == "THAWED":
                _write_file(fz / "freezer.state", "FROZEN")
            time.sleep(0.005)

    def _signal_all(self, sig: int) -> None:
        """Send ``sig`` to every process in the cgroup, through pidfds opened first and
        confirmed by a second reading of the cgroup, so that a pid the guest's process
        gave up meanwhile (and the host reused) is never signalled."""
        fds: dict[int, int] = {}
        try:
            for pid in self.pids():
                try:
                    fds[pid] = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass
            still = set(self.pids())
            for pid, fd in fds.items():
                if pid in still:
                    try:
                        signal.pidfd_send_signal(fd, sig)
                    except ProcessLookupError:
                        pass
        finally:
            for fd in fds.values():
                os.close(fd)

    def remove(self) -> None:
        """Remove the (empty) directories; one removed already (by whoever cleaned up
        first) is fine; sub-cgroups (a booted systemd's) go first."""
        for d in [s for top in self.dirs.values() for s in _subtree(top)] + list(
            self.dirs.values()
        ):
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError as e:
                    if e.errno in GONE:
                        break
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)  # the last exits are being accounted

    def usage(self) -> dict[str, int | None]:
        """Memory charged (file-backed, anonymous), CPU time, limits (runtime's reading)."""
        return runtime.cgroup_usage({k: str(v) for k, v in self.dirs.items()})


def _subtree(d: Path) -> list[Path]:
    """The cgroups below ``d``, deepest first (names a guest chose: only listed and
    removed, and cgroupfs holds no symlinks)."""
    out: list[Path] = []
    for top, dirs, _files in os.walk(d, topdown=False):
        out += [Path(top) / x for x in dirs]
    return out


def _read(p: Path) -> str:
    with open(p) as f:
        return f.read()


def _write_file(p: Path, value: str) -> None:
    """Write a cgroup control file (one write: the kernel takes it whole)."""
    with open(p, "w") as f:
        f.write(value + "\n")


def guest_dirs(layout: Layout, name: str, parent: str | None) -> dict[str, Path]:
    """Where guest ``name``'s cgroup lives (whether or not it exists)."""
    leaf = f"vserver-{name}"
    if layout.version == 2:
        base = parent if parent is not None else layout.v2_self
        assert layout.v2_root is not None and base is not None  # version 2: both found
        return {"unified": layout.v2_root / base.lstrip("/") / leaf}
    out = {}
    for ctl, (mount, mine) in layout.v1.items():
        base = parent if parent is not None else mine
        out[ctl] = mount / base.lstrip("/") / leaf
    return out


def create(layout: Layout, name: str, parent: str | None, lim: Limits) -> GuestCgroup:
    """Make the guest's cgroup and write its settings; anything half made is removed."""
    dirs = guest_dirs(layout, name, parent)
    made: list[Path] = []
    try:
        if layout.version == 2:
            d = dirs["unified"]
            ctl_file = d.parent / "cgroup.subtree_control"
            wanted = {"memory", "pids"} | (
                {"cpu"} if lim.cpu_quota is not None or lim.cpu_weight is not None else set()
            )
            enabled = set(ctl_file.read_text().split())
            missing = wanted - enabled
            if missing:
                try:
                    ctl_file.write_text(" ".join(f"+{c}" for c in sorted(missing)) + "\n")
                except OSError as e:
                    raise ConfigError(
                        f"cannot enable {', '.join(sorted(missing))} for the guests' cgroups in "
                        f"{d.parent} ({e.strerror}): on cgroup v2 a cgroup with processes in it "
                        f"cannot delegate controllers; name a delegated parent in "
                        f"/etc/vservers/.defaults/cgroup/parent (e.g. vsstore.slice)"
                    ) from None
            d.mkdir(exist_ok=True)
            made.append(d)
            for f, v in v2_files(lim).items():
                _write(d / f, v)
        else:
            for d in dirs.values():
                d.mkdir(exist_ok=True)
                made.append(d)
            for (ctl, f), v in v1_files(lim).items():
                if ctl not in dirs:
                    raise ConfigError(
                        f"{lim.given.get(f, f)}: this host has no {ctl} "
                        f"controller; remove the setting"
                    )
                _write(dirs[ctl] / f, v)
    except BaseException:
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return GuestCgroup({k: v for k, v in dirs.items() if v in made})


def existing(layout: Layout, name: str, parent: str | None) -> GuestCgroup | None:
    dirs = {k: v for k, v in guest_dirs(layout, name, parent).items() if v.is_dir()}
    return GuestCgroup(dirs) if dirs else None


def _write(p: Path, value: str) -> None:
    try:
        p.write_text(value + "\n")
    except OSError as e:
        raise VsError(f"cannot set {p.name} = {value} in {p.parent}: {e.strerror}") from None


def of(dirs: dict[str, str]) -> GuestCgroup | None:
    """The guest's cgroup from its directories in the run state (None: started without)."""
    if not dirs:
        return None
    return GuestCgroup({k: Path(v) for k, v in dirs.items()})
