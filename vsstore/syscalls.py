"""The one place for system calls Python's ``os`` module lacks (ctypes), and their constants.

Everything that needs openat2, renameat2, linkat(AT_EMPTY_PATH), inode flags or file
leases calls it from here, so a kernel difference is handled once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86_64 and aarch64 share the generic numbers for these recent calls.
SYS_openat2 = 437
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_FOLLOW = 0x400

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

# linux/fs.h: FS_IOC_GETFLAGS/SETFLAGS are declared with 'long' but the kernel moves an int.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020

PR_GET_SECUREBITS = 27
PR_SET_SECUREBITS = 28
SECBIT_NO_SETUID_FIXUP = 1 << 2  # linux/securebits.h: fsuid changes keep capabilities

F_SETLEASE = 1024
F_GETLEASE = 1025


def _check(ret: int, what: str, path: object = None) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        if path is None:
            raise OSError(e, f"{what}: {os.strerror(e)}")
        raise OSError(e, os.strerror(e), path)
    return ret


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_openat2_works: bool | None = None


def have_openat2() -> bool:
    """Whether this kernel has openat2(2) (Linux >= 5.6)."""
    global _openat2_works
    if _openat2_works is None:
        how = _OpenHow(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_BENEATH)
        fd = _libc.syscall(SYS_openat2, AT_FDCWD, b"/", ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            os.close(fd)
            _openat2_works = True
        else:
            _openat2_works = ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works


_hows: dict[tuple[int, int, int], tuple[_OpenHow, Any]] = {}  # (flags, mode, resolve) ->


def _how(flags: int, mode: int, resolve: int) -> tuple[_OpenHow, Any]:
    """The open_how of these arguments and a reference to it, made once (a few per run):
    ctypes structures are slow to build, and openat2 runs once per file hashed."""
    key = (flags, mode, resolve)
    got = _hows.get(key)
    if got is None:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        got = _hows[key] = (how, ctypes.byref(how))
    return got


_HOW_SIZE = ctypes.sizeof(_OpenHow)


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2); raises OSError with the path on failure (EINTR/EAGAIN retried)."""
    ref = _how(flags, mode, resolve)[1]
    raw = os.fsencode(path)
    while True:
        fd = _libc.syscall(SYS_openat2, dirfd, raw, ref, _HOW_SIZE)
        if fd >= 0:
            return fd
        e = ctypes.get_errno()
        if e not in (errno.EINTR, errno.EAGAIN):
            raise OSError(e, os.strerror(e), path)


def renameat2(olddirfd: int, old: str, newdirfd: int, new: str, flags: int = 0) -> None:
    """renameat2(2): RENAME_EXCHANGE swaps two names atomically."""
    ret = _libc.renameat2(olddirfd, os.fsencode(old), newdirfd, os.fsencode(new), flags)
    _check(ret, "renameat2", new)


def link_fd(fd: int, newdirfd: int, newname: str) -> None:
    """Give the open file ``fd`` a new name: exactly the inode we hold, not whatever a path
    names now.  Needs CAP_DAC_READ_SEARCH; without it, falls back to /proc/self/fd."""
    ret = _libc.linkat(fd, b"", newdirfd, os.fsencode(newname), AT_EMPTY_PATH)
    if ret == 0:
        return
    e = ctypes.get_errno()
    if e != errno.ENOENT and e != errno.EPERM:
        raise OSError(e, os.strerror(e), newname)
    ret = _libc.linkat(
        AT_FDCWD, f"/proc/self/fd/{fd}".encode(), newdirfd, os.fsencode(newname), AT_SYMLINK_FOLLOW
    )
    _check(ret, "linkat", newname)


