"""The iunlink vocabulary: the xattr marker and the immutable flag of shared inodes.

Linux-VServer kernels had an "immutable but unlinkable" inode flag.  Mainline has only
FS_IMMUTABLE_FL, which also forbids unlink, link and rename.  vsstore marks a shared inode
with an xattr (``trusted.vsstore.iunlink`` as root, ``user.vsstore.iunlink`` otherwise: a
guest without CAP_SYS_ADMIN cannot forge a trusted.* marker) and, by default as root, sets
FS_IMMUTABLE_FL so that nobody can change shared content in place.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from . import syscalls

MARKER_TRUSTED = "trusted.vsstore.iunlink"
MARKER_USER = "user.vsstore.iunlink"
OUR_XATTR_PREFIXES = ("trusted.vsstore.", "user.vsstore.")


_MARKER = MARKER_TRUSTED if os.geteuid() == 0 else MARKER_USER


def marker_name() -> str:
    """The marker xattr used by this process: trusted.* needs CAP_SYS_ADMIN (root)."""
    return _MARKER


def is_ours(xattr_name: str) -> bool:
    """Our own bookkeeping xattrs, left out when comparing inode metadata."""
    return xattr_name.startswith(OUR_XATTR_PREFIXES)


@dataclass(frozen=True, slots=True)
class Attrs:
    """What vsattr shows: the iunlink marker, the immutable and append-only flags."""

    iunlink: bool
    immutable: bool
    append: bool

    def letters(self) -> str:
        """util-vserver showattr style: upper case = set."""
        return (
            ("U" if self.iunlink else "u")
            + ("I" if self.immutable else "i")
            + ("A" if self.append else "a")
        )


def has_marker(fd: int) -> bool:
    for name in (MARKER_TRUSTED, MARKER_USER):
        try:
            os.getxattr(fd, name)
            return True
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise
    return False


def set_marker(fd: int) -> None:
    os.setxattr(fd, marker_name(), b"1")


def clear_marker(fd: int) -> None:
    for name in (MARKER_TRUSTED, MARKER_USER):
        try:
            os.removexattr(fd, name)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise


def is_immutable(fd: int) -> bool:
    return bool(syscalls.get_inode_flags(fd) & syscalls.FS_IMMUTABLE_FL)


def set_immutable(fd: int, on: bool) -> bool:
    """Set or clear FS_IMMUTABLE_FL; returns whether it was set before."""
    flags = syscalls.get_inode_flags(fd)
    was = bool(flags & syscalls.FS_IMMUTABLE_FL)
    if was != on:
        new = flags | syscalls.FS_IMMUTABLE_FL if on else flags & ~syscalls.FS_IMMUTABLE_FL
        syscalls.set_inode_flags(fd, new)
    return was


def read_attrs(fd: int) -> Attrs:
    flags = syscalls.get_inode_flags(fd)
    return Attrs(
        iunlink=has_marker(fd),
        immutable=bool(flags & syscalls.FS_IMMUTABLE_FL),
        append=bool(flags & syscalls.FS_APPEND_FL),
    )


def seal(fd: int, immutable: bool, marked: bool | None = None, flags: int | None = None) -> None:
    """Mark an inode shared: marker first, then (optionally) the immutable flag, because
    a set immutable flag forbids further xattr changes.  ``marked``/``flags``: what the
    caller already knows (saves the system calls that would ask again)."""
    if not (has_marker(fd) if marked is None else marked):
        set_marker(fd)
    if immutable:
        f = syscalls.get_inode_flags(fd) if flags is None else flags
        if not f & syscalls.FS_IMMUTABLE_FL:
            syscalls.set_inode_flags(fd, f | syscalls.FS_IMMUTABLE_FL)


def unseal_tree(path: str | os.PathLike[str]) -> None:
    """Clear the immutable flag on every file below ``path`` (host-side teardown of demo and
    test trees, before removing them).  Does not follow symlinks."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(
                    os.path.join(dirpath, name),
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                )
            except OSError:
                continue
            try:
                clear_flags(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def clear_flags(fd: int) -> None:
    """Clear the immutable and append-only flags (both forbid unlink) of an open file."""
    flags = syscalls.get_inode_flags(fd)
    if flags & (syscalls.FS_IMMUTABLE_FL | syscalls.FS_APPEND_FL):
        syscalls.set_inode_flags(fd, flags & ~(syscalls.FS_IMMUTABLE_FL | syscalls.FS_APPEND_FL))
