"""Savings report: per guest and for the host, from the trees themselves (not the index).

The figures, each defined once (README "Reading the report", ``vsunify report --help``):

- files, apparent: the guest's regular file names and their sizes (st_size).
- shared: the apparent size of those of its files that another guest holds too (the same
  inode); never more than apparent.
- alone: bytes on disk of every inode the guest's tree reaches (files, directories,
  symlinks; st_blocks * 512, each inode once), what ``du -sx --block-size=1 GUEST`` says:
  what the guest costs by itself, with or without unification.
- on disk: its part of the host's bytes on disk now: an inode k guests hold counts 1/k for
  each.  The guests' figures add up to the TOTAL, which is ``du -sx`` of all the guest trees
  together (du counts an inode once).
- own: bytes on disk of the inodes no other guest holds: what removing the guest frees.
- saved: alone - on disk (an inode k guests hold saves (k-1)/k of itself for each); the
  guests' figures add up to the TOTAL, the sum of alone minus the bytes on disk together.
- share: saved / alone.

On XFS and btrfs distinct inodes may also share extents (FIEMAP's shared flag and physical
place): a stretch of the device that m guests reach, through any of their inodes, is
counted once for the host and once per guest (alone), and each of those guests is credited
(m-1)/m of it, hardlinks included.  ``hardlink_saved_bytes`` is what the inodes alone save
(the figure without extents), ``extent_saved_bytes`` what shared extents add; du does not
see extents, so there "alone" and the TOTAL are below du's.
"""

from __future__ import annotations

import heapq
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from vsstore import extents
from vsstore.extents import may_share
from vsstore.index import RunRecord, Snapshot
from vsstore.memory import Measurement
from vsstore.names import shown
from vsstore.safetree import GuestTree
from vsstore.store import Store

TOP_SHARED = 20  # files listed in "top_shared"


@dataclass(slots=True)
class GuestFigures:
    files: int = 0  # regular file names
    apparent_bytes: int = 0  # their sizes
    shared_bytes: int = 0  # sizes of its files another guest holds too (<= apparent)
    alone_bytes: int = 0  # on disk by itself: du -sx of its tree
    disk_bytes: int = 0  # its part of the host's bytes on disk (inode / holders)
    own_bytes: int = 0  # on disk in inodes only it holds: what removing it frees
    saved_bytes: int = 0  # alone - on disk
    # bytes on disk of this guest's inodes that k other guests share too: {k: bytes}
    shared_with: dict[int, int] = field(default_factory=dict)
    hardlink_saved_bytes: int = 0  # saved by shared inodes
    extent_saved_bytes: int = 0  # saved by extents shared between distinct inodes
    extent_shared_bytes: int = 0  # its bytes in extents another guest's inode shares

    @property
    def share_ratio(self) -> float:
        """Of what it costs alone, the part sharing saves."""
        return round(self.saved_bytes / self.alone_bytes, 4) if self.alone_bytes else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "apparent_bytes": self.apparent_bytes,
            "shared_bytes": self.shared_bytes,
            "alone_bytes": self.alone_bytes,
            "disk_bytes": self.disk_bytes,
            "own_bytes": self.own_bytes,
            "saved_bytes": self.saved_bytes,
            "share_ratio": self.share_ratio,
            "shared_with": {str(k): v for k, v in sorted(self.shared_with.items())},
            "hardlink_saved_bytes": self.hardlink_saved_bytes,
            "extent_saved_bytes": self.extent_saved_bytes,
            "extent_shared_bytes": self.extent_shared_bytes,
        }


@dataclass(slots=True)
class SharedFile:
    path: str  # one of its names: "guest:/rel", shown (vsstore.names)
    guests: int
    size: int  # on disk
    saved: int  # (guests - 1) * size

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "guests": self.guests,
            "disk_bytes": self.size,
            "saved_bytes": self.saved,
        }


@dataclass(frozen=True, slots=True)
class StoreFigures:
    """The store's objects, and those no guest links any more."""

    path: str  # shown (vsstore.names)
    objects: int
    object_bytes: int
    unused_objects: int  # no guest links them (vsunify gc removes them)
    unused_bytes: int
    links_histogram: dict[int, int]  # guests' links -> objects with that many

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "objects": self.objects,
            "bytes": self.object_bytes,
            "unused_objects": self.unused_objects,
            "unused_bytes": self.unused_bytes,
            "links_histogram": {str(k): v for k, v in sorted(self.links_histogram.items())},
        }