def get_inode_flags(fd: int) -> int:
    """FS_IOC_GETFLAGS; 0 where the filesystem has no flags."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return 0
        raise
    return struct.unpack("i", buf)[0] & 0xFFFFFFFF


def set_inode_flags(fd: int, flags: int) -> None:
    """FS_IOC_SETFLAGS (needs CAP_LINUX_IMMUTABLE for the immutable/append flags)."""
    buf = bytearray(struct.pack("I", flags & 0xFFFFFFFF))
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, True)


_lease_signal_ready = False


def ignore_lease_signal() -> None:
    """A broken lease sends SIGIO, whose default action ends the process.  Lease holders
    poll the lease state instead, so the signal itself is ignored (main thread only)."""
    global _lease_signal_ready
    if not _lease_signal_ready:
        signal.signal(signal.SIGIO, signal.SIG_IGN)
        _lease_signal_ready = True


def take_read_lease(fd: int) -> bool:
    """Take a read lease on ``fd`` (opened read-only).  The kernel grants it only while no
    one has the file open for writing, and breaks it the moment someone tries to open it for
    writing or to truncate it; that opener then waits until we let go.  So: lease taken and
    still held afterwards = nobody wrote the file meanwhile.  Returns False when the file is
    open for writing now (EAGAIN) or leases are not possible (EACCES, EINVAL)."""
    ignore_lease_signal()
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY, errno.EACCES, errno.EINVAL):
            return False
        raise
    return True


def release_lease(fd: int) -> None:
    """Let go of our lease on ``fd``, if it still has one (a broken lease is gone already)."""
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EINVAL, errno.EBADF):
            raise


def lease_held(fd: int) -> bool:
    """True while the read lease on ``fd`` has not been broken by a would-be writer."""
    return fcntl.fcntl(fd, F_GETLEASE) == fcntl.F_RDLCK


def fs_type(fd: int) -> int:
    """statfs(2)'s f_type (the filesystem's magic number) of an open file; 0 if unknown.
    ``os.fstatvfs`` does not return it."""
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) comes first
    if _libc.fstatfs(ctypes.c_int(fd), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def seal_memfd(fd: int) -> None:
    """Seal a memfd for good: no write, resize or further seal (what the helper and the
    syscall filter are handed in, so nothing can change them after they are checked)."""
    fcntl.fcntl(
        fd,
        fcntl.F_ADD_SEALS,
        fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
    )


@contextmanager
def fs_ids(uid: int, gid: int) -> Iterator[None]:
    """In the block, the calling thread makes files as ``uid``:``gid`` (its filesystem ids,
    setfsuid(2): per thread) and keeps its capabilities (SECBIT_NO_SETUID_FIXUP), so a node
    is born with its owner and never needs a chown by name afterwards, and the caller's
    permission checks stay the kernel's job before the request (FUSE's default_permissions).
    A setgid directory still gives its group, as for any maker.  Ids the thread has
    already (its effective ones: the daemon's root making a node for root) change nothing."""
    if uid == os.geteuid() and gid == os.getegid():
        yield
        return
    bits = _check(_libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0), "prctl(PR_GET_SECUREBITS)")
    _check(
        _libc.prctl(PR_SET_SECUREBITS, bits | SECBIT_NO_SETUID_FIXUP, 0, 0, 0),
        "prctl(PR_SET_SECUREBITS)",
    )
    old_gid = _libc.setfsgid(ctypes.c_uint(gid))
    old_uid = _libc.setfsuid(ctypes.c_uint(uid))
    try:
        # setfsuid answers the previous id, success or not: ask again (-1 changes nothing)
        if _libc.setfsuid(ctypes.c_uint(0xFFFFFFFF)) != uid:
            raise OSError(errno.EPERM, f"setfsuid({uid}) refused")
        if _libc.setfsgid(ctypes.c_uint(0xFFFFFFFF)) != gid:
            raise OSError(errno.EPERM, f"setfsgid({gid}) refused")
        yield
    finally:
        _libc.setfsuid(ctypes.c_uint(old_uid))
        _libc.setfsgid(ctypes.c_uint(old_gid))
        _libc.prctl(PR_SET_SECUREBITS, bits, 0, 0, 0)
