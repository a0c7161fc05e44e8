"""Safe access to a guest's root tree: the one place where guest paths are resolved.

A guest tree is hostile: any component may be a symlink pointing out of it (``var/lock ->
/lib``), a directory may be swapped for a symlink between two calls, a mount may hide another
filesystem.  So every path below the guest root is resolved by the kernel relative to a
directory fd of the root, with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV``
(openat2), or, on kernels without openat2, one component at a time with ``O_NOFOLLOW`` and a
device check.  Paths here are relative to the root, '/'-separated, without a leading slash.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from . import syscalls
from .errors import ConfigError, UnsafeTreeError
from .names import shown

_STRICT = (
    syscalls.RESOLVE_BENEATH
    | syscalls.RESOLVE_NO_SYMLINKS
    | syscalls.RESOLVE_NO_MAGICLINKS
    | syscalls.RESOLVE_NO_XDEV
)


def split_rel(rel: str) -> tuple[str, str]:
    """'usr/bin/ls' -> ('usr/bin', 'ls')."""
    head, _, tail = rel.rpartition("/")
    return head, tail


def _reopen_regular(pfd: int, rel: str, expect: tuple[int, int] | None, flags: int) -> int:
    """``pfd`` (O_PATH) checked to be a regular file (and the inode ``expect``ed), then
    reopened with ``flags``."""
    st = os.fstat(pfd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.ESTALE, "not a regular file any more", rel)
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        raise OSError(errno.ESTALE, "replaced by another file", rel)
    # O_NOFOLLOW was honoured by the O_PATH open; on the reopen through the magic
    # link it would only fail with ELOOP.
    flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECTORY | os.O_NOFOLLOW)
    return os.open(f"/proc/self/fd/{pfd}", flags | os.O_NONBLOCK | os.O_CLOEXEC)


def open_regular_at(
    dirfd: int, name: str, expect: tuple[int, int] | None = None, flags: int = os.O_RDONLY
) -> int:
    """Open entry ``name`` of directory ``dirfd`` if it is a regular file (never a symlink,
    device or fifo: see ``GuestTree.open_regular``)."""
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        return _reopen_regular(pfd, name, expect, flags)
    finally:
        os.close(pfd)


def lstat_entry(
    entry: os.DirEntry[str], prefix: str, on_error: Callable[[str, OSError], None] | None
) -> os.stat_result | None:
    """A listed entry's lstat; None if it is gone since, or cannot be read (told to
    ``on_error`` with its path, ``prefix`` + its name)."""
    try:
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        if on_error:
            on_error(prefix + entry.name, e)
        return None


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` lies on (/proc/self/fdinfo: every kernel since 3.15)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo")


def open_child_dir(dirfd: int, name: str) -> int:
    """Open subdirectory ``name`` (one component) of ``dirfd`` without following a symlink
    and without crossing into a mount, also a bind mount of the same filesystem (ELOOP,
    ENOTDIR or EXDEV)."""
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, "not a directory entry's name", name)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    if syscalls.have_openat2():
        return syscalls.openat2(dirfd, name, flags, _STRICT)
    fd = os.open(name, flags, dir_fd=dirfd)
    if mount_id(fd) != mount_id(dirfd):
        os.close(fd)
        raise OSError(errno.EXDEV, "a mount point", name)
    return fd


class GuestTree:
    """One guest root tree, held open as a directory fd for the object's lifetime."""

    def __init__(self, root: str | os.PathLike[str], name: str | None = None) -> None:
        self.root = Path(root)
        self.name = name or self.root.name
        try:
            # The root path itself comes from the host's configuration (vdir may be a
            # symlink there), so following it is fine; nothing below it is followed.
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(
                f"guest '{shown(self.name)}': root tree {shown(self.root)} does not exist"
            ) from None
        except NotADirectoryError:
            raise ConfigError(
                f"guest '{shown(self.name)}': {shown(self.root)} is not a directory"
            ) from None
        st = os.fstat(self.fd)
        self.dev = st.st_dev
        self.ino = st.st_ino

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GuestTree({self.name!r}, {str(self.root)!r})"

    def where(self, rel: str) -> str:
        """``NAME:/REL``: how messages name a file of this guest (``names.shown``, so a
        hostile name can neither break a line nor fail to print)."""
        return f"{shown(self.name)}:/{shown(rel)}"

    # -- resolution ---------------------------------------------------------------------

    def open_beneath(self, rel: str, flags: int = os.O_RDONLY, mode: int = 0) -> int:
        """Open ``rel`` below the root without following any symlink or leaving the
        filesystem.  Raises OSError (ELOOP for a symlink, EXDEV for a mount crossing)."""
        if not rel or rel == ".":
            return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=self.fd)
        if rel.startswith("/") or "\0" in rel:
            raise OSError(errno.EINVAL, "not a relative guest path", rel)
        if syscalls.have_openat2():
            return syscalls.openat2(self.fd, rel, flags | os.O_NOFOLLOW, _STRICT, mode)
        return self._open_by_components(rel, flags, mode)

    def _open_by_components(self, rel: str, flags: int, mode: int) -> int:
        parts = [p for p in rel.split("/") if p and p != "."]
        if ".." in parts:
            raise OSError(errno.EXDEV, "'..' in a guest path", rel)
        fd = os.dup(self.fd)
        try:
            for part in parts[:-1]:
                nfd = os.open(
                    part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
                os.close(fd)
                fd = nfd
                if os.fstat(fd).st_dev != self.dev:
                    raise OSError(errno.EXDEV, "crosses a mount point", rel)
            res = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        finally:
            os.close(fd)
        if os.fstat(res).st_dev != self.dev:
            os.close(res)
            raise OSError(errno.EXDEV, "crosses a mount point", rel)
        return res

    def open_regular(
        self,
        rel: str,
        expect: tuple[int, int] | None = None,
        dirfd: int | None = None,
        flags: int = os.O_RDONLY,
    ) -> int:
        """Open a regular file without ever opening anything else: the name is first opened
        with O_PATH (which has no side effects, even on a device node a guest swapped in),
        checked to be a regular file (and the inode ``expect``ed, if given), and only then
        reopened with ``flags`` (O_CREAT/O_EXCL make no sense here and are dropped).  With
        ``dirfd``, ``rel`` is a name in that directory.  Raises OSError (ENOENT, ELOOP,
        EXDEV, or ESTALE for "not what was expected")."""
        if dirfd is None:
            pfd = self.open_beneath(rel, os.O_PATH)
            try:
                return _reopen_regular(pfd, rel, expect, flags)
            finally:
                os.close(pfd)
        return open_regular_at(dirfd, rel, expect, flags)

    def open_in_root(self, rel: str, flags: int = os.O_RDONLY) -> int:
        """Open ``rel`` as the guest itself would see it: symlinks are followed but resolved
        as if the guest root were '/', so they can never lead out (RESOLVE_IN_ROOT)."""
        if not syscalls.have_openat2():
            raise UnsafeTreeError("this kernel lacks openat2; cannot resolve guest symlinks safely")
        return syscalls.openat2(
            self.fd,
            rel.lstrip("/") or ".",
            flags,
            syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS,
        )

    def open_parent(self, rel: str) -> tuple[int, str]:
        """Directory fd of ``rel``'s parent, and ``rel``'s last component."""
        head, tail = split_rel(rel)
        return self.open_beneath(head, os.O_RDONLY | os.O_DIRECTORY), tail

    # -- walking ------------------------------------------------------------------------

    def walk(
        self,
        prune_dir: Callable[[str], bool] | None = None,
        on_error: Callable[[str, OSError], None] | None = None,
        start: str = "",
        on_other: Callable[[str, os.stat_result], object] | None = None,
    ) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (rel, lstat) for every regular file, depth first, never following a
        symlink and never descending into another filesystem.  ``prune_dir(rel)`` may skip
        a directory; ``on_error(rel, exc)`` hears about directories that could not be read.
        ``start`` walks only that subtree.  ``on_other(rel, lstat)`` hears about every other entry on this filesystem (directories,
        symlinks, devices: what ``du -x`` counts besides files), the start directory not
        included."""
        for prefix, entries in self.listings(prune_dir, on_error, start, on_other):
            for entry in entries:
                st = lstat_entry(entry, prefix, on_error)
                if st is None:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield prefix + entry.name, st
                elif on_other is not None:  # it changed kind since it was listed
                    on_other(prefix + entry.name, st)

    def listings(
        self,
        prune_dir: Callable[[str], bool] | None = None,
        on_error: Callable[[str, OSError], None] | None = None,
        start: str = "",
        on_other: Callable[[str, os.stat_result], object] | None = None,
    ) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
        """The walk's directories, depth first, one at a time: (prefix, entries), where
        ``prefix`` is the directory's path with a trailing slash (empty at the root) and
        ``entries`` those its listing says are regular files, unstat'ed (their
        ``inode()``, ``name`` and ``stat(follow_symlinks=False)`` are valid until the next
        step).  Lets a caller with its own loop (unify/scan.py) pay for a name only what it
        needs: most names of a unified guest need no syscall at all.  Directories are
        stat'ed (another filesystem is never entered; one swapped during the walk is
        skipped), and so is everything else, for ``on_other`` only.  Arguments as for
        ``walk``."""
        start = start.strip("/")
        if start:
            fd = self.open_beneath(start, os.O_RDONLY | os.O_DIRECTORY)
            try:
                ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
        else:
            ino = self.ino
        stack: list[tuple[str, int]] = [(start, ino)]
        while stack:
            rel, ino = stack.pop()
            try:
                fd = self.open_beneath(rel, os.O_RDONLY | os.O_DIRECTORY)
            except OSError as e:
                if on_error:
                    on_error(rel, e)
                continue
            subdirs: list[tuple[str, int]] = []
            try:
                dst = os.fstat(fd)
                if dst.st_ino != ino or dst.st_dev != self.dev:
                    # Swapped for another directory between listing and opening: skip.
                    if on_error:
                        on_error(
                            rel, OSError(errno.ESTALE, "directory changed during the walk", rel)
                        )
                    continue
                prefix = rel + "/" if rel else ""
                files: list[os.DirEntry[str]] = []
                with os.scandir(fd) as it:
                    for entry in it:
                        try:
                            if entry.is_file(follow_symlinks=False):
                                files.append(entry)
                                continue
                            if on_other is None and not entry.is_dir(follow_symlinks=False):
                                continue
                        except OSError:
                            pass  # the lstat below tells
                        st = lstat_entry(entry, prefix, on_error)
                        if st is None:
                            continue
                        if stat.S_ISREG(st.st_mode):
                            files.append(entry)  # it became one since it was listed
                        elif stat.S_ISDIR(st.st_mode):
                            child = prefix + entry.name
                            if st.st_dev != self.dev:
                                continue  # a mount point: another filesystem
                            if prune_dir is not None and prune_dir(child):
                                continue
                            if on_other is not None:
                                on_other(child, st)
                            subdirs.append((child, st.st_ino))
                        elif on_other is not None:
                            on_other(prefix + entry.name, st)
                if files:
                    yield prefix, files
            except OSError as e:
                if on_error:
                    on_error(rel, e)
            finally:
                os.close(fd)
            subdirs.reverse()
            stack.extend(subdirs)
