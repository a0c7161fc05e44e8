"""Walk the guests and collect candidate inodes: the first stage of a run."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vsstore.excludes import ExcludeList
from vsstore.safetree import GuestTree

log = logging.getLogger("vsstore")

TMP_RE = re.compile(r"^\.vsu~[0-9a-f]{16}$")
"""Our temporary names (see apply.py); never candidates themselves."""


@dataclass(slots=True)
class InodeRec:
    """A candidate inode and every name the walk found for it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    mode: int
    uid: int
    gid: int
    names: list[tuple[GuestTree, str]] = field(default_factory=list)
    digest: bytes | None = None    # xxh3-128
    strong: bytes | None = None    # BLAKE3-256
    meta: bytes | None = None      # metadata class with mtime
    meta_any: bytes | None = None  # ... and without

    def same_stat(self, st: os.stat_result) -> bool:
        """Is ``st`` still the inode the walk saw, unchanged?  (ctime moves on any write,
        chmod, chown or xattr change and cannot be set from user space.)"""
        return (st.st_ino == self.ino and st.st_dev == self.dev and st.st_size == self.size
                and st.st_mtime_ns == self.mtime_ns and st.st_ctime_ns == self.ctime_ns)

    @property
    def all_names_seen(self) -> bool:
        return self.nlink == len(self.names)


@dataclass(slots=True)
class Scan:
    inodes: dict[tuple[int, int], InodeRec] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)      # guest name -> names scanned
    files_scanned: int = 0
    errors: int = 0
    leftovers: list[str] = field(default_factory=list)


def scan(trees: list[GuestTree], excludes: dict[str, ExcludeList], min_size: int,
         tick: Callable[[int, int], None] | None = None,
         known: Mapping[int, os.stat_result] | None = None) -> Scan:
    """Collect regular files of at least ``min_size`` bytes that no exclude rule covers.
    ``known``: stats of sealed store objects, so their names need no stat (see walk)."""
    out = Scan()
    inodes = out.inodes

    def on_error(tree: GuestTree, rel: str, e: OSError) -> None:
        out.errors += 1
        log.warning("%s: /%s: skipped: %s", tree.name, rel, e.strerror or e)

    for tree in trees:
        ex = excludes[tree.name]
        count = 0
        for rel, st in tree.walk(prune_dir=ex.prune, known=known,
                                 on_error=lambda r, e, t=tree: on_error(t, r, e)):
            if ".vsu~" in rel and TMP_RE.match(rel.rpartition("/")[2]):
                out.leftovers.append(f"{tree.name}:/{rel}")
                continue
            if st.st_size < min_size or ex.excluded(rel):
                continue
            count += 1
            key = (st.st_dev, st.st_ino)
            rec = inodes.get(key)
            if rec is None:
                rec = inodes[key] = InodeRec(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns, st.st_nlink, st.st_mode,
                                             st.st_uid, st.st_gid)
            rec.names.append((tree, rel))
            if tick is not None and count % 512 == 0:
                tick(out.files_scanned + count, 0)
        out.files[tree.name] = count
        out.files_scanned += count
    return out
