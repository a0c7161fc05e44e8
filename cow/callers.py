"""Which guest is calling: the overlay's caller attribution.

A FUSE request carries the caller's pid, not a path, so the guest a write belongs to is
told from what the kernel gave the process: the pid namespace that ``vserver start`` and
``exec --cow`` made for the guest and attached to the overlay (``attach``, the namespace's
fd passed over the control socket and held here, so its number is never reused) before
anything ran in it; a process in a namespace nested in it counts as well (NS_GET_PARENT).
Never a path: a guest keeps CAP_SYS_CHROOT, so ``/proc/PID/root`` and its root mount are
its to shape.  The host (its pid and mount namespaces, root "/") is told by the last
lookup of a shared inode by that thread (a request's pid is the calling thread's id).
Anyone else is refused (EACCES) a write to a shared file, and any change of a guest's
tree that is not its own.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from dataclasses import dataclass, field

import pyfuse3

from .nodes import Name, Node, Trees

log = logging.getLogger("vsstore.cow")

NS_GET_PARENT = 0xB702  # linux/nsfs.h: _IO(0xb7, 0x2)
NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
CLONE_NEWPID = 0x20000000
MAX_PIDNS_DEPTH = 32  # the kernel's limit on nested pid namespaces


@dataclass(slots=True)
class PidNs:
    """A guest's pid namespace, attached to one or more of the overlay's guests."""

    fd: int
    guests: set[str] = field(default_factory=set)


def _ns_key(pid: int | str, kind: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Callers:
    """The attached pid namespaces, and the names callers looked up last."""

    RECENT_MAX = 1 << 16  # remembered (thread, shared node) lookups

    def __init__(self, trees: Trees) -> None:
        self.trees = trees
        # Which guest a caller is: the pid namespaces that start and exec --cow gave their
        # processes, attached by the lifecycle (held open, so a number is never reused).
        self.pidns: dict[tuple[int, int], PidNs] = {}
        self.own_ns = (_ns_key("self", "pid"), _ns_key("self", "mnt"))
        self.recent: dict[tuple[int, int], Name] = {}  # (tid, node) -> name last looked up

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

    def detach(self, name: str) -> None:
        """Guest ``name`` leaves: a namespace attached to it alone is let go."""
        for key, ns in list(self.pidns.items()):
            ns.guests.discard(name)
            if not ns.guests:
                os.close(ns.fd)
                del self.pidns[key]

    def close(self) -> None:
        for ns in self.pidns.values():
            os.close(ns.fd)
        self.pidns.clear()

    # -- lookups ------------------------------------------------------------------------

    def looked_up(self, pid: int, node: Node, name: Name) -> None:
        """Thread ``pid`` reached the shared ``node`` as ``name`` (newest last; beyond
        RECENT_MAX the oldest goes)."""
        self.recent.pop((pid, node.id), None)
        self.recent[(pid, node.id)] = name
        if len(self.recent) > self.RECENT_MAX:
            del self.recent[next(iter(self.recent))]  # the oldest lookup

    def last_lookup(self, pid: int, node: Node) -> Name | None:
        return self.recent.get((pid, node.id))

    def forget(self, nid: int) -> None:
        """Node ``nid`` is gone: so are the lookups of it."""
        for k in [k for k in self.recent if k[1] == nid]:
            del self.recent[k]

    # -- attribution --------------------------------------------------------------------

    def caller(self, pid: int) -> frozenset[str] | None:
        """Who is calling: None for the host (its pid and mount namespaces, its root "/");
        else the guests attached to the caller's pid namespace or the nearest one it is
        nested in (empty: nobody we know, e.g. a chrooted host process).  Only what the
        kernel gave the process counts, never a path it can shape (a guest may chroot)."""
        first = _ns_key(pid, "pid")  # one system call: a guest's or the host's, mostly
        if first is None:
            return frozenset()
        ns = self.pidns.get(first)
        if ns is not None:
            return frozenset(ns.guests)
        if first == self.own_ns[0]:
            return self._host_or_nobody(pid)
        try:  # nested in a guest's, maybe: walk up its parents
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
                    return self._host_or_nobody(pid)
                try:
                    parent = fcntl.ioctl(fd, NS_GET_PARENT)
                except OSError:
                    return frozenset()
                os.close(fd)
                fd = parent
            return frozenset()
        finally:
            os.close(fd)

    def check(self, ctx: pyfuse3.RequestContext, guest: str) -> None:
        """A change in ``guest``'s tree: refused (EACCES) to a process of another guest or
        of nobody we know.  (A guest cannot reach another's tree through its own root;
        this holds even if it could.)"""
        who = self.caller(ctx.pid)
        if who is not None and not self.mine(guest, who):
            log.warning(
                "pid %d (guests %s) may not change guest %s's tree",
                ctx.pid,
                ", ".join(sorted(who)) or "none",
                guest,
            )
            raise pyfuse3.FUSEError(errno.EACCES)

    def _host_or_nobody(self, pid: int) -> frozenset[str] | None:
        """A process in the host's pid namespace: the host (None) with its root "/" and
        the host's mount namespace, else nobody we know (a chrooted host process)."""
        try:
            root = os.readlink(f"/proc/{pid}/root")
        except OSError:
            return frozenset()
        host = root == "/" and _ns_key(pid, "mnt") == self.own_ns[1]
        return None if host else frozenset()

    def mine(self, guest: str, who: frozenset[str]) -> bool:
        """Is ``guest`` one of ``who``, or the same tree served under another name (two
        exec --cow shares of one guest)?"""
        if guest in who:
            return True
        tree = self.trees.get(guest)
        return tree is not None and any(
            (t := self.trees.get(g)) is not None and (t.dev, t.ino) == (tree.dev, tree.ino)
            for g in who
        )

    def name_of(self, ctx: pyfuse3.RequestContext, node: Node) -> Name:
        """The name through which the calling guest reached ``node``, a shared inode: one
        of its own guest's names (the one it looked up last, if it did); for the host, the
        name this thread looked up last.  A caller we cannot attribute is refused: a write
        attributed to the wrong guest would reach that guest's file."""
        recent = self.recent.get((ctx.pid, node.id))
        who = self.caller(ctx.pid)
        if who is None:  # the host: the name it walked
            if recent is not None:
                return recent
            log.warning(
                "write to shared inode %d by host pid %d: no lookup of it seen", node.ino, ctx.pid
            )
            raise pyfuse3.FUSEError(errno.EACCES)
        if recent is not None and self.mine(recent[0], who):
            return recent
        mine = next((n for n in node.names if self.mine(n[0], who)), None)
        if mine is None:
            log.warning(
                "write to shared inode %d by pid %d (guests %s): none of its names",
                node.ino,
                ctx.pid,
                ", ".join(sorted(who)) or "none",
            )
            raise pyfuse3.FUSEError(errno.EACCES)
        return mine
