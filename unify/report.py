"""Savings report: per guest and for the host, from the trees themselves (not the index).

For every regular file name: apparent bytes (st_size).  For every distinct inode: bytes on
disk (st_blocks * 512), counted once per guest and once for the host.  An inode held by k
guests saves (k-1) copies on the host; each of those guests is credited (k-1)/k of it, so the
guests' savings add up to the host's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vsstore.safetree import GuestTree
from vsstore.store import Store


@dataclass(slots=True)
class GuestFigures:
    files: int = 0
    apparent_bytes: int = 0
    disk_bytes: int = 0
    shared_bytes: int = 0
    saved_bytes: int = 0

    def as_dict(self) -> dict[str, float]:
        d = {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]
        d["share_ratio"] = round(self.shared_bytes / self.disk_bytes, 4) if self.disk_bytes else 0.0
        return d


@dataclass(slots=True)
class Report:
    guests: dict[str, GuestFigures] = field(default_factory=dict)
    total: GuestFigures = field(default_factory=GuestFigures)
    store: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        total = self.total.as_dict()
        before = sum(g.disk_bytes for g in self.guests.values())
        total["share_ratio"] = round(self.total.saved_bytes / before, 4) if before else 0.0
        return {"guests": {n: g.as_dict() for n, g in self.guests.items()},
                "total": total, "store": self.store}


def build(trees: list[GuestTree], store: Store | None) -> Report:
    rep = Report()
    holders: dict[tuple[int, int], set[str]] = {}
    blocks: dict[tuple[int, int], int] = {}
    per_guest_inodes: dict[str, set[tuple[int, int]]] = {}
    for t in trees:
        g = rep.guests[t.name] = GuestFigures()
        inos = per_guest_inodes[t.name] = set()
        for _rel, st in t.walk():
            g.files += 1
            g.apparent_bytes += st.st_size
            k = (st.st_dev, st.st_ino)
            if k not in inos:
                inos.add(k)
                blocks[k] = st.st_blocks * 512
                holders.setdefault(k, set()).add(t.name)
    for name, inos in per_guest_inodes.items():
        g = rep.guests[name]
        saved = 0.0
        for k in inos:
            b = blocks[k]
            g.disk_bytes += b
            n = len(holders[k])
            if n > 1:
                g.shared_bytes += b
                saved += b * (n - 1) / n
        g.saved_bytes = round(saved)
    tot = rep.total
    tot.files = sum(g.files for g in rep.guests.values())
    tot.apparent_bytes = sum(g.apparent_bytes for g in rep.guests.values())
    tot.disk_bytes = sum(blocks.values())
    tot.shared_bytes = sum(b for k, b in blocks.items() if len(holders[k]) > 1)
    tot.saved_bytes = sum(g.disk_bytes for g in rep.guests.values()) - tot.disk_bytes
    if store is not None:
        objs = [o for os_ in store.scan().values() for o in os_]
        links = Counter(o.nlink - 1 for o in objs)
        unused = [o for o in objs if o.nlink <= 1]
        rep.store = {
            "path": str(store.path),
            "objects": len(objs),
            "bytes": sum(o.size for o in objs),
            "unused_objects": len(unused),
            "unused_bytes": sum(o.size for o in unused),
            "links_histogram": {str(k): v for k, v in sorted(links.items())},
        }
    return rep


def format_table(rep: Report) -> str:
    from .progress import human
    rows = [("guest", "files", "apparent", "on disk", "shared", "saved", "share")]
    for name, g in sorted(rep.guests.items()):
        d = g.as_dict()
        rows.append((name, str(g.files), human(g.apparent_bytes), human(g.disk_bytes),
                     human(g.shared_bytes), human(g.saved_bytes), f"{d['share_ratio']:.0%}"))
    t = rep.as_dict()["total"]
    rows.append(("TOTAL", str(rep.total.files), human(rep.total.apparent_bytes),
                 human(rep.total.disk_bytes), human(rep.total.shared_bytes),
                 human(rep.total.saved_bytes), f"{t['share_ratio']:.0%}"))  # type: ignore[index]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    if rep.store:
        s = rep.store
        lines.append(f"store {s['path']}: {s['objects']} objects, {human(s['bytes'])}"  # type: ignore[arg-type]
                     f"; unused {s['unused_objects']} ({human(s['unused_bytes'])})")  # type: ignore[arg-type]
    return "\n".join(lines)
