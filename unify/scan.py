"""Walk the guests and collect candidate inodes: the first stage of a run."""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vsstore.errors import NOSPACE_ERRNOS, NoSpaceError
from vsstore.excludes import ExcludeList
from vsstore.safetree import GuestTree, lstat_entry

log = logging.getLogger("vsstore")

TMP_RE = re.compile(r"^\.vsu~[0-9a-f]{16}$")
"""Our temporary names (see apply.py); never candidates themselves."""


@dataclass(slots=True)
class InodeRec:
    """A candidate inode and every name the walk found for it (of a store object: one)."""

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
    complete: bool = True  # False: over the budget; ``inodes`` and ``private`` are empty
    sizes: Counter[int] = field(default_factory=Counter)  # new (non-object) inodes by size


Found = list[tuple[str, InodeRec]]


class Budget:
    """How many inodes one pass of the walk may keep (None: no limit).  Once the guests
    walked so far hold more, the pass drops its records and only counts sizes (``over``),
    so that the run can go on in passes over size ranges (see engine.run)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.over = False


# A spilled candidate: dev, ino, size, mtime_ns, ctime_ns, nlink, guest (its index in the
# run's trees), length of the name; the name's bytes follow.  Four bytes for the length: a
# walk that resolves by components (no openat2) goes deeper than PATH_MAX.
_SPILLED = struct.Struct("<QQQqqIII")


class Spill:
    """The first walk's candidates, on disk, so that a run in passes by size reads each
    pass's records back instead of walking every guest again: a name costs a stat and
    several microseconds of Python to walk, well under one to read back.  Held in memory
    (HOLD bytes at most) until the walk goes over its budget (``start``; a small run
    writes nothing), then in an unlinked temporary file (O_TMPFILE) in ``directory``:
    nothing of it outlives the run, however it ends.  The records are the first walk's: a file changed since is
    skipped by the checks before hashing and linking, as one changed between a walk and
    its hashing always was."""

    FLUSH = 1 << 20  # a walker hands its buffer over at this size
    HOLD = 4 << 20  # held in memory at most before the file is made

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file: BinaryIO | None = None
        self.pending: list[bytearray] = []
        self.held = 0
        self.lock = threading.Lock()  # walkers hand buffers over from their threads

    def add(self, buf: bytearray) -> None:
        """Take a walker's buffer (the walker goes on with a new one)."""
        with self.lock:
            if self.file is None and self.held + len(buf) <= self.HOLD:
                self.pending.append(buf)
                self.held += len(buf)
                return
            self._start()
            self._write(buf)

    def start(self) -> None:
        """The walk is over its budget: what is held and all that comes goes to disk."""
        with self.lock:
            self._start()

    def _start(self) -> None:
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory, buffering=0)
            for b in self.pending:
                self._write(b)
            self.pending.clear()

    def _write(self, b: bytes | bytearray) -> None:
        assert self.file is not None
        try:
            view = memoryview(b)
            while view:
                n = self.file.write(view)
                if not n:
                    raise OSError(errno.EIO, "short write")
                view = view[n:]
        except OSError as e:
            if e.errno in NOSPACE_ERRNOS:
                raise NoSpaceError.on(
                    self.directory,
                    "the walk's list of files (one run in passes by size)",
                    "nothing was changed",
                ) from None
            raise

    def read(
        self, trees: list[GuestTree], lo: int, hi: int
    ) -> Iterator[tuple[GuestTree, str, InodeRec]]:
        """The records of sizes in [lo, hi), with their guest and name."""
        assert self.file is not None
        self.file.seek(0)
        head = _SPILLED.size
        unpack = _SPILLED.unpack_from
        devs = {t.dev: t.dev for t in trees}  # one int object per device, as the walk has
        data = b""
        while chunk := self.file.read(4 << 20):
            data += chunk
            pos, end = 0, len(data)
            while pos + head <= end:
                dev, ino, size, mtime, ctime, nlink, g, n = unpack(data, pos)
                if pos + head + n > end:
                    break
                if lo <= size < hi:
                    rel = os.fsdecode(data[pos + head : pos + head + n])
                    dev = devs.setdefault(dev, dev)
                    yield trees[g], rel, InodeRec(dev, ino, size, mtime, ctime, nlink)
                pos += head + n
            data = data[pos:]
        if data:
            raise OSError(f"vsunify: spill file truncated ({len(data)} bytes left)")

    def close(self) -> None:
        self.pending.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


