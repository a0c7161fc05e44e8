"""deunify (give a guest private copies again) and gc (drop objects nobody links)."""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass, field

from vsstore import attrs
from vsstore.errors import NOSPACE_ERRNOS, NoSpaceError
from vsstore.index import Index
from vsstore.names import shown
from vsstore.private import privatize
from vsstore.safetree import GuestTree, split_rel
from vsstore.store import Store
from vsstore.window import unsealed

from .progress import Progress

log = logging.getLogger("vsstore")


@dataclass(slots=True)
class Tally:
    files: int = 0
    bytes: int = 0
    errors: int = 0
    messages: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        self.messages.append(msg)
        log.warning("%s", msg)


def deunify(
    tree: GuestTree,
    paths: list[str],
    index: Index,
    immutable: bool,
    progress: Progress | None = None,
) -> Tally:
    """Replace every shared (iunlink-marked) file under ``paths`` (default: the whole guest)
    by a private copy with the same content and metadata, atomically: copy to a temporary
    name, fsync, swap with the name, check that the swap moved out the shared inode.
    ``progress``: the files and bytes made private so far, redrawn as the walk goes."""
    tally = Tally()
    prog = progress or Progress(False)
    prog.phase(f"deunify {shown(tree.name)}: made private")
    starts = [p.strip("/") for p in paths] or [""]
    for start in starts:
        if start:
            try:
                fd = tree.open_beneath(start, os.O_PATH)
            except OSError as e:
                tally.error(f"{tree.where(start)}: {e.strerror}")
                continue
            st = os.fstat(fd)
            os.close(fd)
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    _deunify_one(tree, start, st, index, immutable, tally)
                continue
            if not stat.S_ISDIR(st.st_mode):
                tally.error(f"{tree.where(start)}: not a regular file or directory")
                continue
        for rel, st in tree.walk(
            start=start, on_error=lambda r, e: tally.error(f"{tree.where(r)}: {e.strerror or e}")
        ):
            if st.st_nlink > 1:
                _deunify_one(tree, rel, st, index, immutable, tally)
            prog.update(tally.files, tally.bytes)
    prog.done()
    return tally


def _deunify_one(
    tree: GuestTree, rel: str, st: os.stat_result, index: Index, immutable: bool, tally: Tally
) -> None:
    where = tree.where(rel)
    try:
        dfd, base = tree.open_parent(rel)
    except OSError as e:
        tally.error(f"{where}: {e.strerror}")
        return
    try:
        ofd = tree.open_regular(base, expect=(st.st_dev, st.st_ino), dirfd=dfd)
    except OSError as e:
        os.close(dfd)
        if e.errno not in (errno.ENOENT, errno.ESTALE):
            tally.error(f"{where}: {e.strerror}")
        return
    try:
        if not attrs.has_marker(ofd):
            return  # not shared by us (a guest's own hardlink): leave it
        if privatize(str(tree.root), split_rel(rel)[0], dfd, base, ofd, index, immutable) is None:
            tally.error(f"{where}: replaced while we copied it; left as it is")
        else:
            tally.files += 1
            tally.bytes += st.st_size
    except OSError as e:
        if e.errno in NOSPACE_ERRNOS:  # every further copy would fail too: stop here
            raise NoSpaceError.on(
                tree.root,
                f"a private copy of {where}",
                f"{tally.files} files were made private before it",
            ) from None
        tally.error(f"{where}: {e.strerror}")
    finally:
        os.close(ofd)
        os.close(dfd)


def gc(store: Store, immutable: bool, dry_run: bool = False) -> Tally:
    """Remove store objects whose only name is the store's own."""
    tally = Tally()
    for objs in store.scan().values():
        for obj in objs:
            if obj.nlink != 1:
                continue
            try:
                fd = store.open_object(obj)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    tally.error(f"store object {obj.name}: {e.strerror}")
                continue
            try:
                if os.fstat(fd).st_nlink != 1:
                    continue  # linked again meanwhile
                tally.files += 1
                tally.bytes += obj.size
                if not dry_run:
                    with unsealed(fd, what=f"store object {obj.name}"):
                        store.unlink(obj)
            except OSError as e:
                tally.error(f"store object {obj.name}: {e.strerror}")
            finally:
                os.close(fd)
    return tally
