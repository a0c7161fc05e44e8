"""The cow overlay's filesystem: the pyfuse3 Operations over the guests' own trees.

One mount serves every guest: its root lists the guests, ``/NAME`` is guest NAME's tree.
This module is the thin layer the kernel's requests arrive at; the work is done by its
collaborators: the node table (``nodes.py``: node ids from backing inodes, so a shared
inode is one FUSE inode and one page cache; the names each was reached by), caller
attribution (``callers.py``: which guest a request comes from, by the pid namespace the
lifecycle attached, never by a path) and copy-up (``copyup.py``: a write never reaches a
shared inode; the writing guest's name gets its own copy first, opened ``direct_io`` so the
shared inode's page cache never sees its data, and the kernel is told).

All backing access goes through ``GuestTree`` (no symlink followed, no mount crossed).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple, ParamSpec, TypeVar

import pyfuse3

from vsstore import attrs, syscalls
from vsstore.attrs import is_ours
from vsstore.safetree import GuestTree
from vsstore.window import unsealed

from .callers import Callers
from .copyup import CopyUp, KernelCache
from .nodes import ROOT, Name, Node, Nodes, fuse_error, join, link_target, lstat, open_name_dir

log = logging.getLogger("vsstore.cow")
P = ParamSpec("P")
T = TypeVar("T")


def _guarded(handler: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """A request handler that can fail only with a FUSEError.  pyfuse3 ends its main loop
    (and so the mount of every guest) on any other exception: an OSError becomes its errno,
    anything else is logged and becomes EIO."""

    @functools.wraps(handler)
    async def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s failed", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return run


def _only_size(fields: pyfuse3.SetattrFields) -> bool:
    return fields.update_size and not (
        fields.update_mode
        or fields.update_uid
        or fields.update_gid
        or fields.update_atime
        or fields.update_mtime
    )


_DEVICES = (stat.S_IFCHR, stat.S_IFBLK)
# Our pyfuse3 (patched by scripts/pyfuse3/build.sh) lets opendir answer ENOSYS: the kernel
# then sends no opendir or releasedir again, caches every directory's entries
# (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR; a change through the overlay, a new mtime or our
# invalidation drops them) and hands readdir the directory's inode.  On a stock pyfuse3
# every listing is read through us, opendir to releasedir.
NO_OPENDIR = hasattr(pyfuse3, "no_opendir")
LISTINGS_KEPT = 64  # directories whose entries are kept for a readdir that goes on
_NODE_KINDS = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFREG, *_DEVICES)


def _asked(mode: int, ctx: pyfuse3.RequestContext) -> int:
    """The permission bits a new node gets: the mode the request carries with the caller's
    umask applied (the kernel may have applied it already; again is harmless), never the
    daemon's own umask."""
    return mode & 0o7777 & ~ctx.umask


@contextmanager
def _made_by(ctx: pyfuse3.RequestContext) -> Iterator[None]:
    """Nodes made in the block belong to the caller from their birth (the thread's
    filesystem ids are the caller's), with exactly the mode asked (no daemon umask): no
    chown or chmod by name follows, where a guest process working on the tree directly
    could have put a file of its own (a set-id one) under the name meanwhile."""
    old = os.umask(0)
    try:
        with syscalls.fs_ids(ctx.uid, ctx.gid):
            yield
    finally:
        os.umask(old)


class _Target(NamedTuple):
    """The inode a setattr changes, held by an O_PATH descriptor (checked to be the inode
    asked for, where that is known): a name the guest swaps meanwhile changes nothing."""

    fd: int
    st: os.stat_result

    @property
    def path(self) -> str:
        """The inode itself (the magic link of its descriptor, never followed further)."""
        return f"/proc/self/fd/{self.fd}"

    def call(self, fn: Callable[..., None], *args: Any, **kw: Any) -> None:
        """``fn`` (os.chmod, os.chown, os.utime) on the inode."""
        fn(self.path, *args, **kw)


