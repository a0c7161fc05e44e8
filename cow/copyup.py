"""Copy-up: a guest's own copy of a shared inode, made before it writes, and the kernel told.

A write never reaches a shared inode.  Opening one for writing, truncating it, or changing
its metadata or xattrs first gives the writing guest's name a private copy
(``vsstore.private.privatize``: copy, fsync, swap atomically); the guest's other names of
the inode follow it (``relink``: link, swap, check).  The kernel's entry for each name is
invalidated, so the next lookup finds the copy, and the shared node's attributes (its link
count) are refreshed for every guest that caches them.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading

import pyfuse3

from vsstore import attrs, syscalls
from vsstore.names import shown
from vsstore.private import privatize, tmp_name
from vsstore.window import unsealed

from .callers import Callers
from .nodes import Name, Node, Nodes, Trees, fuse_error, lstat, open_name_dir

log = logging.getLogger("vsstore.cow")


class KernelCache:
    """Tells the kernel what the daemon changed behind its back, once there is a session
    (``mounted``; the in-process tests run without one)."""

    def __init__(self) -> None:
        self.mounted = False  # set by the daemon once the FUSE session is up
        # node ids whose attributes (False) or attributes and listing (True) changed
        self._stale: queue.SimpleQueue[tuple[int, bool]] | None = None

    def forget_entry(self, parent: int, base: str) -> None:
        """The kernel's entry ``base`` in directory node ``parent`` is out of date."""
        if self.mounted:
            pyfuse3.invalidate_entry_async(parent, os.fsencode(base))

    def forget_attrs(self, nid: int, listing: bool = False) -> None:
        """Make the kernel ask again for node ``nid``'s attributes (``listing``: and, for
        a directory, its entries, which it caches).  Sent from a thread of its own, after
        the current request is answered: a notification written while the kernel waits
        on this loop could wait on the loop itself."""
        if not self.mounted:
            return
        if self._stale is None:
            self._stale = queue.SimpleQueue()
            threading.Thread(
                target=self._notify_attrs, args=(self._stale,), daemon=True, name="vscow-inval"
            ).start()
        self._stale.put((nid, listing))

    @staticmethod
    def _notify_attrs(stale: queue.SimpleQueue[tuple[int, bool]]) -> None:
        while True:
            nid, listing = stale.get()
            if nid < 0:
                return
            try:
                pyfuse3.invalidate_inode(nid, attr_only=not listing)
            except (OSError, RuntimeError) as e:  # forgotten meanwhile, or unmounted
                log.debug("invalidate attributes of node %d: %s", nid, e)

    def close(self) -> None:
        if self._stale is not None:
            self._stale.put((-1, False))


