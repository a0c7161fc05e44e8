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
class GuestMemory:
    processes: int = 0
    files: dict[Key, int] = field(default_factory=dict)  # inode -> resident bytes
    file_rss: int = 0
    shared_rss: int = 0


def measure(pids_by_guest: dict[str, list[int]], top: int = 10) -> dict[str, object]:
    """The sharing figures for guests given as {name: [host pids]}."""
    guests: dict[str, GuestMemory] = {}
    names: dict[Key, str] = {}
    for name, pids in pids_by_guest.items():
        gm = guests[name] = GuestMemory(processes=len(pids))
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
    shared = sorted(((sum(bs) - max(bs), k) for k, bs in holders.items() if len(bs) > 1),
                    reverse=True)[:top]
    return {
        "guests": {n: {"processes": g.processes, "file_rss": g.file_rss,
                       "shared_rss": g.shared_rss, "files": len(g.files)}
                   for n, g in sorted(guests.items())},
        "total": {"with_unification": with_u, "without_unification": without,
                  "saved": without - with_u},
        "top_shared": [{"path": names[k], "guests": len(holders[k]), "saved": s}
                       for s, k in shared],
    }


def measure_running(paths) -> dict[str, object]:  # type: ignore[no-untyped-def]
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
    out = measure(pids)
    for name, usage in charged.items():
        out["guests"][name]["cgroup"] = usage  # type: ignore[index]
    return out