class CowFS(pyfuse3.Operations):
    """The overlay.  ``guests`` maps a name to its root tree."""

    supports_dot_lookup = False
    # The daemon is the only writer through the mount, so the kernel may keep what it
    # learns for long; where the daemon changes something behind the kernel (copy-up,
    # add/remove) it invalidates.  Shared files get no entry caching at all: every path
    # walk to them must come through lookup, which tells the writing guest.
    ENTRY_TIMEOUT = 3600.0
    ATTR_TIMEOUT = 3600.0
    enable_writeback_cache = False
    enable_symlink_cache = True  # our pyfuse3 asks for FUSE_CAP_CACHE_SYMLINKS (nodes.py)

    def __init__(
        self,
        guests: dict[str, str],
        immutable: bool = True,
    ) -> None:
        super().__init__()
        self.trees: dict[str, GuestTree] = {}  # shared with the collaborators
        self.immutable = immutable
        self.nodes = Nodes(self.trees)
        self.callers = Callers(self.trees)
        self.kernel = KernelCache()
        self.copyup = CopyUp(self.trees, self.nodes, self.callers, self.kernel, immutable)
        self.dir_handles: dict[int, int] = {}  # opendir's handles: their directory nodes
        # the entries of the directories listed last, by node (readdir goes on at offsets)
        self.listings: dict[int, tuple[Name, list[tuple[str, os.stat_result]]]] = {}
        self.copy_handles: set[int] = set()  # open on a copy, reached through a shared node
        self.handle_node: dict[int, Node] = {}  # open handle -> the node it is open on
        self.next_dh = 1
        self.root_st = os.stat("/")
        for name, root in guests.items():
            self.add_guest(name, root)

    @property
    def mounted(self) -> bool:
        """Set by the daemon once the FUSE session is up: from then on the kernel is told
        what changes behind it."""
        return self.kernel.mounted

    @mounted.setter
    def mounted(self, value: bool) -> None:
        self.kernel.mounted = value

    # -- guests ----------------------------------------------------------------------

    def add_guest(self, name: str, root: str) -> None:
        if name in self.trees or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"guest name {name!r} is taken or not valid")
        self.trees[name] = GuestTree(root, name)
        self._root_changed(name)

    def attach(self, name: str, nsfd: int) -> None:
        """Processes in the pid namespace ``nsfd`` (or in one nested in it) are guest
        ``name``'s: they write to its names only.  Takes ``nsfd`` over."""
        self.callers.attach(name, nsfd)

    def remove_guest(self, name: str) -> None:
        tree = self.trees.pop(name, None)
        if tree is None:
            raise ValueError(f"no guest {name!r} in this overlay")
        self.callers.detach(name)
        self.nodes.drop_guest(name)
        self.listings.clear()  # its directories' nodes are gone
        tree.close()
        self._root_changed(name)

    def _root_changed(self, name: str) -> None:
        """Make the kernel forget what it knows of the root listing and of ``name``."""
        self.kernel.forget_attrs(ROOT, listing=True)  # the kernel caches the list of guests
        try:  # asynchronous: the synchronous call would wait on this very loop
            self.kernel.forget_entry(ROOT, name)  # nothing cached before the mount
        except (OSError, RuntimeError):
            pass  # not mounted (tests of the bare operations) or nothing cached

    def close(self) -> None:
        self.kernel.close()
        self.callers.close()
        for t in self.trees.values():
            t.close()
        self.trees.clear()

    # -- attributes ----------------------------------------------------------------------

    def _attr(
        self,
        node_id: int,
        st: os.stat_result,
        shared: bool = False,
    ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node_id
        a.generation = 0
        a.entry_timeout = 0 if shared else self.ENTRY_TIMEOUT
        a.attr_timeout = self.ATTR_TIMEOUT
        a.st_mode = st.st_mode
        a.st_nlink = st.st_nlink
        a.st_uid = st.st_uid
        a.st_gid = st.st_gid
        a.st_rdev = st.st_rdev
        a.st_size = st.st_size
        a.st_atime_ns = st.st_atime_ns
        a.st_mtime_ns = st.st_mtime_ns
        a.st_ctime_ns = st.st_ctime_ns
        a.st_blksize = 4096
        a.st_blocks = st.st_blocks
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = self._attr(ROOT, self.root_st)
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.trees)
        return a

    # -- lookups and attributes -----------------------------------------------------------

    async def lookup(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        dfd = -1
        if parent_inode == ROOT:
            if n not in self.trees:
                raise pyfuse3.FUSEError(errno.ENOENT)
            child: Name = (n, "")
        else:
            if n in (".", ".."):
                raise pyfuse3.FUSEError(errno.ENOENT)
            (g, rel), dfd = self.nodes.open_dir(parent_inode)
            child = (g, join(rel, n))
        if dfd < 0:
            st = lstat(self.trees, child)
        else:
            try:
                st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                raise fuse_error(e) from None
            finally:
                os.close(dfd)
        node = self.nodes.node(st, child)
        node.lookups += 1
        node.st = st
        shared = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
        if shared:
            self.callers.looked_up(ctx.pid, node, child)
        return self._attr(node.id, st, shared)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for nid, n in inode_list:
            if self.nodes.forget(nid, n):
                self.callers.forget(nid)
                self.listings.pop(nid, None)

    async def getattr(
        self,
        inode: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attr()
        node = self.nodes.get(inode)
        fh = next(iter(node.fhs), None)  # open on this very inode (asked around every write):
        if fh is not None:  # no path walk, and it holds after the last name is gone
            try:
                node.st = os.fstat(fh)
                return self._attr(inode, node.st)
            except OSError:
                pass
        try:
            return self._attr(inode, self.nodes.resolve(node)[1])
        except pyfuse3.FUSEError:
            # No name holds the inode any more: every guest copied this shared inode up
            # while the kernel still holds it (its open files write to the copies): its
            # last known attributes.
            if node.st is None:
                raise
            return self._attr(inode, node.st)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        if fh is not None and _only_size(fields):
            return self._truncate_open(node, fh, attr.st_size)
        found = self.nodes.resolve(node) if node.names else None
        name, copied = self.copyup.name_to_change(ctx, node, found)
        # Not copied: the name held the node's inode just now, and must still (else
        # ESTALE); a copy (made now or before) is whatever the caller's name holds.
        t = self._target(name, None if copied else (node.dev, node.ino))
        try:
            st = self._change(name[0], t, attr, fields, fh)
        finally:
            os.close(t.fd)
        if copied:
            # The kernel applies the answer to ``inode``, the shared inode every guest
            # sees: it gets the shared inode's attributes; the caller's name now leads
            # to the changed copy (its entry was invalidated).
            return self._shared_attr(node)
        return self._attr(inode, st)

    def _change(
        self,
        guest: str,
        t: _Target,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
    ) -> os.stat_result:
        """What a setattr asks of inode ``t``, one change at a time: size, owner, mode
        (exactly as asked), times; returns its stat afterwards."""
        try:
            if fields.update_size:
                self._set_size(t, fh, attr.st_size)
            if fields.update_uid or fields.update_gid:  # first: a chown clears set-id bits
                self._set_owner(t, attr, fields)
            if fields.update_mode:
                self._set_mode(t, attr.st_mode)
            if fields.update_atime or fields.update_mtime:
                self._set_times(t, attr, fields)
            return os.fstat(t.fd)
        except OSError as e:
            raise fuse_error(e) from None

    def _truncate_open(self, node: Node, fh: int, size: int) -> pyfuse3.EntryAttributes:
        """ftruncate on an open file: the handle already is the right file (a copy, when
        its open copied up: then the kernel's inode is the shared one)."""
        try:
            os.ftruncate(fh, size)
            if fh in self.copy_handles:
                return self._shared_attr(node)
            return self._attr(node.id, os.fstat(fh))
        except OSError as e:
            raise fuse_error(e) from None

    def _target(self, name: Name, expect: tuple[int, int] | None = None) -> _Target:
        """The inode ``name`` holds, opened without following it (O_PATH: a symlink is its
        own inode; a guest's root: its own descriptor); ESTALE unless it is the inode
        ``expect``ed.  Opened from its directory, not by the whole path below the root,
        which may be longer than PATH_MAX (pjdfstest's */03.t)."""
        guest, rel = name
        try:
            if rel:
                head, _, base = rel.rpartition("/")
                dfd = open_name_dir(self.trees, (guest, head))
                try:
                    fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                finally:
                    os.close(dfd)
            else:
                fd = os.dup(self.trees[guest].fd)
        except OSError as e:
            raise fuse_error(e) from None
        st = os.fstat(fd)
        if expect is not None and (st.st_dev, st.st_ino) != expect:
            os.close(fd)
            log.debug("%s:/%s: replaced since it was found", guest, rel)
            raise pyfuse3.FUSEError(errno.ESTALE)
        return _Target(fd, st)

    @staticmethod
    def _set_size(t: _Target, fh: int | None, size: int) -> None:
        """truncate: through the caller's handle if it gave one, else the inode reopened
        for writing (a regular file only)."""
        if fh is not None:
            os.ftruncate(fh, size)
            return
        if stat.S_ISDIR(t.st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not stat.S_ISREG(t.st.st_mode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        fd = os.open(t.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    @staticmethod
    def _set_mode(t: _Target, mode: int) -> None:
        if stat.S_ISLNK(t.st.st_mode):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # Linux has no mode of a symlink
        t.call(os.chmod, stat.S_IMODE(mode))

    @staticmethod
    def _set_owner(
        t: _Target, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        t.call(
            os.chown,
            attr.st_uid if fields.update_uid else -1,
            attr.st_gid if fields.update_gid else -1,
        )

    @staticmethod
    def _set_times(
        t: _Target, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        """utimes: a time not given stays as the inode has it now."""
        cur = os.fstat(t.fd)
        t.call(
            os.utime,
            ns=(
                attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns,
            ),
        )

    def _shared_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a shared node after a copy-up: its own inode's, as far as a name
        still holds it, else the last seen."""
        try:
            return self._attr(node.id, self.nodes.resolve(node)[1], True)
        except pyfuse3.FUSEError:
            if node.st is None:
                raise
            return self._attr(node.id, node.st, True)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        """The node's own target (the kernel keeps it for as long as it holds the node),
        read through a descriptor of its inode; ESTALE once no name holds it."""
        node = self.nodes.get(inode)
        for name in list(node.names):
            target = link_target(self.trees, name, (node.dev, node.ino))
            if target is not None:
                node.target = target
                return target
            node.names.pop(name, None)  # holds another inode now (or none): not this node's
        raise pyfuse3.FUSEError(errno.ESTALE)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        tree = next(iter(self.trees.values()), None)
        s = os.statvfs(tree.fd) if tree else os.statvfs("/")  # by fd: the path may have moved
        d = pyfuse3.StatvfsData()
        for f in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(d, f, getattr(s, f))
        return d

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """ENOSYS with our pyfuse3 (NO_OPENDIR: the kernel caches listings, and readdir
        gets the inode), else a handle whose entries are read at the first readdir."""
        if NO_OPENDIR:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self.next_dh
        self.next_dh += 1
        self.dir_handles[fh] = inode
        return fh

    def _entries(self, inode: int, again: bool) -> tuple[Name, list[tuple[str, os.stat_result]]]:
        """Directory node ``inode``'s name and entries (sorted, so offsets are stable), read
        anew when ``again`` (a listing from its start) or not kept from its start."""
        kept = self.listings.get(inode)
        if kept is not None and not again:
            return kept
        if inode == ROOT:
            name: Name = ("", "")
            entries = [(g, os.fstat(t.fd)) for g, t in sorted(self.trees.items())]
        else:
            name, dfd = self.nodes.open_dir(inode)
            entries = []
            try:
                with os.scandir(dfd) as it:
                    for e in it:
                        try:
                            entries.append((e.name, e.stat(follow_symlinks=False)))
                        except OSError:
                            continue
            finally:
                os.close(dfd)
            entries.sort()
        self.listings.pop(inode, None)
        self.listings[inode] = (name, entries)
        while len(self.listings) > LISTINGS_KEPT:
            del self.listings[next(iter(self.listings))]
        return name, entries

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode = fh if NO_OPENDIR else self.dir_handles[fh]
        name, entries = self._entries(inode, start_id == 0)
        for i in range(start_id, len(entries)):
            n, st = entries[i]
            child: Name = (n, "") if not name[0] else (name[0], join(name[1], n))
            node = self.nodes.node(st, child)
            shared = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
            if not pyfuse3.readdir_reply(
                token, os.fsencode(n), self._attr(node.id, st, shared), i + 1
            ):
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        perm = _asked(mode, ctx) & 0o1777  # mkdir takes no set-id bits (setgid: inherited)
        return await self._make(parent_inode, name, ctx, lambda n, d: os.mkdir(n, perm, dir_fd=d))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return await self._make(
            parent_inode, name, ctx, lambda n, d: os.symlink(os.fsdecode(target), n, dir_fd=d)
        )

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        # Fifos, sockets (bind), device nodes and plain files.  The kernel already refused
        # a device node to a caller without CAP_MKNOD (every guest drops it); one made here
        # lands in the caller's own tree (``_in_dir``), never in the store, and the overlay
        # is mounted nodev, so it opens no device through the mount.
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in _NODE_KINDS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        perm = _asked(mode, ctx)
        return await self._make(
            parent_inode,
            name,
            ctx,
            lambda n, d: os.mknod(n, kind | perm, rdev if kind in _DEVICES else 0, dir_fd=d),
        )

    def _in_dir(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[str, str, str, int]:
        """(guest, directory, name, directory fd) for a change of ``name`` in a guest
        directory, by a caller allowed to change that guest; the overlay's root (the list
        of guests) cannot be changed."""
        if parent_inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        (guest, rel), dfd = self.nodes.open_dir(parent_inode)
        try:
            self.callers.check(ctx, guest)
        except BaseException:
            os.close(dfd)
            raise
        return guest, rel, os.fsdecode(name), dfd

    def _open_shared(
        self, guest: str, n: str, dfd: int, expect: tuple[int, int] | None = None
    ) -> int:
        """Open a file with several names whose seal a name operation must lift: only an
        inode sealed by us (marked); an immutable flag set by someone else stays."""
        fd = self.trees[guest].open_regular(n, dirfd=dfd, expect=expect)
        if self.immutable and attrs.is_immutable(fd) and not attrs.has_marker(fd):
            os.close(fd)
            raise pyfuse3.FUSEError(errno.EPERM)
        return fd

    async def _make(
        self,
        parent_inode: int,
        name: bytes,
        ctx: pyfuse3.RequestContext,
        make: Callable[[str, int], None],
    ) -> pyfuse3.EntryAttributes:
        """Make ``name`` with ``make(name, dirfd)``, as the caller (``_made_by``)."""
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            with _made_by(ctx):
                make(n, dfd)
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(dfd)
        node = self.nodes.node(st, (guest, join(rel, n)))
        node.lookups += 1
        return self._attr(node.id, st)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, directory=True)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, directory=False)

    async def _remove(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext, directory: bool
    ) -> None:
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            left = 0 if directory else st.st_nlink - 1  # the guest names that may hold it
            if directory:
                os.rmdir(n, dir_fd=dfd)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # A shared inode: only this guest's name goes; the seal is lifted for the
                # unlink and put back (FS_IMMUTABLE_FL forbids unlink).
                fd = self._open_shared(guest, n, dfd)
                try:
                    with unsealed(fd, self.immutable, what=self.trees[guest].where(join(rel, n))):
                        os.unlink(n, dir_fd=dfd)
                    left = os.fstat(fd).st_nlink - attrs.has_marker(fd)  # the store's is none
                finally:
                    os.close(fd)
            else:
                os.unlink(n, dir_fd=dfd)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(dfd)
        node = self.nodes.find(st)
        if node is not None:
            node.st = st
            self.nodes.let_go(node, (guest, join(rel, n)), left)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if ROOT in (parent_inode_old, parent_inode_new):
            raise pyfuse3.FUSEError(errno.EPERM)
        a, b = os.fsdecode(name_old), os.fsdecode(name_new)
        with ExitStack() as dirs:  # both directories, each checked to be its node's inode
            (g1, r1), d1 = self.nodes.open_dir(parent_inode_old)
            dirs.callback(os.close, d1)
            (g2, r2), d2 = self.nodes.open_dir(parent_inode_new)
            dirs.callback(os.close, d2)
            if g1 != g2:
                raise pyfuse3.FUSEError(errno.EXDEV)
            self.callers.check(ctx, g1)
            src, dst, left = self._rename_in(g1, (d1, r1, a), (d2, r2, b), flags)
        old, new = (g1, join(r1, a)), (g2, join(r2, b))
        dnode = self.nodes.find(dst) if dst else None
        if dnode is not None:  # moved to the old name (RENAME_EXCHANGE), or replaced
            if flags & syscalls.RENAME_EXCHANGE:
                dnode.names.pop(new, None)
                dnode.names[old] = None
            else:
                self.nodes.let_go(dnode, new, left)
        snode = self.nodes.find(src)
        if snode is not None:
            snode.names.pop(old, None)
            snode.names[new] = None

    def _rename_in(
        self,
        guest: str,
        frm: tuple[int, str, str],
        to: tuple[int, str, str],
        flags: int,
    ) -> tuple[os.stat_result, os.stat_result | None, int]:
        """rename(2) of ``frm`` to ``to`` (directory descriptor, its path, the name) in
        ``guest``, a shared inode on either side unsealed for it: what each name held
        before, and how many guest names may still hold what was renamed over."""
        (d1, _, a), (d2, _, b) = frm, to
        try:
            src = os.stat(a, dir_fd=d1, follow_symlinks=False)
            try:
                dst: os.stat_result | None = os.stat(b, dir_fd=d2, follow_symlinks=False)
            except FileNotFoundError:
                dst = None
            left = 0  # guest names that may hold what was renamed over, once it is
            with ExitStack() as windows:  # a shared inode on either side: unsealed for it
                for side, ((d, rel, n), st) in enumerate(((frm, src), (to, dst))):
                    if st is None:
                        continue
                    if side and not stat.S_ISDIR(st.st_mode):  # the name renamed over
                        left = st.st_nlink - 1
                    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        fd = self._open_shared(guest, n, d)
                        windows.callback(os.close, fd)
                        windows.enter_context(
                            unsealed(fd, self.immutable, what=self.trees[guest].where(join(rel, n)))
                        )
                        if side:
                            left -= attrs.has_marker(fd)  # the store's link is no guest's
                syscalls.renameat2(d1, a, d2, b, flags)
        except OSError as e:
            raise fuse_error(e) from None
        return src, dst, left

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self.nodes.get(inode)
        with ExitStack() as dirs:
            (g, rel), d2 = self.nodes.open_dir(new_parent_inode)  # checked to be its inode
            dirs.callback(os.close, d2)
            self.callers.check(ctx, g)
            found = self.nodes.holding(node, g, self.callers.last_lookup(ctx.pid, node))
            if found is None:
                raise pyfuse3.FUSEError(errno.EXDEV)  # no hardlinks across guests
            sh, _, sb = found[0][1].rpartition("/")
            d1 = open_name_dir(self.trees, (g, sh))  # the source is checked by its inode below
            dirs.callback(os.close, d1)
            st = self._link_in(g, node, (d1, found, sb), (d2, os.fsdecode(new_name)))
        node.names[(g, join(rel, os.fsdecode(new_name)))] = None
        node.lookups += 1
        return self._attr(inode, st)

    def _link_in(
        self,
        guest: str,
        node: Node,
        frm: tuple[int, tuple[Name, os.stat_result], str],
        to: tuple[int, str],
    ) -> os.stat_result:
        """link(2) of ``node``'s name ``frm`` (directory descriptor, the name found holding
        the node and its stat, the last component) to ``to`` in ``guest``; the new name's
        stat, ESTALE (and no new name) if it is not the node's inode."""
        (d1, found, sb), (d2, n) = frm, to
        src = found[0]
        try:
            if stat.S_ISREG(found[1].st_mode):
                # possibly shared: its seal (if ours) is lifted for the link
                fd = self._open_shared(guest, sb, d1, (node.dev, node.ino))
                try:
                    with unsealed(fd, self.immutable, what=self.trees[guest].where(src[1])):
                        os.link(sb, n, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)
                finally:
                    os.close(fd)
            else:  # a fifo, socket, device node or symlink: never shared, never sealed
                os.link(sb, n, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)
            st = os.stat(n, dir_fd=d2, follow_symlinks=False)
            if (st.st_dev, st.st_ino) != (node.dev, node.ino):  # replaced meanwhile: undo
                os.unlink(n, dir_fd=d2)
                raise pyfuse3.FUSEError(errno.ESTALE)
        except OSError as e:
            raise fuse_error(e) from None
        return st

    # -- extended attributes -----------------------------------------------------------
    # Our own marker (trusted/user.vsstore.*) is invisible and untouchable through the
    # overlay; changing any other xattr of a shared inode copies it up first.

    def _xattr_fd(self, name: Name, expect: tuple[int, int] | None = None) -> int:
        """A descriptor of the directory or regular file ``name`` holds (``_target``: ESTALE
        unless it is the inode ``expect``ed), reopened through the target's descriptor."""
        t = self._target(name, expect)
        try:
            if stat.S_ISDIR(t.st.st_mode):
                flags = os.O_RDONLY | os.O_DIRECTORY
            elif stat.S_ISREG(t.st.st_mode):
                flags = os.O_RDONLY | os.O_NONBLOCK
            else:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # symlinks, fifos: no xattrs here
            return os.open(t.path, flags | os.O_CLOEXEC)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(t.fd)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        n = os.fsdecode(name)
        if is_ours(n) or inode == ROOT:
            raise pyfuse3.FUSEError(errno.ENODATA)
        node = self.nodes.get(inode)
        fh = next(iter(node.fhs), None)  # open on this very inode: asked at every write
        if fh is not None:  # (for security.capability, to drop it), answered without a walk
            try:
                return os.getxattr(fh, n)
            except OSError as e:
                raise fuse_error(e) from None
        fd = self._xattr_fd(self.nodes.some_name(node))
        try:
            return os.getxattr(fd, n)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(fd)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == ROOT:
            return []
        fd = self._xattr_fd(self.nodes.some_name(self.nodes.get(inode)))
        try:
            return [os.fsencode(n) for n in os.listxattr(fd) if not is_ours(n)]
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(fd)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._change_xattr(inode, os.fsdecode(name), value, ctx)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._change_xattr(inode, os.fsdecode(name), None, ctx)

    async def _change_xattr(
        self, inode: int, n: str, value: bytes | None, ctx: pyfuse3.RequestContext
    ) -> None:
        if is_ours(n) or inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self.nodes.get(inode)
        name, copied = self.copyup.name_to_change(ctx, node, self.nodes.resolve(node))
        fd = self._xattr_fd(name, None if copied else (node.dev, node.ino))
        try:
            if value is None:
                os.removexattr(fd, n)
            else:
                os.setxattr(fd, n, value)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(fd)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks modes itself

    # -- files -------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        try:
            node = self.nodes.get(inode)
        except pyfuse3.FUSEError:
            log.debug("open of node %d: not known (forgotten)", inode)
            raise
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        found = None
        if node.names:
            try:
                found = self.nodes.resolve(node)
            except pyfuse3.FUSEError:
                pass
        if writing:
            # A copy reached through the shared node: the shared inode's page cache must
            # never see this file's data (direct_io).
            name, direct = self.copyup.name_to_change(ctx, node, found)
        elif found is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        else:
            name, direct = found[0], False
        # Unless it is a copy (made now or before), the name must still hold this node's
        # inode: it may have been replaced since the kernel looked it up.
        expect = None if direct else (node.dev, node.ino)
        try:
            fd = self.trees[name[0]].open_regular(name[1], expect=expect, flags=flags)
        except OSError as e:
            raise fuse_error(e) from None
        if direct:
            self.copy_handles.add(fd)
        else:
            node.fhs.add(fd)
            self.handle_node[fd] = node
        return pyfuse3.FileInfo(fh=fd, direct_io=direct, keep_cache=not writing)

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            # The kernel found no such name just now.  O_EXCL: a file a guest process put
            # there meanwhile is never opened (nor handed over) in its place.
            with _made_by(ctx):
                fd = os.open(
                    n,
                    flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    _asked(mode, ctx),
                    dir_fd=dfd,
                )
            st = os.fstat(fd)
        except OSError as e:
            raise fuse_error(e) from None
        finally:
            os.close(dfd)
        node = self.nodes.node(st, (guest, join(rel, n)))
        node.lookups += 1
        node.st = st
        node.fhs.add(fd)
        self.handle_node[fd] = node
        return pyfuse3.FileInfo(fh=fd), self._attr(node.id, st)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise fuse_error(e) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise fuse_error(e) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            raise fuse_error(e) from None

    async def release(self, fh: int) -> None:
        self.copy_handles.discard(fh)
        node = self.handle_node.pop(fh, None)
        if node is not None:
            node.fhs.discard(fh)
        os.close(fh)


# Every request handler of the overlay goes through _guarded.
for _name, _attr in list(vars(CowFS).items()):
    if (
        not _name.startswith("_")
        and hasattr(pyfuse3.Operations, _name)
        and callable(_attr)
        and getattr(_attr, "__code__", None) is not None
        and _attr.__code__.co_flags & 0x80
    ):  # CO_COROUTINE
        setattr(CowFS, _name, _guarded(_attr))