class CopyUp:
    """Copy-up for the overlay: which writes need one, whose name gets it, making it."""

    def __init__(
        self, trees: Trees, nodes: Nodes, callers: Callers, kernel: KernelCache, immutable: bool
    ) -> None:
        self.trees, self.nodes, self.callers, self.kernel = trees, nodes, callers, kernel
        self.immutable = immutable

    def needed(self, node: Node, name: Name, st: os.stat_result) -> bool:
        """Does a write to this inode (reached as ``name``, with stat ``st``) need a copy-up
        first?"""
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_nlink > 1
            and (len({g for g, _ in node.names}) > 1 or self._marked(name))
        )

    def _marked(self, name: Name) -> bool:
        try:
            fd = self.trees[name[0]].open_regular(name[1])
        except OSError:
            return False
        try:
            return attrs.has_marker(fd)
        finally:
            os.close(fd)

    def name_to_change(
        self, ctx: pyfuse3.RequestContext, node: Node, found: tuple[Name, os.stat_result] | None
    ) -> tuple[Name, bool]:
        """The name through which the caller changes ``node``, given the name ``found``
        to hold it (None: no name does any more).  A shared inode (or one no name holds):
        the caller's own name, copied up first if it still holds the inode; returns it
        and True (the kernel's inode for the request is the shared one).  Else ``found``'s
        name, once the caller may change that guest's tree, and False."""
        if found is None or self.needed(node, *found):
            return self.writable_name(ctx, node), True
        self.callers.check(ctx, found[0][0])
        return found[0], False

    def writable_name(self, ctx: pyfuse3.RequestContext, node: Node) -> Name:
        """The caller's own name for writing to ``node``: copied up first if it still
        holds the shared inode (else it was copied up before; the kernel still holds the
        shared inode)."""
        name = self.callers.name_of(ctx, node)
        if name in node.names:
            st = lstat(self.trees, name)
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                self.copy_up(node, name)
                return name
            del node.names[name]
        return name

    def copy_up(self, node: Node, name: Name) -> os.stat_result:
        """Give ``name`` its own copy of ``node``'s inode; returns the copy's stat."""
        guest, rel = name
        tree = self.trees[guest]
        head, _, base = rel.rpartition("/")
        dfd = open_name_dir(self.trees, (guest, head))
        try:
            ofd = tree.open_regular(base, dirfd=dfd)
            try:
                cst = privatize(str(tree.root), head, dfd, base, ofd, None, self.immutable)
                node.st = os.fstat(ofd)  # answers for it once no guest's name holds it
                stored = attrs.has_marker(ofd)  # a store object: one link is the store's
            finally:
                os.close(ofd)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(dfd)
        if cst is None:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        log.info("copy-up %s:/%s (inode %d -> %d)", guest, shown(rel), node.ino, cst.st_ino)
        node.names.pop(name, None)
        copy = self.nodes.node(cst, name)
        self._invalidate((guest, head), base)
        self.kernel.forget_attrs(node.id)  # one link fewer, for every guest that caches it
        # The guest's other names of the shared inode were one file for it: they follow.
        others = [n for n in node.names if n[0] == guest]
        moved = sum(self.relink(node, other, name, copy) for other in others)
        self.nodes.let_go(node, name, node.st.st_nlink - stored - moved)  # guest names left
        return cst

    def relink(self, node: Node, other: Name, copied: Name, copy: Node) -> bool:
        """Point ``other`` (a name of ``node`` in the same guest) at the copy made for
        ``copied``: link, swap, check, as for every replacement.  True once it does."""
        guest, rel = other
        tree = self.trees[guest]
        head, _, base = rel.rpartition("/")
        chead, _, cbase = copied[1].rpartition("/")
        dfd, cdfd = (
            open_name_dir(self.trees, (guest, head)),
            open_name_dir(self.trees, (guest, chead)),
        )
        moved = False
        try:
            ofd = tree.open_regular(base, dirfd=dfd)
            try:
                if (os.fstat(ofd).st_dev, os.fstat(ofd).st_ino) != (node.dev, node.ino):
                    return False
                t = tmp_name()
                os.link(cbase, t, src_dir_fd=cdfd, dst_dir_fd=dfd, follow_symlinks=False)
                with unsealed(ofd, self.immutable, what=self.trees[guest].where(rel)):
                    syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    if os.stat(t, dir_fd=dfd, follow_symlinks=False).st_ino != node.ino:
                        syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    else:
                        node.names.pop(other, None)
                        copy.names[other] = None
                        moved = True
                    os.unlink(t, dir_fd=dfd)
            finally:
                os.close(ofd)
        except OSError as e:
            log.warning(
                "%s:/%s: could not follow its hardlink's copy-up: %s", guest, shown(rel), e.strerror
            )
        finally:
            os.close(dfd)
            os.close(cdfd)
        self._invalidate((guest, head), base)
        return moved

    def _invalidate(self, parent: Name, base: str) -> None:
        """The kernel's entry for ``base`` in directory ``parent`` (if it knows the
        directory) now leads elsewhere."""
        if not self.kernel.mounted:
            return
        node = self.nodes.find(lstat(self.trees, parent))
        if node is not None:
            self.kernel.forget_entry(node.id, base)
