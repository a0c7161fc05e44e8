"""The extent phase of a run: what hardlinks must leave alone shares its blocks instead.

After the hardlink phase, where the store's filesystem shares extents (XFS with reflink,
btrfs: ``vsstore.extents.probe``), the files an exclude keeps private (but no '=' rule) and
the duplicates whose metadata differ are grouped by size and content digest together with
the store's objects.  In each group one file is the source (a store object when there is
one: sealed, it cannot change) and the kernel shares its blocks with every other member
whose bytes it finds identical (FIDEDUPERANGE compares under its own locks, so the digest
only proposes and a guest writing meanwhile loses nothing).  Members keep their inodes,
metadata and write access; a later write gets new blocks.  A member is opened read-only
(root may dedupe into a file it does not write), so nothing of it changes: no mtime, no
ctime (measured in t2_extents).

The index's ``extent`` table remembers each cluster (the files that share one source's
blocks), so an unchanged re-run asks the kernel nothing, and a changed file (its stat) is
shared again.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from vsstore import extents, syscalls
from vsstore.index import ExtentRow, Index
from vsstore.store import Store, StoreObject

from .apply import point
from .scan import InodeRec

if TYPE_CHECKING:
    from .engine import Summary

log = logging.getLogger("vsstore")


class Reflink(Enum):
    """What a run does with extents: ``AUTO`` shares them where the filesystem can (the
    default), ``OFF`` never (``--no-reflink``), ``ONLY`` shares extents and links nothing
    (``--reflink-only``; an error where the filesystem cannot)."""

    AUTO = "auto"
    OFF = "off"
    ONLY = "only"


FLUSH_ROWS = 512  # extent rows kept before they are written to the index
BATCH = 64  # destinations held open per call (the kernel takes up to extents.MAX_DESTS)
# The kernel refusing one destination for a reason of its own: left alone, no error.
_LEAVE = (errno.EPERM, errno.ETXTBSY, errno.EBUSY, errno.EINVAL, errno.EACCES)
_FOREIGN_FLAGS = syscalls.FS_IMMUTABLE_FL | syscalls.FS_APPEND_FL


def unavailable(store: Store) -> str | None:
    """Why the store's filesystem cannot share extents, or None if it can."""
    if store.fd >= 0:
        return extents.probe(store.fd)
    parent = next(p for p in Path(store.path).parents if p.exists())  # a dry run's store
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return extents.probe(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class _Member:
    dev: int
    ino: int
    size: int
    rec: InodeRec | None  # a guest's inode ...
    obj: StoreObject | None  # ... or a store object
    cluster: int | None  # from its index row, while that is valid


def _placed(fd: int) -> list[tuple[int, int, int]] | None:
    """Where the file's data lies (logical, physical, length per extent), if every extent
    has a place on the device and is shared; None otherwise (then it must be compared)."""
    try:
        got = extents.extents(fd)
    except OSError:
        return None
    if not got or not all(e.located and e.shared for e in got):
        return None
    return [(e.logical, e.physical, e.length) for e in got]


class Sharer:
    """Shares the extents of one group at a time; the index rows follow at ``finish``.
    ``stats``: the run's Summary (files_deduped, bytes_deduped, errors, messages)."""

    def __init__(self, store: Store, index: Index, stats: Summary, dry_run: bool) -> None:
        self.store, self.index, self.stats, self.dry_run = store, index, stats, dry_run
        self._rows: dict[int, dict[int, ExtentRow]] = {}
        self.new_rows: list[tuple[int, int, int, int, int, int]] = []

    def _row(self, dev: int, ino: int) -> ExtentRow | None:
        rows = self._rows.get(dev)
        if rows is None:
            rows = self._rows[dev] = self.index.load_extents(dev)
        return rows.get(ino)

    def _cluster(self, dev: int, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> int | None:
        r = self._row(dev, ino)
        if r is not None and (r.size, r.mtime_ns, r.ctime_ns) == (size, mtime_ns, ctime_ns):
            return r.cluster
        return None

    def share(self, recs: list[InodeRec], objs: list[StoreObject]) -> None:
        """One group: guest inodes ``recs`` and store objects ``objs`` of one size and
        digest.  The cluster with the most members already shared stays; every other
        member is shared with one of it."""
        members = [
            _Member(
                r.dev,
                r.ino,
                r.size,
                r,
                None,
                self._cluster(r.dev, r.ino, r.size, r.mtime_ns, r.ctime_ns),
            )
            for r in recs
        ]
        for o in objs:
            c = (
                self._cluster(self.store.dev, o.ino, o.size, *o.stamp)
                if o.stamp is not None
                else None
            )
            members.append(_Member(self.store.dev, o.ino, o.size, None, o, c))
        if len(members) < 2:
            return
        counts: dict[int, int] = {}
        for m in members:
            if m.cluster is not None:
                counts[m.cluster] = counts.get(m.cluster, 0) + 1
        cluster = max(counts, key=lambda c: counts[c]) if counts else None
        inside = [m for m in members if cluster is not None and m.cluster == cluster]
        # The source: an object of the cluster, a member of it, any object, the first file.
        ranked = sorted(inside, key=lambda m: m.obj is None) or sorted(
            members, key=lambda m: m.obj is None
        )
        # Objects are sealed: never a destination (nor worth opening as one).
        ids = {id(m) for m in inside}
        dests = [m for m in members if id(m) not in ids and m.obj is None]
        for src in ranked:
            if self._share_from(src, [m for m in dests if m is not src], cluster):
                break
        if len(self.new_rows) >= FLUSH_ROWS:
            self.finish()  # what is shared stays remembered if the run is killed later

    def _share_from(self, src: _Member, dests: list[_Member], cluster: int | None) -> bool:
        """Share ``dests`` with ``src``; False if ``src`` cannot be opened as it was seen."""
        if not dests:
            return True
        if self.dry_run:
            self.stats.files_deduped += len(dests)
            self.stats.bytes_deduped += sum(m.size for m in dests)
            return True
        sfd = self._open(src)
        if sfd is None:
            return False
        try:
            cid = cluster if cluster is not None else src.ino
            if src.cluster != cid:
                self._remember(src, sfd, cid)
            where = _placed(sfd)
            for start in range(0, len(dests), BATCH):
                self._batch(sfd, dests[start : start + BATCH], cid, where)
        finally:
            os.close(sfd)
        return True

    def _batch(
        self, sfd: int, dests: list[_Member], cid: int, where: list[tuple[int, int, int]] | None
    ) -> None:
        opened: list[tuple[_Member, int]] = []
        try:
            for m in dests:
                fd = self._open(m, dest=True)
                if fd is None:
                    continue
                if (
                    where is not None
                    and _placed(fd) == where
                    and m.rec is not None
                    and m.rec.same_stat(os.fstat(fd))  # nobody wrote it meanwhile
                ):
                    # Already the source's blocks (a reflink copy, an earlier dedupe): the
                    # kernel would read both to compare for nothing; remembered as shared.
                    self._remember(m, fd, cid)
                    os.close(fd)
                    continue
                opened.append((m, fd))
            if not opened:
                return
            point("dedupe", paths=[m.rec.names[0] for m, _ in opened if m.rec is not None])
            try:
                outcomes = extents.dedupe(sfd, [fd for _, fd in opened], opened[0][0].size)
            except OSError as e:
                self._error(f"extent sharing: {e.strerror or e}", opened[0][0])
                return
            for (m, fd), out in zip(opened, outcomes, strict=True):
                if out.whole and out.shared == m.size:
                    self.stats.files_deduped += 1
                    self.stats.bytes_deduped += m.size
                    self._remember(m, fd, cid)
                elif out.error and out.error not in _LEAVE:
                    self._error(f"extent sharing: {os.strerror(out.error)}", m)
                # differs: changed since it was hashed (or a digest collision): left alone
        finally:
            for _, fd in opened:
                os.close(fd)

    def _open(self, m: _Member, dest: bool = False) -> int | None:
        """The member opened read-only, if it is still the file that was hashed (a
        destination also without foreign flags: immutable, append-only); else None."""
        try:
            if m.obj is not None:
                if dest:
                    return None  # sealed: never a destination
                fd = self.store.open_object(m.obj)
            else:
                assert m.rec is not None
                tree, rel = m.rec.names[0]
                try:
                    fd = tree.open_regular(
                        rel, expect=(m.dev, m.ino), flags=os.O_RDONLY | os.O_NOATIME
                    )
                except PermissionError:  # O_NOATIME: only for the owner or CAP_FOWNER
                    fd = tree.open_regular(rel, expect=(m.dev, m.ino))
        except OSError:
            return None  # gone or replaced: the next run sees it as it is then
        st = os.fstat(fd)
        ok = (st.st_dev, st.st_ino, st.st_size) == (m.dev, m.ino, m.size)
        if ok and m.rec is not None:
            ok = m.rec.same_stat(st)
        if ok and dest:
            ok = not syscalls.get_inode_flags(fd) & _FOREIGN_FLAGS
        if not ok:
            os.close(fd)
            return None
        return fd

    def _remember(self, m: _Member, fd: int, cid: int) -> None:
        st = os.fstat(fd)
        self.new_rows.append(
            (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, cid)
        )

    def _error(self, what: str, m: _Member) -> None:
        where = m.rec.names[0][0].where(m.rec.names[0][1]) if m.rec is not None else "store"
        msg = f"{where}: skipped: {what}"
        self.stats.errors += 1
        self.stats.messages.append(msg)
        log.warning("%s", msg)

    def finish(self) -> None:
        if self.new_rows and not self.dry_run:
            self.index.store_extents(self.new_rows)
        self.new_rows = []
