"""Walk the guests and collect candidate inodes: the first stage of a run."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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
    names: list[tuple[GuestTree, str]] = field(default_factory=list)
    digest: bytes | None = None  # xxh3-128
    strong: bytes | None = None  # BLAKE3-256
    meta: bytes | None = None  # metadata class with mtime
    meta_any: bytes | None = None  # ... and without

    def same_stat(self, st: os.stat_result) -> bool:
        """Is ``st`` still the inode the walk saw, unchanged?  (ctime moves on any write,
        chmod, chown or xattr change and cannot be set from user space.)"""
        return (
            st.st_ino == self.ino
            and st.st_dev == self.dev
            and st.st_size == self.size
            and st.st_mtime_ns == self.mtime_ns
            and st.st_ctime_ns == self.ctime_ns
        )

    @property
    def all_names_seen(self) -> bool:
        return self.nlink == len(self.names)


@dataclass(slots=True)
class Scan:
    inodes: dict[tuple[int, int], InodeRec] = field(default_factory=dict)  # to hardlink
    # Inodes kept out of the hardlinks (by an exclude, or by --reflink-only) whose extents
    # may be shared; none that is in ``inodes`` as well.
    private: dict[tuple[int, int], InodeRec] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)  # guest name -> names scanned
    files_scanned: int = 0
    errors: int = 0
    leftovers: list[str] = field(default_factory=list)


Found = list[tuple[str, InodeRec]]


def _rec(dev: int, st: os.stat_result) -> InodeRec:
    """What a run keeps of a name's stat (``dev``: the guest's, one int object for all;
    a file bind-mounted into the guest keeps its own)."""
    if st.st_dev != dev:
        dev = st.st_dev
    return InodeRec(dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


def _walk_one(
    tree: GuestTree,
    ex: ExcludeList,
    min_size: int,
    known: Mapping[int, os.stat_result] | None,
    link: bool,
    extents: bool,
) -> tuple[Found, Found, list[str], list[str]]:
    """One guest's candidates (to hardlink; private, for extents), leftover temporary
    names and error messages.  Each candidate is turned into a record at once: a run
    keeps no stat_result (with its float times) per name."""
    found: Found = []
    private: Found = []
    leftovers: list[str] = []
    errors: list[str] = []
    dev = tree.dev

    def on_error(rel: str, e: OSError) -> None:
        errors.append(f"{tree.where(rel)}: skipped: {e.strerror or e}")

    # No rules at all (the content-only run): no match per name.
    match = ex.match if ex.rules else None
    prune = ex.prune_untouched if extents else ex.prune
    for rel, st in tree.walk(prune_dir=prune if ex.rules else None, known=known, on_error=on_error):
        if ".vsu~" in rel and TMP_RE.match(rel.rpartition("/")[2]):
            leftovers.append(tree.where(rel))
        elif st.st_size >= min_size:
            r = match(rel) if match is not None else None
            if r is None or r.include:
                (found if link else private).append((rel, _rec(dev, st)))
            elif extents and not r.untouched:
                private.append((rel, _rec(dev, st)))
    return found, private, leftovers, errors


def _add(inodes: dict[tuple[int, int], InodeRec], tree: GuestTree, rel: str, new: InodeRec) -> None:
    key = (new.dev, new.ino)
    rec = inodes.get(key)
    if rec is None:
        rec = inodes[key] = new
    rec.names.append((tree, rel))


def scan(
    trees: list[GuestTree],
    excludes: dict[str, ExcludeList],
    min_size: int,
    tick: Callable[[int, int], None] | None = None,
    known: Mapping[int, os.stat_result] | None = None,
    jobs: int = 4,
    link: bool = True,
    extents: bool = False,
) -> Scan:
    """Collect regular files of at least ``min_size`` bytes that no exclude rule covers
    (``link``: else they go to ``private``) and, with ``extents``, those an exclude but
    no '=' rule covers (``private``).
    ``known``: stats of sealed store objects, so their names need no stat (see walk).
    Guests are walked in parallel threads: on a cold cache the walk waits on directory and
    inode reads, and several guests keep several of them in flight."""
    out = Scan()
    inodes = out.inodes
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(trees)))) as pool:
        walks = pool.map(
            lambda t: _walk_one(t, excludes[t.name], min_size, known, link, extents), trees
        )
        for tree, (found, private, leftovers, errors) in zip(trees, walks, strict=True):
            for msg in errors:
                log.warning("%s", msg)
            out.errors += len(errors)
            out.leftovers += leftovers
            for rel, rec in found:
                _add(inodes, tree, rel, rec)
            for rel, rec in private:
                _add(out.private, tree, rel, rec)
            out.files[tree.name] = len(found) + len(private)
            out.files_scanned += len(found) + len(private)
            if tick is not None:
                tick(out.files_scanned, 0)
    for key in inodes.keys() & out.private.keys():
        del out.private[key]  # one name may be hardlinked: that decides for the inode
    return out
