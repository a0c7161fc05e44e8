"""Memory sharing of running guests, measured from /proc/PID/smaps.

For each guest, the resident bytes of every mapped file (inode), summed over the mappings
of a process and taken at the largest over the guest's processes (they share the page
cache of an inode).  An inode mapped by several guests is one page cache: with unification
the host pays the largest of the guests' figures for it; without, each guest would map its
own copy and the host would pay the sum.  (Resident sets of different processes may cover
different pages of a file; the largest is a lower bound of their union, so "saved" is a
conservative figure.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Paths

_HEADER = re.compile(rb"^[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")

Key = tuple[int, int, int]  # (major, minor, inode)


def file_rss(pid: int) -> dict[Key, tuple[int, str]]:
    """Resident bytes per mapped file of one process: {(major, minor, ino): (bytes, path)}."""
    out: dict[Key, tuple[int, str]] = {}
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            data = f.read()
    except OSError:
        return out  # gone meanwhile
    key: Key | None = None
    path = ""
    for line in data.split(b"\n"):
        m = _HEADER.match(line)
        if m:
            ino = int(m.group(3))
            key = (int(m.group(1), 16), int(m.group(2), 16), ino) if ino else None
            path = m.group(4).decode(errors="replace")
        elif key is not None and line.startswith(b"Rss:"):
            kb = int(line.split()[1])
            prev = out.get(key, (0, path))[0]
            out[key] = (prev + kb * 1024, path)
    return out


@dataclass
class _Mapped:
    """One guest's mapped files while they are counted."""

    processes: int = 0
    files: dict[Key, int] = field(default_factory=dict)  # inode -> resident bytes
    file_rss: int = 0
    shared_rss: int = 0


@dataclass(frozen=True, slots=True)
class GuestMemory:
    """One running guest's file-backed memory."""

    processes: int
    file_rss: int  # resident bytes of the files it maps (each inode at its largest)
    shared_rss: int  # of it, in inodes other running guests map too
    files: int  # inodes mapped
    cgroup: dict[str, int | None] | None = None  # what its cgroup is charged (runtime)

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "processes": self.processes,
            "file_rss": self.file_rss,
            "shared_rss": self.shared_rss,
            "files": self.files,
        }
        if self.cgroup is not None:
            d["cgroup"] = self.cgroup
        return d


@dataclass(frozen=True, slots=True)
class MemoryTotal:
    """What the host pays for the guests' mapped files."""

    with_unification: int  # each inode once, at the largest of the guests' figures
    without_unification: int  # each guest its own copy: the sum
    saved: int


@dataclass(frozen=True, slots=True)
class SharedMapping:
    """An inode several running guests map."""

    path: str  # "guest:/path" of one of them
    guests: int
    saved: int  # what the others would pay for their own copies


@dataclass(frozen=True, slots=True)
class Measurement:
    """The sharing figures of running guests (``measure``)."""

    guests: dict[str, GuestMemory]  # by name, in name order
    total: MemoryTotal
    top_shared: list[SharedMapping]  # most saving first

    def as_dict(self) -> dict[str, object]:
        t = self.total
        return {
            "guests": {n: g.as_dict() for n, g in self.guests.items()},
            "total": {
                "with_unification": t.with_unification,
                "without_unification": t.without_unification,
                "saved": t.saved,
            },
            "top_shared": [
                {"path": f.path, "guests": f.guests, "saved": f.saved} for f in self.top_shared
            ],
        }


def measure(
    pids_by_guest: dict[str, list[int]],
    top: int = 10,
    charged: dict[str, dict[str, int | None]] | None = None,
) -> Measurement:
    """The sharing figures for guests given as {name: [host pids]}; ``charged``: what a
    guest's cgroup is charged, to show with its figures."""
    guests: dict[str, _Mapped] = {}
    names: dict[Key, str] = {}
    for name, pids in pids_by_guest.items():
        gm = guests[name] = _Mapped(processes=len(pids))
        for pid in pids:
            for k, (b, path) in file_rss(pid).items():
                if b > gm.files.get(k, 0):
                    gm.files[k] = b
                names.setdefault(k, f"{name}:{path}")
    holders: dict[Key, list[int]] = {}
    for gm in guests.values():
        for k, b in gm.files.items():
            holders.setdefault(k, []).append(b)
    for gm in guests.values():
        gm.file_rss = sum(gm.files.values())
        gm.shared_rss = sum(b for k, b in gm.files.items() if len(holders[k]) > 1)
    with_u = sum(max(bs) for bs in holders.values())
    without = sum(sum(bs) for bs in holders.values())
    shared = sorted(
        ((sum(bs) - max(bs), k) for k, bs in holders.items() if len(bs) > 1), reverse=True
    )[:top]
    charged = charged or {}
    return Measurement(
        {
            n: GuestMemory(g.processes, g.file_rss, g.shared_rss, len(g.files), charged.get(n))
            for n, g in sorted(guests.items())
        },
        MemoryTotal(with_u, without, without - with_u),
        [SharedMapping(names[k], len(holders[k]), s) for s, k in shared],
    )


def measure_running(paths: Paths) -> Measurement:
    """``measure`` over every configured guest that runs now (the guest's own processes: a
    reaping pid 1 of ours is not the guest's programs), with the memory its cgroup is
    charged."""
    from .config import configured_names
    from .runtime import cgroup_usage, guest_pids, running

    pids: dict[str, list[int]] = {}
    charged: dict[str, dict[str, int | None]] = {}
    for name in configured_names(paths):  # the run state needs no root tree
        st = running(paths, name)
        if st is not None:
            pids[name] = guest_pids(st, own=False)
            if st.cgroup:  # what the kernel charges it, as vserver-stat shows
                charged[name] = cgroup_usage(st.cgroup)
    return measure(pids, charged=charged)