@dataclass(frozen=True, slots=True)
class History:
    """The trend, from the index: its last real runs and report snapshots, oldest first."""

    runs: list[RunRecord]
    snapshots: list[Snapshot]

    def as_dict(self) -> dict[str, object]:
        return {
            "runs": [r.as_dict() for r in self.runs],
            "snapshots": [s.as_dict() for s in self.snapshots],
        }


@dataclass(slots=True)
class Report:
    guests: dict[str, GuestFigures] = field(default_factory=dict)
    total: GuestFigures = field(default_factory=GuestFigures)  # its share: Report.share_ratio
    store: StoreFigures | None = None  # None: no store (JSON: {})
    top_shared: list[SharedFile] = field(default_factory=list)
    taken: float = 0.0
    history: History | None = None  # the command adds it from the index (JSON: {} without)
    memory: Measurement | None = None  # report --memory

    @property
    def share_ratio(self) -> float:
        """Saved bytes / what the guests cost alone (the total's share)."""
        return self.total.share_ratio

    def as_dict(self) -> dict[str, object]:
        total = self.total.as_dict()
        total["share_ratio"] = self.share_ratio
        d: dict[str, object] = {
            "taken": self.taken,
            "guests": {n: g.as_dict() for n, g in self.guests.items()},
            "total": total,
            "store": self.store.as_dict() if self.store is not None else {},
            "top_shared": [f.as_dict() for f in self.top_shared],
            "history": self.history.as_dict() if self.history is not None else {},
        }
        if self.memory is not None:
            d["memory"] = self.memory.as_dict()
        return d

    def snapshot(self) -> Snapshot:
        """The figures the index keeps of this report for the trend."""
        t = self.total
        return Snapshot(
            self.taken,
            len(self.guests),
            t.files,
            t.apparent_bytes,
            t.disk_bytes,
            t.saved_bytes,
            {n: (g.disk_bytes, g.saved_bytes) for n, g in self.guests.items()},
        )


def build(trees: list[GuestTree], store: Store | None) -> Report:
    rep = Report(taken=time.time())
    holders: dict[tuple[int, int], set[str]] = {}
    blocks: dict[tuple[int, int], int] = {}
    first_name: dict[tuple[int, int], str] = {}
    per_guest_inodes: dict[str, set[tuple[int, int]]] = {}
    # apparent size of each guest's file names, by inode: for "shared" once holders are known
    per_guest_sizes: dict[str, Counter[tuple[int, int]]] = {}
    ranges: dict[tuple[int, int], list[tuple[int, int]]] = {}  # shared extents, by inode
    for t in trees:
        gname = shown(t.name)  # as every figure and table names the guest
        g = rep.guests[gname] = GuestFigures()
        inos = per_guest_inodes[gname] = set()
        sizes = per_guest_sizes[gname] = Counter()
        sharing = may_share(t.fd)

        def inode(
            rel: str,
            st: os.stat_result,
            inos: set[tuple[int, int]] = inos,
            gname: str = gname,
            t: GuestTree = t,
        ) -> tuple[int, int] | None:
            """Count an inode once for this guest; its key if it is new to it."""
            k = (st.st_dev, st.st_ino)
            if k in inos:
                return None
            inos.add(k)
            blocks[k] = st.st_blocks * 512
            holders.setdefault(k, set()).add(gname)
            first_name.setdefault(k, t.where(rel))
            return k

        inode("", os.fstat(t.fd))  # the guest's root directory, as du counts it
        for rel, st in t.walk(on_other=inode):
            g.files += 1
            g.apparent_bytes += st.st_size
            sizes[(st.st_dev, st.st_ino)] += st.st_size
            k = inode(rel, st)
            if k is not None and sharing and k not in ranges and st.st_blocks:
                ranges[k] = _shared_ranges(t, rel, k)
    for name, inos in per_guest_inodes.items():
        g = rep.guests[name]
        saved = 0.0
        for k in inos:
            b = blocks[k]
            g.alone_bytes += b
            n = len(holders[k])
            if n > 1:
                g.shared_with[n - 1] = g.shared_with.get(n - 1, 0) + b
                saved += b * (n - 1) / n
            else:
                g.own_bytes += b
        g.shared_bytes = sum(
            size for k, size in per_guest_sizes[name].items() if len(holders[k]) > 1
        )
        g.saved_bytes = g.hardlink_saved_bytes = round(saved)
    hardlink_saved = sum(g.alone_bytes for g in rep.guests.values()) - sum(blocks.values())
    together = sum(blocks.values()) - _count_extents(rep, holders, ranges)
    top = heapq.nlargest(
        TOP_SHARED, ((blocks[k] * (len(h) - 1), k) for k, h in holders.items() if len(h) > 1)
    )
    rep.top_shared = [
        SharedFile(first_name[k], len(holders[k]), blocks[k], saved) for saved, k in top
    ]
    tot = rep.total
    for g in rep.guests.values():
        tot.files += g.files
        tot.apparent_bytes += g.apparent_bytes
        tot.shared_bytes += g.shared_bytes
        tot.alone_bytes += g.alone_bytes
        tot.own_bytes += g.own_bytes
        tot.extent_shared_bytes += g.extent_shared_bytes
    tot.disk_bytes = together
    tot.saved_bytes = tot.alone_bytes - together
    tot.hardlink_saved_bytes = hardlink_saved
    tot.extent_saved_bytes = tot.saved_bytes - hardlink_saved
    _settle(rep)
    if store is not None:
        objs = [o for os_ in store.scan().values() for o in os_]
        links = Counter(o.nlink - 1 for o in objs)
        unused = [o for o in objs if o.nlink <= 1]
        rep.store = StoreFigures(
            shown(store.path),
            len(objs),
            sum(o.size for o in objs),
            len(unused),
            sum(o.size for o in unused),
            dict(links),
        )
    return rep


