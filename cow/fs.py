"""The cow overlay's filesystem: pyfuse3 Operations over the guests' own trees.

One mount serves every guest: its root lists the guests, ``/NAME`` is guest NAME's tree.
FUSE node ids come from backing inodes, so an inode shared by several guests is one FUSE
inode, and the kernel keeps one page cache for it (memory stays shared).

Writes never reach a shared inode.  Opening one for writing, truncating it, or changing its
metadata first gives the writing guest its own copy (``vsstore.private.privatize``: copy,
fsync, swap atomically), then works on the copy through a ``direct_io`` handle, so the
shared inode's page cache is never touched; the kernel's entry for the name is invalidated,
so the next lookup finds the copy.  A FUSE open carries an inode, not a path, so the writing
guest is found from the caller: a process chrooted into ``/NAME``, or a started guest whose
root mount is ``/NAME`` of this mount (its mountinfo says so), is that guest's; otherwise
the guest of the name this thread looked up last (shared files get no entry caching, so
every path walk to them comes through ``lookup``).

All backing access goes through ``GuestTree`` (no symlink followed, no mount crossed).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import queue
import stat
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field

import pyfuse3

from vsstore import attrs, syscalls
from vsstore.attrs import is_ours
from vsstore.names import shown
from vsstore.private import privatize, tmp_name
from vsstore.safetree import GuestTree
from vsstore.window import unsealed

log = logging.getLogger("vsstore.cow")

ROOT = pyfuse3.ROOT_INODE
Name = tuple[str, str]  # (guest, path relative to its root; '' for the root)


@dataclass(slots=True)
class Node:
    id: int
    dev: int
    ino: int
    names: dict[Name, None] = field(default_factory=dict)  # an ordered set
    lookups: int = 0
    st: os.stat_result | None = None  # last seen: answers getattr once no name is left
    fhs: set[int] = field(default_factory=set)  # open handles on this very inode


@dataclass(slots=True)
class PidNs:
    """A guest's pid namespace, attached to one or more of the overlay's guests."""

    fd: int
    guests: set[str] = field(default_factory=set)


NS_GET_PARENT = 0xB702  # linux/nsfs.h: _IO(0xb7, 0x2)
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWPID = 0x20000000
MAX_PIDNS_DEPTH = 32  # the kernel's limit on nested pid namespaces


def _ns_key(pid: int | str, kind: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _err(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _guarded(handler):  # type: ignore[no-untyped-def]
    """A request handler that can fail only with a FUSEError.  pyfuse3 ends its main loop
    (and so the mount of every guest) on any other exception: an OSError becomes its errno,
    anything else is logged and becomes EIO."""
    @functools.wraps(handler)
    async def run(*args, **kwargs):  # type: ignore[no-untyped-def]
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


class CowFS(pyfuse3.Operations):
    """The overlay.  ``guests`` maps a name to its root tree."""

    supports_dot_lookup = False
    RECENT_MAX = 1 << 16  # remembered (thread, shared node) lookups
    # The daemon is the only writer through the mount, so the kernel may keep what it
    # learns for long; where the daemon changes something behind the kernel (copy-up,
    # add/remove) it invalidates.  Shared files get no entry caching at all: every path
    # walk to them must come through lookup, which tells the writing guest.
    ENTRY_TIMEOUT = 3600.0
    ATTR_TIMEOUT = 3600.0
    enable_writeback_cache = False

    def __init__(self, guests: dict[str, str], immutable: bool = True,
                 ) -> None:
        super().__init__()
        self.mounted = False  # set by the daemon once the FUSE session is up
        self.trees: dict[str, GuestTree] = {}
        self.immutable = immutable
        self.nodes: dict[int, Node] = {}
        self.by_inode: dict[tuple[int, int], int] = {}
        self.next_id = 1 << 48  # for inode numbers that collide (another filesystem)
        self.recent: dict[tuple[int, int], Name] = {}  # (tid, node) -> name last looked up
        self.dir_handles: dict[int, tuple[Name, list[tuple[str, os.stat_result]]]] = {}
        # Which guest a caller is: the pid namespaces that start and exec --cow gave their
        # processes, attached by the lifecycle (held open, so a number is never reused).
        self.pidns: dict[tuple[int, int], PidNs] = {}
        self.own_ns = (_ns_key("self", "pid"), _ns_key("self", "mnt"))
        self.copy_handles: set[int] = set()  # open on a copy, reached through a shared node
        self.handle_node: dict[int, Node] = {}  # open handle -> the node it is open on
        self._stale: queue.SimpleQueue[int] | None = None  # node ids whose attrs changed
        self.next_dh = 1
        self.root_st = os.stat("/")
        for name, root in guests.items():
            self.add_guest(name, root)

    # -- guests ----------------------------------------------------------------------

    def add_guest(self, name: str, root: str) -> None:
        if name in self.trees or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"guest name {name!r} is taken or not valid")
        self.trees[name] = GuestTree(root, name)
        self._root_changed(name)

    def attach(self, name: str, nsfd: int) -> None:
        """Processes in the pid namespace ``nsfd`` (or in one nested in it) are guest
        ``name``'s: they write to its names only.  Takes ``nsfd`` over."""
        try:
            if name not in self.trees:
                raise ValueError(f"no guest {name!r} in this overlay")
            if fcntl.ioctl(nsfd, NS_GET_NSTYPE) != CLONE_NEWPID:
                raise ValueError("not a pid namespace")
            st = os.fstat(nsfd)
            key = (st.st_dev, st.st_ino)
            if key == self.own_ns[0]:
                raise ValueError("the host's own pid namespace cannot be a guest's")
        except BaseException:
            os.close(nsfd)
            raise
        ns = self.pidns.get(key)
        if ns is None:
            self.pidns[key] = ns = PidNs(nsfd)
        else:
            os.close(nsfd)
        ns.guests.add(name)

    def remove_guest(self, name: str) -> None:
        tree = self.trees.pop(name, None)
        if tree is None:
            raise ValueError(f"no guest {name!r} in this overlay")
        for key, ns in list(self.pidns.items()):
            ns.guests.discard(name)
            if not ns.guests:
                os.close(ns.fd)
                del self.pidns[key]
        for node in self.nodes.values():
            for n in [n for n in node.names if n[0] == name]:
                del node.names[n]
        tree.close()
        self._root_changed(name)

    def _root_changed(self, name: str) -> None:
        """Make the kernel forget what it knows of the root listing and of ``name``."""
        if not self.mounted:
            return  # nothing cached yet (and no session to notify)
        try:  # asynchronous: the synchronous call would wait on this very loop
            pyfuse3.invalidate_entry_async(ROOT, os.fsencode(name))
        except (OSError, RuntimeError):
            pass  # not mounted (tests of the bare operations) or nothing cached

    def close(self) -> None:
        if self._stale is not None:
            self._stale.put(-1)
        for ns in self.pidns.values():
            os.close(ns.fd)
        self.pidns.clear()
        for t in self.trees.values():
            t.close()
        self.trees.clear()

    # -- nodes -----------------------------------------------------------------------

    def _node(self, st: os.stat_result, name: Name) -> Node:
        key = (st.st_dev, st.st_ino)
        nid = self.by_inode.get(key)
        if nid is None:
            nid = st.st_ino if st.st_ino not in self.nodes and st.st_ino != ROOT else \
                self._fresh_id()
            self.by_inode[key] = nid
            self.nodes[nid] = Node(nid, st.st_dev, st.st_ino)
        node = self.nodes[nid]
        node.names[name] = None
        return node

    def _fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _get(self, nid: int) -> Node:
        node = self.nodes.get(nid)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _some_name(self, node: Node) -> Name:
        return self._resolve(node)[0]

    def _resolve(self, node: Node) -> tuple[Name, os.stat_result]:
        """A name of ``node`` that still holds its inode, and its stat."""
        found = self._holding(node)
        if found is None:
            log.debug("node %d (inode %d): no name holds it any more", node.id, node.ino)
            raise pyfuse3.FUSEError(errno.ESTALE)
        node.st = found[1]
        return found

    def _holding(self, node: Node, guest: str | None = None, prefer: Name | None = None,
                 ) -> tuple[Name, os.stat_result] | None:
        """A name of ``node`` (in ``guest``, ``prefer`` first) that still holds its inode,
        and its stat.  Names that now hold something else (copied up, replaced) are
        dropped on the way."""
        for n in ([prefer] if prefer is not None else []) + list(node.names):
            if n[0] not in self.trees or (guest is not None and n[0] != guest) or \
                    n not in node.names:
                continue
            try:
                st = self._lstat(n)
            except pyfuse3.FUSEError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (node.dev, node.ino):
                return n, st
            del node.names[n]
        return None

    def _dir_of(self, nid: int) -> Name:
        """The (guest, rel) of a directory node (directories have one name)."""
        return self._some_name(self._get(nid))

    def _open_dir(self, name: Name) -> int:
        tree = self.trees[name[0]]
        try:
            return tree.open_beneath(name[1], os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise _err(e) from None

    def _lstat(self, name: Name) -> os.stat_result:
        tree = self.trees.get(name[0])
        if tree is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not name[1]:
            return os.fstat(tree.fd)
        head, _, tail = name[1].rpartition("/")
        dfd = self._open_dir((name[0], head))
        try:
            return os.stat(tail, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)

    def _shared(self, node: Node, name: Name, st: os.stat_result) -> bool:
        """Does a write to this inode (reached as ``name``, with stat ``st``) need a copy-up
        first?"""
        return stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (
            len({g for g, _ in node.names}) > 1 or self._marked(name))

    def _marked(self, name: Name) -> bool:
        try:
            fd = self.trees[name[0]].open_regular(name[1])
        except OSError:
            return False
        try:
            return attrs.has_marker(fd)
        finally:
            os.close(fd)

    def _attr(self, node_id: int, st: os.stat_result, shared: bool = False,
              ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node_id
        a.generation = 0
        a.entry_timeout = 0 if shared else self.ENTRY_TIMEOUT
        a.attr_timeout = self.ATTR_TIMEOUT
        for f in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, f, getattr(st, f))
        a.st_blksize = 4096
        a.st_blocks = st.st_blocks
        return a

    def _root_attr(self) -> pyfuse3.EntryAttributes:
        a = self._attr(ROOT, self.root_st)
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2 + len(self.trees)
        return a

    # -- which guest is writing ---------------------------------------------------------

    def _caller(self, pid: int) -> frozenset[str] | None:
        """Who is calling: None for the host (its pid and mount namespaces, its root "/");
        else the guests attached to the caller's pid namespace or the nearest one it is
        nested in (empty: nobody we know, e.g. a chrooted host process).  Only what the
        kernel gave the process counts, never a path it can shape (a guest may chroot)."""
        try:
            fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return frozenset()
        try:
            for _ in range(MAX_PIDNS_DEPTH + 1):
                st = os.fstat(fd)
                ns = self.pidns.get((st.st_dev, st.st_ino))
                if ns is not None:
                    return frozenset(ns.guests)
                if (st.st_dev, st.st_ino) == self.own_ns[0]:
                    try:
                        root = os.readlink(f"/proc/{pid}/root")
                    except OSError:
                        return frozenset()
                    host = root == "/" and _ns_key(pid, "mnt") == self.own_ns[1]
                    return None if host else frozenset()
                try:
                    parent = fcntl.ioctl(fd, NS_GET_PARENT)
                except OSError:
                    return frozenset()
                os.close(fd)
                fd = parent
            return frozenset()
        finally:
            os.close(fd)

    def _check_caller(self, ctx: pyfuse3.RequestContext, guest: str) -> None:
        """A change in ``guest``'s tree: refused (EACCES) to a process of another guest or
        of nobody we know.  (A guest cannot reach another's tree through its own root;
        this holds even if it could.)"""
        who = self._caller(ctx.pid)
        if who is not None and not self._mine(guest, who):
            log.warning("pid %d (guests %s) may not change guest %s's tree", ctx.pid,
                        ", ".join(sorted(who)) or "none", guest)
            raise pyfuse3.FUSEError(errno.EACCES)

    def _mine(self, guest: str, who: frozenset[str]) -> bool:
        """Is ``guest`` one of ``who``, or the same tree served under another name (two
        exec --cow shares of one guest)?"""
        if guest in who:
            return True
        tree = self.trees.get(guest)
        return tree is not None and any(
            (t := self.trees.get(g)) is not None and (t.dev, t.ino) == (tree.dev, tree.ino) for g in who)

    def _caller_name(self, ctx: pyfuse3.RequestContext, node: Node) -> Name:
        """The name through which the calling guest reached ``node``, a shared inode: one
        of its own guest's names (the one it looked up last, if it did); for the host, the
        name this thread looked up last.  A caller we cannot attribute is refused: a write
        attributed to the wrong guest would reach that guest's file."""
        recent = self.recent.get((ctx.pid, node.id))
        who = self._caller(ctx.pid)
        if who is None:  # the host: the name it walked
            if recent is not None:
                return recent
            log.warning("write to shared inode %d by host pid %d: no lookup of it seen",
                        node.ino, ctx.pid)
            raise pyfuse3.FUSEError(errno.EACCES)
        if recent is not None and self._mine(recent[0], who):
            return recent
        mine = next((n for n in node.names if self._mine(n[0], who)), None)
        if mine is None:
            log.warning("write to shared inode %d by pid %d (guests %s): none of its names",
                        node.ino, ctx.pid, ", ".join(sorted(who)) or "none")
            raise pyfuse3.FUSEError(errno.EACCES)
        return mine

    def _writable_name(self, ctx: pyfuse3.RequestContext, node: Node,
                       ) -> tuple[Name, bool]:
        """The caller's own name for writing to ``node``: copied up first if it still
        holds the shared inode.  Returns (name, copied) where copied means the kernel's
        inode for this open is the shared one, so the handle must bypass its cache."""
        name = self._caller_name(ctx, node)
        if name in node.names:
            st = self._lstat(name)
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                self._copy_up(node, name)
                return name, True
            del node.names[name]
        return name, True  # copied up before (the kernel still holds the shared inode)

    def _copy_up(self, node: Node, name: Name) -> os.stat_result:
        """Give ``name`` its own copy of ``node``'s inode; returns the copy's stat."""
        guest, rel = name
        tree = self.trees[guest]
        head, _, base = rel.rpartition("/")
        dfd = self._open_dir((guest, head))
        try:
            ofd = tree.open_regular(base, dirfd=dfd)
            try:
                cst = privatize(str(tree.root), head, dfd, base, ofd, None, self.immutable)
                node.st = os.fstat(ofd)  # answers for it once no guest's name holds it
            finally:
                os.close(ofd)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)
        if cst is None:
            raise pyfuse3.FUSEError(errno.EAGAIN)
        log.info("copy-up %s:/%s (inode %d -> %d)", guest, shown(rel), node.ino, cst.st_ino)
        node.names.pop(name, None)
        copy = self._node(cst, name)
        self._invalidate((guest, head), base)
        self._attrs_changed(node.id)  # one link fewer, for every guest that caches it
        # The guest's other names of the shared inode were one file for it: they follow.
        for other in [n for n in node.names if n[0] == guest]:
            self._relink(node, other, name, copy)
        return cst

    def _invalidate(self, parent: Name, base: str) -> None:
        if not self.mounted:
            return
        nid = self.by_inode.get(self._dir_key(parent))
        if nid is not None:
            pyfuse3.invalidate_entry_async(nid, os.fsencode(base))

    def _attrs_changed(self, nid: int) -> None:
        """Make the kernel ask again for node ``nid``'s attributes.  Sent from a thread of
        its own, after the current request is answered: a notification written while the
        kernel waits on this loop could wait on the loop itself."""
        if not self.mounted:
            return
        if self._stale is None:
            self._stale = queue.SimpleQueue()
            threading.Thread(target=self._notify_attrs, args=(self._stale,), daemon=True,
                             name="vscow-inval").start()
        self._stale.put(nid)

    @staticmethod
    def _notify_attrs(stale: queue.SimpleQueue[int]) -> None:
        while True:
            nid = stale.get()
            if nid < 0:
                return
            try:
                pyfuse3.invalidate_inode(nid, attr_only=True)
            except (OSError, RuntimeError) as e:  # forgotten meanwhile, or unmounted
                log.debug("invalidate attributes of node %d: %s", nid, e)

    def _relink(self, node: Node, other: Name, copied: Name, copy: Node) -> None:
        """Point ``other`` (a name of ``node`` in the same guest) at the copy made for
        ``copied``: link, swap, check, as for every replacement."""
        guest, rel = other
        tree = self.trees[guest]
        head, _, base = rel.rpartition("/")
        chead, _, cbase = copied[1].rpartition("/")
        dfd, cdfd = self._open_dir((guest, head)), self._open_dir((guest, chead))
        try:
            ofd = tree.open_regular(base, dirfd=dfd)
            try:
                if (os.fstat(ofd).st_dev, os.fstat(ofd).st_ino) != (node.dev, node.ino):
                    return
                t = tmp_name()
                os.link(cbase, t, src_dir_fd=cdfd, dst_dir_fd=dfd, follow_symlinks=False)
                with unsealed(ofd, self.immutable, what=self.trees[guest].where(rel)):
                    syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    if os.stat(t, dir_fd=dfd, follow_symlinks=False).st_ino != node.ino:
                        syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    else:
                        node.names.pop(other, None)
                        copy.names[other] = None
                    os.unlink(t, dir_fd=dfd)
            finally:
                os.close(ofd)
        except OSError as e:
            log.warning("%s:/%s: could not follow its hardlink's copy-up: %s", guest, shown(rel),
                        e.strerror)
        finally:
            os.close(dfd)
            os.close(cdfd)
        self._invalidate((guest, head), base)

    def _dir_key(self, name: Name) -> tuple[int, int]:
        st = self._lstat(name)
        return (st.st_dev, st.st_ino)

    # -- lookups and attributes -----------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                     ) -> pyfuse3.EntryAttributes:
        n = os.fsdecode(name)
        if parent_inode == ROOT:
            if n not in self.trees:
                raise pyfuse3.FUSEError(errno.ENOENT)
            child: Name = (n, "")
        else:
            g, rel = self._dir_of(parent_inode)
            if n in (".", ".."):
                raise pyfuse3.FUSEError(errno.ENOENT)
            child = (g, _join(rel, n))
        st = self._lstat(child)
        node = self._node(st, child)
        node.lookups += 1
        node.st = st
        shared = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
        if shared:
            self.recent.pop((ctx.pid, node.id), None)
            self.recent[(ctx.pid, node.id)] = child  # newest last
            if len(self.recent) > self.RECENT_MAX:
                del self.recent[next(iter(self.recent))]  # the oldest lookup
        return self._attr(node.id, st, shared)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for nid, n in inode_list:
            node = self.nodes.get(nid)
            if node is None:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.nodes[nid]
                self.by_inode.pop((node.dev, node.ino), None)
                for k in [k for k in self.recent if k[1] == nid]:
                    del self.recent[k]

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None,
                      ) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._root_attr()
        node = self._get(inode)
        try:
            return self._attr(inode, self._resolve(node)[1])
        except pyfuse3.FUSEError:
            # No name holds the inode any more: unlinked while open (its handles know
            # it), or every guest copied this shared inode up while the kernel still
            # holds it (its open files write to the copies): its last known attributes.
            for fh in node.fhs:
                try:
                    node.st = os.fstat(fh)
                    break
                except OSError:
                    continue
            if node.st is None:
                raise
            return self._attr(inode, node.st)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        if fh is not None and fields.update_size and not (
                fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_atime or fields.update_mtime):
            try:  # ftruncate on an open file: the handle already is the right file
                os.ftruncate(fh, attr.st_size)
                if fh in self.copy_handles:
                    return self._shared_attr(node)
                return self._attr(inode, os.fstat(fh))
            except OSError as e:
                raise _err(e) from None
        name, st = self._resolve(node) if node.names else (None, None)
        copied = name is None or self._shared(node, name, st)  # type: ignore[arg-type]
        if copied:
            name, _ = self._writable_name(ctx, node)
            st = self._lstat(name)
        else:
            self._check_caller(ctx, name[0])
        guest, rel = name
        head, _, base = rel.rpartition("/")
        dfd = self._open_dir((guest, head)) if rel else os.dup(self.trees[guest].fd)
        try:
            target: str | int = base if rel else dfd
            kw = {"dir_fd": dfd, "follow_symlinks": False} if rel else {}
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    fd = self.trees[guest].open_regular(base, dirfd=dfd, flags=os.O_WRONLY)
                    try:
                        os.ftruncate(fd, attr.st_size)
                    finally:
                        os.close(fd)
            if fields.update_mode:
                if rel and stat.S_ISLNK(st.st_mode):
                    raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
                os.chmod(target, stat.S_IMODE(attr.st_mode), **kw)
            if fields.update_uid or fields.update_gid:
                os.chown(target, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, **kw)
            if fields.update_atime or fields.update_mtime:
                cur = self._lstat(name)
                os.utime(target, ns=(attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                                     attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns),
                         **kw)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)
        if copied:
            # The kernel applies the answer to ``inode``, the shared inode every guest
            # sees: it gets the shared inode's attributes; the caller's name now leads
            # to the changed copy (its entry was invalidated).
            return self._shared_attr(node)
        return self._attr(inode, self._lstat(name))

    def _shared_attr(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes of a shared node after a copy-up: its own inode's, as far as a name
        still holds it, else the last seen."""
        try:
            return self._attr(node.id, self._resolve(node)[1], True)
        except pyfuse3.FUSEError:
            if node.st is None:
                raise
            return self._attr(node.id, node.st, True)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        guest, rel = self._some_name(self._get(inode))
        head, _, base = rel.rpartition("/")
        dfd = self._open_dir((guest, head))
        try:
            return os.fsencode(os.readlink(base, dir_fd=dfd))
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        tree = next(iter(self.trees.values()), None)
        s = os.statvfs(tree.fd) if tree else os.statvfs("/")  # by fd: the path may have moved
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(d, f, getattr(s, f))
        return d

    # -- directories -----------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode == ROOT:
            entries = [(g, os.fstat(t.fd)) for g, t in sorted(self.trees.items())]
            name: Name = ("", "")
        else:
            name = self._dir_of(inode)
            dfd = self._open_dir(name)
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
        fh = self.next_dh
        self.next_dh += 1
        self.dir_handles[fh] = (name, entries)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        name, entries = self.dir_handles[fh]
        for i in range(start_id, len(entries)):
            n, st = entries[i]
            child: Name = (n, "") if not name[0] else (name[0], _join(name[1], n))
            node = self._node(st, child)
            shared = stat.S_ISREG(st.st_mode) and st.st_nlink > 1
            if not pyfuse3.readdir_reply(token, os.fsencode(n), self._attr(node.id, st, shared),
                                         i + 1):
                return
            node.lookups += 1

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, ctx,
                                lambda n, d: os.mkdir(n, mode & ~ctx.umask, dir_fd=d))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return await self._make(parent_inode, name, ctx,
                                lambda n, d: os.symlink(os.fsdecode(target), n, dir_fd=d))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISFIFO(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # only fifos: no devices in guests
        return await self._make(parent_inode, name, ctx,
                                lambda n, d: os.mkfifo(n, mode & 0o7777 & ~ctx.umask, dir_fd=d))

    def _in_dir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                ) -> tuple[str, str, str, int]:
        """(guest, directory, name, directory fd) for a change of ``name`` in a guest
        directory, by a caller allowed to change that guest; the overlay's root (the list
        of guests) cannot be changed."""
        if parent_inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        guest, rel = self._dir_of(parent_inode)
        self._check_caller(ctx, guest)
        return guest, rel, os.fsdecode(name), self._open_dir((guest, rel))

    def _open_shared(self, guest: str, n: str, dfd: int,
                     expect: tuple[int, int] | None = None) -> int:
        """Open a file with several names whose seal a name operation must lift: only an
        inode sealed by us (marked); an immutable flag set by someone else stays."""
        fd = self.trees[guest].open_regular(n, dirfd=dfd, expect=expect)
        if self.immutable and attrs.is_immutable(fd) and not attrs.has_marker(fd):
            os.close(fd)
            raise pyfuse3.FUSEError(errno.EPERM)
        return fd

    async def _make(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                    make) -> pyfuse3.EntryAttributes:  # type: ignore[no-untyped-def]
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            make(n, dfd)
            os.chown(n, ctx.uid, ctx.gid, dir_fd=dfd, follow_symlinks=False)
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)
        node = self._node(st, (guest, _join(rel, n)))
        node.lookups += 1
        return self._attr(node.id, st)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, directory=True)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, ctx, directory=False)

    async def _remove(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext,
                      directory: bool) -> None:
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            if directory:
                os.rmdir(n, dir_fd=dfd)
            elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # A shared inode: only this guest's name goes; the seal is lifted for the
                # unlink and put back (FS_IMMUTABLE_FL forbids unlink).
                fd = self._open_shared(guest, n, dfd)
                try:
                    with unsealed(fd, self.immutable, what=self.trees[guest].where(_join(rel, n))):
                        os.unlink(n, dir_fd=dfd)
                finally:
                    os.close(fd)
            else:
                os.unlink(n, dir_fd=dfd)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)
        nid = self.by_inode.get((st.st_dev, st.st_ino))
        if nid is not None:
            self.nodes[nid].names.pop((guest, _join(rel, n)), None)
            self.nodes[nid].st = st

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if ROOT in (parent_inode_old, parent_inode_new):
            raise pyfuse3.FUSEError(errno.EPERM)
        g1, r1 = self._dir_of(parent_inode_old)
        g2, r2 = self._dir_of(parent_inode_new)
        if g1 != g2:
            raise pyfuse3.FUSEError(errno.EXDEV)
        self._check_caller(ctx, g1)
        a, b = os.fsdecode(name_old), os.fsdecode(name_new)
        d1, d2 = self._open_dir((g1, r1)), self._open_dir((g2, r2))
        try:
            src = os.stat(a, dir_fd=d1, follow_symlinks=False)
            try:
                dst: os.stat_result | None = os.stat(b, dir_fd=d2, follow_symlinks=False)
            except FileNotFoundError:
                dst = None
            with ExitStack() as windows:  # a shared inode on either side: unsealed for it
                for d, rel, n in ((d1, r1, a), (d2, r2, b)):
                    try:
                        st = os.stat(n, dir_fd=d, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        fd = self._open_shared(g1, n, d)
                        windows.callback(os.close, fd)
                        windows.enter_context(unsealed(fd, self.immutable,
                                                       what=self.trees[g1].where(_join(rel, n))))
                syscalls.renameat2(d1, a, d2, b, flags)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(d1)
            os.close(d2)
        old, new = (g1, _join(r1, a)), (g2, _join(r2, b))
        dnode = self.nodes.get(self.by_inode.get((dst.st_dev, dst.st_ino), -1)) if dst else None
        if dnode is not None:  # replaced, or (RENAME_EXCHANGE) moved to the old name
            dnode.names.pop(new, None)
            if flags & syscalls.RENAME_EXCHANGE:
                dnode.names[old] = None
        snode = self.nodes.get(self.by_inode.get((src.st_dev, src.st_ino), -1))
        if snode is not None:
            snode.names.pop(old, None)
            snode.names[new] = None

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._get(inode)
        g, rel = self._dir_of(new_parent_inode)
        self._check_caller(ctx, g)
        found = self._holding(node, g, self.recent.get((ctx.pid, node.id)))
        if found is None:
            raise pyfuse3.FUSEError(errno.EXDEV)  # no hardlinks across guests
        src = found[0]
        sh, _, sb = src[1].rpartition("/")
        d1, d2 = self._open_dir((g, sh)), self._open_dir((g, rel))
        n = os.fsdecode(new_name)
        try:
            fd = self._open_shared(g, sb, d1, (node.dev, node.ino))
            try:
                with unsealed(fd, self.immutable, what=self.trees[g].where(src[1])):
                    os.link(sb, n, src_dir_fd=d1, dst_dir_fd=d2, follow_symlinks=False)
            finally:
                os.close(fd)
            st = os.stat(n, dir_fd=d2, follow_symlinks=False)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(d1)
            os.close(d2)
        node.names[(g, _join(rel, n))] = None
        node.lookups += 1
        return self._attr(inode, st)

    # -- extended attributes -----------------------------------------------------------
    # Our own marker (trusted/user.vsstore.*) is invisible and untouchable through the
    # overlay; changing any other xattr of a shared inode copies it up first.

    def _xattr_fd(self, name: Name) -> int:
        tree = self.trees[name[0]]
        try:
            fd = tree.open_beneath(name[1], os.O_PATH) if name[1] else os.dup(tree.fd)
            try:
                mode = os.fstat(fd).st_mode
            finally:
                os.close(fd)
            if stat.S_ISDIR(mode):
                return tree.open_beneath(name[1], os.O_RDONLY | os.O_DIRECTORY)
            if stat.S_ISREG(mode):
                return tree.open_regular(name[1])
        except OSError as e:
            raise _err(e) from None
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # symlinks, fifos: no xattrs here

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        n = os.fsdecode(name)
        if is_ours(n) or inode == ROOT:
            raise pyfuse3.FUSEError(errno.ENODATA)
        fd = self._xattr_fd(self._some_name(self._get(inode)))
        try:
            return os.getxattr(fd, n)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(fd)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode == ROOT:
            return []
        fd = self._xattr_fd(self._some_name(self._get(inode)))
        try:
            return [os.fsencode(n) for n in os.listxattr(fd) if not is_ours(n)]
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(fd)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._change_xattr(inode, os.fsdecode(name), value, ctx)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._change_xattr(inode, os.fsdecode(name), None, ctx)

    async def _change_xattr(self, inode: int, n: str, value: bytes | None,
                            ctx: pyfuse3.RequestContext) -> None:
        if is_ours(n) or inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        node = self._get(inode)
        name, st = self._resolve(node)
        if self._shared(node, name, st):
            name, _ = self._writable_name(ctx, node)
        else:
            self._check_caller(ctx, name[0])
        fd = self._xattr_fd(name)
        try:
            if value is None:
                os.removexattr(fd, n)
            else:
                os.setxattr(fd, n, value)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(fd)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks modes itself

    # -- files -------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.nodes.get(inode)
        if node is None:
            log.debug("open of node %d: not known (forgotten)", inode)
            raise pyfuse3.FUSEError(errno.ESTALE)
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)
        direct = False
        name: Name | None = None
        if node.names:
            try:
                name, st = self._resolve(node)
            except pyfuse3.FUSEError:
                name = None
        if name is None or (writing and self._shared(node, name, st)):
            if not writing and name is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            # The shared inode's page cache must never see this file's data: direct_io.
            name, direct = self._writable_name(ctx, node)
        elif writing:
            self._check_caller(ctx, name[0])
        # Unless copied up just now, the name must still hold this node's inode.
        expect = None if direct else (node.dev, node.ino)
        try:
            fd = self.trees[name[0]].open_regular(name[1], expect=expect, flags=flags)
        except OSError as e:
            raise _err(e) from None
        if direct:
            self.copy_handles.add(fd)
        else:
            node.fhs.add(fd)
            self.handle_node[fd] = node
        return pyfuse3.FileInfo(fh=fd, direct_io=direct, keep_cache=not writing)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        guest, rel, n, dfd = self._in_dir(parent_inode, name, ctx)
        try:
            fd = os.open(n, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode & 0o7777 & ~ctx.umask, dir_fd=dfd)
            os.fchown(fd, ctx.uid, ctx.gid)
            st = os.fstat(fd)
        except OSError as e:
            raise _err(e) from None
        finally:
            os.close(dfd)
        node = self._node(st, (guest, _join(rel, n)))
        node.lookups += 1
        node.st = st
        node.fhs.add(fd)
        self.handle_node[fd] = node
        return pyfuse3.FileInfo(fh=fd), self._attr(node.id, st)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as e:
            raise _err(e) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as e:
            raise _err(e) from None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as e:
            raise _err(e) from None

    async def release(self, fh: int) -> None:
        self.copy_handles.discard(fh)
        node = self.handle_node.pop(fh, None)
        if node is not None:
            node.fhs.discard(fh)
        os.close(fh)


# Every request handler of the overlay goes through _guarded.
for _name, _attr in list(vars(CowFS).items()):
    if not _name.startswith("_") and hasattr(pyfuse3.Operations, _name) and \
            callable(_attr) and getattr(_attr, "__code__", None) is not None and \
            _attr.__code__.co_flags & 0x80:  # CO_COROUTINE
        setattr(CowFS, _name, _guarded(_attr))
