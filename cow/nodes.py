"""The overlay's node table: FUSE node ids for backing inodes, and the names they were reached by.

A node id is the backing inode's number (a fresh one above 2**48 when two filesystems'
numbers collide), so an inode shared by several guests is one FUSE node and one page cache.
Each node keeps the (guest, path) names it was reached by; a name is checked to still hold
the node's inode before it is used, and dropped when it does not (copied up, replaced).

The kernel keeps a symlink's target once read (FUSE_CAP_CACHE_SYMLINKS) for as long as it
holds the node, so a node id never passes to another symlink: a symlink node remembers the
target it answered, and an inode number that comes back holding another target (the old
symlink removed, its number given to a new one) gets a node of its own.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyfuse3

from vsstore.safetree import GuestTree

log = logging.getLogger("vsstore.cow")

ROOT = pyfuse3.ROOT_INODE
Name = tuple[str, str]  # (guest, path relative to its root; '' for the root)
Trees = Mapping[str, GuestTree]  # the overlay's guests by name (shared with CowFS)


@dataclass(slots=True)
class Node:
    id: int
    dev: int
    ino: int
    names: dict[Name, None] = field(default_factory=dict)  # an ordered set
    lookups: int = 0
    st: os.stat_result | None = None  # last seen: answers getattr once no name is left
    fhs: set[int] = field(default_factory=set)  # open handles on this very inode
    target: bytes | None = None  # a symlink's target, once the kernel was told it


def fuse_error(e: OSError) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e.errno or errno.EIO)


def join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def open_name_dir(trees: Trees, name: Name) -> int:
    """A guest directory by name, opened beneath its root (no symlink, no mount crossed).
    Whether it is some node's inode is the caller's to check (see Nodes.open_dir)."""
    tree = trees[name[0]]
    try:
        return tree.open_beneath(name[1], os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise fuse_error(e) from None


def lstat(trees: Trees, name: Name) -> os.stat_result:
    """What a guest's name holds now (the name itself, never a symlink's target)."""
    tree = trees.get(name[0])
    if tree is None:
        raise pyfuse3.FUSEError(errno.ENOENT)
    if not name[1]:
        return os.fstat(tree.fd)
    head, _, tail = name[1].rpartition("/")
    dfd = open_name_dir(trees, (name[0], head))
    try:
        return os.stat(tail, dir_fd=dfd, follow_symlinks=False)
    except OSError as e:
        raise fuse_error(e) from None
    finally:
        os.close(dfd)


def link_target(trees: Trees, name: Name, key: tuple[int, int]) -> bytes | None:
    """The target of the symlink ``name`` if that name still holds the inode ``key``, read
    through a descriptor of that very inode (no swap between the check and the read); None
    if it does not, or cannot be read."""
    tree = trees.get(name[0])
    if tree is None or not name[1]:
        return None
    try:
        fd = tree.open_beneath(name[1], os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key or not stat.S_ISLNK(st.st_mode):
            return None
        return os.fsencode(os.readlink("", dir_fd=fd))
    except OSError:
        return None
    finally:
        os.close(fd)


class Nodes:
    """Node ids by backing inode, and each node's names."""

    def __init__(self, trees: Trees) -> None:
        self.trees = trees
        self.nodes: dict[int, Node] = {}
        self.by_inode: dict[tuple[int, int], int] = {}
        self.next_id = 1 << 48  # for inode numbers that collide (another filesystem)

    def node(self, st: os.stat_result, name: Name) -> Node:
        """The node of the inode ``st``, reached (now) as ``name``."""
        key = (st.st_dev, st.st_ino)
        nid = self.by_inode.get(key)
        if nid is not None and stat.S_ISLNK(st.st_mode):
            old = self.nodes[nid]
            if old.target is not None and link_target(self.trees, name, key) != old.target:
                # Another symlink under the old one's number (or one we cannot read): the
                # kernel may still hold the old node and its target; this one is new.
                old.names.clear()
                nid = None
        if nid is None:
            nid = (
                st.st_ino if st.st_ino not in self.nodes and st.st_ino != ROOT else self._fresh_id()
            )
            self.by_inode[key] = nid
            self.nodes[nid] = Node(nid, st.st_dev, st.st_ino)
        node = self.nodes[nid]
        node.names[name] = None
        return node

    def _fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def get(self, nid: int) -> Node:
        """A node the kernel names; ESTALE once forgotten."""
        node = self.nodes.get(nid)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def find(self, st: os.stat_result) -> Node | None:
        """The node of the inode ``st``, if the kernel knows it."""
        return self.nodes.get(self.by_inode.get((st.st_dev, st.st_ino), -1))

    def forget(self, nid: int, n: int) -> bool:
        """The kernel forgot ``n`` lookups of ``nid``; True if that was the last."""
        node = self.nodes.get(nid)
        if node is None:
            return False
        node.lookups -= n
        if node.lookups > 0:
            return False
        del self.nodes[nid]
        if self.by_inode.get((node.dev, node.ino)) == nid:  # not passed on to a new node
            del self.by_inode[(node.dev, node.ino)]
        return True

    def let_go(self, node: Node, name: Name, left: int) -> None:
        """``name`` no longer holds ``node``'s inode (removed, renamed over, copied up
        through the overlay), which ``left`` guest names may still hold (not counting the
        store's).  With none left the inode may be freed (a store object by vsunify, once
        every guest copied it up) and the filesystem give its number to the next inode it
        makes, in any guest, while the kernel still holds this node (an open file, an O_PATH
        descriptor): that inode gets a node of its own, never this one (reopened through
        /proc, it would open the new file)."""
        node.names.pop(name, None)
        if left <= 0 and self.by_inode.get((node.dev, node.ino)) == node.id:
            del self.by_inode[(node.dev, node.ino)]

    def drop_guest(self, guest: str) -> None:
        """A guest leaves the overlay: none of its names leads to a node any more."""
        for node in self.nodes.values():
            for n in [n for n in node.names if n[0] == guest]:
                del node.names[n]

    def some_name(self, node: Node) -> Name:
        return self.resolve(node)[0]

    def resolve(self, node: Node) -> tuple[Name, os.stat_result]:
        """A name of ``node`` that still holds its inode, and its stat."""
        found = self.holding(node)
        if found is None:
            log.debug("node %d (inode %d): no name holds it any more", node.id, node.ino)
            raise pyfuse3.FUSEError(errno.ESTALE)
        node.st = found[1]
        return found

    def holding(
        self,
        node: Node,
        guest: str | None = None,
        prefer: Name | None = None,
    ) -> tuple[Name, os.stat_result] | None:
        """A name of ``node`` (in ``guest``, ``prefer`` first) that still holds its inode,
        and its stat.  Names that now hold something else (copied up, replaced) are
        dropped on the way."""
        for n in ([prefer] if prefer is not None else []) + list(node.names):
            if (
                n[0] not in self.trees
                or (guest is not None and n[0] != guest)
                or n not in node.names
            ):
                continue
            try:
                st = lstat(self.trees, n)
            except pyfuse3.FUSEError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == (node.dev, node.ino):
                return n, st
            del node.names[n]
        return None

    def open_dir(self, nid: int) -> tuple[Name, int]:
        """A directory node's name and a descriptor of it, opened beneath its guest's root
        and checked to be the node's inode (names that hold something else are dropped):
        one open and one fstat, where checking the name and then opening it walked the path
        twice.  The caller closes the descriptor."""
        node = self.get(nid)
        for n in list(node.names):
            tree = self.trees.get(n[0])
            if tree is None:
                continue
            try:
                fd = tree.open_beneath(n[1], os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                del node.names[n]
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                node.st = st
                return n, fd
            os.close(fd)
            del node.names[n]
        log.debug("node %d (inode %d): no name holds it any more", node.id, node.ino)
        raise pyfuse3.FUSEError(errno.ESTALE)