def _settle(rep: Report) -> None:
    """Each guest's on disk = alone - saved, its saved rounded so that the guests' figures
    add up to the TOTAL's to the byte (the rounding left over goes to the guest saving most)."""
    guests = rep.guests.values()
    if not guests:
        return
    for attr in ("hardlink_saved_bytes", "extent_saved_bytes"):
        left = getattr(rep.total, attr) - sum(getattr(g, attr) for g in guests)
        if left:
            most = max(guests, key=lambda g: g.saved_bytes)
            setattr(most, attr, getattr(most, attr) + left)
    for g in guests:
        g.saved_bytes = g.hardlink_saved_bytes + g.extent_saved_bytes
        g.disk_bytes = g.alone_bytes - g.saved_bytes


def _shared_ranges(t: GuestTree, rel: str, k: tuple[int, int]) -> list[tuple[int, int]]:
    """The inode's shared extents on the device (none if it cannot be read as seen)."""
    try:
        fd = t.open_regular(rel, expect=k, flags=os.O_RDONLY | os.O_NOATIME)
    except OSError:
        return []
    try:
        return extents.shared_ranges(fd)
    except OSError:
        return []
    finally:
        os.close(fd)


def _count_extents(
    rep: Report,
    holders: dict[tuple[int, int], set[str]],
    ranges: dict[tuple[int, int], list[tuple[int, int]]],
) -> int:
    """Shared extents between distinct inodes: each stretch of the device that several
    inodes reach is taken off the guests' disk bytes (once per guest: what it would cost
    alone) and their savings are moved from per-inode to per-stretch credit ((m-1)/m for m
    guests reaching it).  Returns the bytes to take off the host's sum of inodes."""
    events: list[tuple[int, int, int, tuple[int, int]]] = []
    for k, rs in ranges.items():
        for start, end in rs:
            events.append((k[0], start, 1, k))
            events.append((k[0], end, -1, k))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    active: Counter[tuple[int, int]] = Counter()
    extra: dict[str, float] = {}
    off_host = 0
    prev: tuple[int, int] | None = None
    for dev, pos, delta, k in events:
        if prev is not None and prev[0] == dev and pos > prev[1] and len(active) > 1:
            length = pos - prev[1]
            inodes = list(active)
            off_host += length * (len(inodes) - 1)
            reach: Counter[str] = Counter()
            for i in inodes:
                reach.update(holders[i])
            m = len(reach)
            for gname, n in reach.items():
                g = rep.guests[gname]
                g.alone_bytes -= length * (n - 1)
                g.extent_shared_bytes += length if m > 1 else 0
                was = sum(
                    length * (len(holders[i]) - 1) / len(holders[i])
                    for i in inodes
                    if gname in holders[i]
                )
                extra[gname] = extra.get(gname, 0.0) + length * (m - 1) / m - was
        active[k] += delta
        if not active[k]:
            del active[k]
        prev = (dev, pos)
    for gname, x in extra.items():
        rep.guests[gname].extent_saved_bytes = round(x)
    return off_host