@dataclass(slots=True)
class _GuestWalk:
    found: Found = field(default_factory=list)
    private: Found = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    count: int = 0  # candidate names, in any size range
    sizes: Counter[int] = field(default_factory=Counter)  # new inodes' sizes, by count


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
    objects: Mapping[int, InodeRec] | None,
    link: bool,
    extents: bool,
    sizes: tuple[int, int] | None,
    budget: Budget,
    spill: Spill | None = None,
    tid: int = 0,
) -> _GuestWalk:
    """One guest's candidates (to hardlink; private, for extents), leftover temporary
    names and error messages.  Each candidate is turned into a record at once: a run
    keeps no stat_result (with its float times) per name, and a name of a store object
    (``objects``, by inode number) gets that object's one record.  ``spill``: every
    candidate to hardlink that is no store object is written there too (as guest
    ``tid``), kept or not."""
    out = _GuestWalk()
    found, private, counts = out.found, out.private, out.sizes
    dev = tree.dev
    lo, hi = sizes if sizes is not None else (0, 1 << 63)
    limit = budget.limit

    def on_error(rel: str, e: OSError) -> None:
        out.errors.append(f"{tree.where(rel)}: skipped: {e.strerror or e}")

    # No rules at all (the content-only run): no match per name.
    match = ex.match if ex.rules else None
    prune = (ex.prune_untouched if extents else ex.prune) if ex.rules else None
    n = 0
    buf = bytearray()
    pack = _SPILLED.pack
    for prefix, entries in tree.listings(prune_dir=prune, on_error=on_error):
        for entry in entries:
            name = entry.name
            if ".vsu~" in name and TMP_RE.match(name):
                out.leftovers.append(tree.where(prefix + name))
                continue
            # A name of a store object (its directory entry's inode number: no stat; the
            # guest is on the store's filesystem): its record is the object's.
            rec = objects.get(entry.inode()) if objects is not None else None
            if rec is not None and rec.dev == dev:
                size = rec.size
                st = None
            else:
                st = lstat_entry(entry, prefix, on_error)
                if st is None or not stat.S_ISREG(st.st_mode):
                    continue  # no longer a file
                size = st.st_size
                rec = None
            if size < min_size:
                continue
            if match is not None:
                r = match(prefix + name)
                if r is None or r.include:
                    into = found if link else private
                elif extents and not r.untouched:
                    into = private
                else:
                    continue
            else:
                into = found if link else private
            n += 1
            if size < lo or size >= hi:
                continue  # another pass's
            if rec is not None:
                if into is found:
                    # One name per object is kept (to read it through, should its index
                    # row be stale), not every one; a breach finds them all by a walk
                    # (apply.Linker.evacuate).  Walkers of two guests may both add one.
                    if not rec.names:
                        rec.names.append((tree, prefix + name))
                else:
                    into.append((prefix + name, rec))
            elif st is not None:
                counts[size] += 1
                if spill is not None and into is found:
                    raw = os.fsencode(prefix + name)
                    buf += pack(
                        st.st_dev,
                        st.st_ino,
                        size,
                        st.st_mtime_ns,
                        st.st_ctime_ns,
                        st.st_nlink,
                        tid,
                        len(raw),
                    )
                    buf += raw
                    if len(buf) >= Spill.FLUSH:
                        if budget.over:
                            spill.start()
                        spill.add(buf)
                        buf = bytearray()
                if budget.over:
                    continue
                into.append((prefix + name, _rec(dev, st)))
                if limit is not None and len(found) + len(private) > limit:
                    budget.over = True  # one guest alone holds more: no pass can keep all
                    found.clear()
                    private.clear()
    if spill is not None and buf:
        spill.add(buf)
    out.count = n
    return out


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
    jobs: int = 4,
    link: bool = True,
    extents: bool = False,
    objects: Mapping[int, InodeRec] | None = None,
    sizes: tuple[int, int] | None = None,
    budget: int | None = None,
    spill: Spill | None = None,
) -> Scan:
    """Collect regular files of at least ``min_size`` bytes that no exclude rule covers
    (``link``: else they go to ``private``) and, with ``extents``, those an exclude but
    no '=' rule covers (``private``).
    ``objects``: a record per sealed store object by inode number (fresh ones for each
    scan: a name is added to them); a name whose directory entry holds one needs no stat.
    ``sizes``: keep only inodes of sizes in [lo, hi) (the others are counted only).
    ``budget``: keep at most about this many inodes; past it, ``complete`` is False, no
    inode is kept and ``sizes`` counts the new inodes by size; a pass then reads its
    sizes from ``spill`` (``from_spill``), where the walk wrote every candidate.
    Guests are walked in parallel threads: on a cold cache the walk waits on directory and
    inode reads, and several guests keep several of them in flight."""
    out = Scan()
    inodes = out.inodes
    state = Budget(budget)
    if spill is not None and extents:
        raise ValueError("a spill holds candidates to hardlink only (a run in passes)")
    with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(trees)))) as pool:
        walks = pool.map(
            lambda it: _walk_one(
                it[1],
                excludes[it[1].name],
                min_size,
                objects,
                link,
                extents,
                sizes,
                state,
                spill,
                it[0],
            ),
            enumerate(trees),
        )
        for tree, w in zip(trees, walks, strict=True):
            for msg in w.errors:
                log.warning("%s", msg)
            out.errors += len(w.errors)
            out.leftovers += w.leftovers
            out.sizes.update(w.sizes)
            over = state.over  # once: a walker may set it meanwhile
            if over and out.complete:  # a walker found one guest too many
                out.complete = False
                inodes.clear()
                out.private.clear()
            if not over:
                for rel, rec in w.found:
                    _add(inodes, tree, rel, rec)
                for rel, rec in w.private:
                    _add(out.private, tree, rel, rec)
                if budget is not None and len(inodes) + len(out.private) > budget:
                    state.over = True  # the walkers keep counting, no more
                    out.complete = False
                    inodes.clear()
                    out.private.clear()
                    if spill is not None:
                        spill.start()
            out.files[tree.name] = w.count
            out.files_scanned += w.count
            if tick is not None:
                tick(out.files_scanned, 0)
    if spill is not None:
        if state.over:
            spill.start()
        else:
            spill.close()  # the walk kept everything: nothing to read back
    if objects is not None and not state.over:
        for rec in objects.values():
            if rec.names:
                inodes.setdefault((rec.dev, rec.ino), rec)
    for key in inodes.keys() & out.private.keys():
        del out.private[key]  # one name may be hardlinked: that decides for the inode
    return out


def from_spill(
    spill: Spill,
    trees: list[GuestTree],
    sizes: tuple[int, int],
    objects: Mapping[int, InodeRec],
) -> Scan:
    """One pass's inodes, as a walk limited to ``sizes`` would find them, from the first
    walk's ``spill`` and its ``objects`` (the records that walk gave store objects' names)."""
    out = Scan()
    lo, hi = sizes
    for tree, rel, rec in spill.read(trees, lo, hi):
        _add(out.inodes, tree, rel, rec)
    for rec in objects.values():
        if rec.names and lo <= rec.size < hi:
            out.inodes.setdefault((rec.dev, rec.ino), rec)
    return out