COLUMNS = (
    ("files", "regular file names"),
    ("apparent", "their sizes (st_size)"),
    ("shared", "sizes of those of its files another guest holds too (part of apparent)"),
    ("alone", "on disk by itself, files, directories and symlinks: du -sx GUEST"),
    (
        "on disk",
        "its part of the host's disk now (an inode k guests hold: 1/k each); "
        "the guests add up to TOTAL = du -sx of all guest trees together",
    ),
    ("own", "on disk in inodes no other guest holds: what removing the guest frees"),
    ("saved", "alone - on disk"),
    ("share", "saved / alone"),
)
"""The table's columns and what each means (report --help, the table's legend, README)."""


def legend() -> str:
    """The columns, one line each: for report --help."""
    return "\n".join(f"  {name:<9} {what}" for name, what in COLUMNS)


def table_row(name: str, g: GuestFigures) -> tuple[str, ...]:
    """One row of the table, in COLUMNS' order after the guest's name."""
    from .progress import human

    return (
        name,
        str(g.files),
        human(g.apparent_bytes),
        human(g.shared_bytes),
        human(g.alone_bytes),
        human(g.disk_bytes),
        human(g.own_bytes),
        human(g.saved_bytes),
        f"{g.share_ratio:.0%}",
    )


def format_table(rep: Report) -> str:
    from .progress import human

    rows = [("guest", *(name for name, _ in COLUMNS))]
    rows += [table_row(name, g) for name, g in sorted(rep.guests.items())]
    rows.append(table_row("TOTAL", rep.total))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    lines.append("alone = du -sx GUEST; on disk = its part now, TOTAL = du -sxc of all the trees")
    lines.append("saved = alone - on disk; own = freed if removed (vsunify report --help)")
    if rep.total.extent_saved_bytes or rep.total.extent_shared_bytes:
        t = rep.total
        lines.append(
            f"saved by shared inodes (hardlinks) {human(t.hardlink_saved_bytes)}, by shared "
            f"extents {human(t.extent_saved_bytes)}; per guest:"
        )
        for name, g in sorted(rep.guests.items()):
            lines.append(
                f"  {name}: hardlinks {human(g.hardlink_saved_bytes)}, extents "
                f"{human(g.extent_saved_bytes)} ({human(g.extent_shared_bytes)} in shared extents)"
            )
    if rep.store is not None:
        s = rep.store
        lines.append(
            f"store {s.path}: {s.objects} objects, {human(s.object_bytes)}"
            f"; unused {s.unused_objects} ({human(s.unused_bytes)})"
        )
    if rep.top_shared:
        lines.append("")
        lines.append("most saving shared files (one name; guests holding it; saved):")
        for f in rep.top_shared[:10]:
            lines.append(f"  {human(f.saved):>9}  {f.guests:>3} guests  {f.path}")
    snaps = rep.history.snapshots if rep.history is not None else []
    if len(snaps) > 1:
        lines.append("")
        lines.append("saved over time (reports):")
        for sn in snaps[-8:]:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(sn.taken))
            lines.append(f"  {when}  {human(sn.saved_bytes):>9}  {sn.guests} guests")
    return "\n".join(lines)


def format_memory(mem: Measurement) -> str:
    """The memory figures as text (``report --memory``)."""
    from .progress import human

    t = mem.total
    if not mem.guests:
        return "\nmemory: no guest is running"
    lines = [
        "",
        "file-backed memory of running guests:",
        f"  {'guest':<16} {'procs':>5} {'mapped':>9} {'shared':>9}",
    ]
    for n, g in mem.guests.items():
        lines.append(f"  {n:<16} {g.processes:>5} {human(g.file_rss):>9} {human(g.shared_rss):>9}")
    lines.append(
        f"  host: {human(t.with_unification)} with unification, "
        f"{human(t.without_unification)} without ({human(t.saved)} saved)"
    )
    return "\n".join(lines)
