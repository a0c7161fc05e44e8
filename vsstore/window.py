"""The one way to lift a shared inode's seal for a moment: a leased, verified window.

FS_IMMUTABLE_FL forbids unlink, link and rename of a shared inode's names, so giving one
guest its own copy, removing one guest's name or linking one more name needs the flag off
for a moment.  In that moment every other guest's name reaches a writable inode.  A window
therefore:

1. takes a **read lease** on the inode first (granted only while nobody has it open for
   writing; refused: ``SharedInodeBusy``, nothing is unsealed);
2. remembers its metadata (mode, owner, mtime, inode flags, every xattr but our marker) or
   takes the caller's verified ``expect``;
3. lifts the flag, runs the caller's operation, seals again;
4. **verifies**: metadata changed meanwhile (chmod, chown, utimes, setxattr do not break a
   lease) is restored (and the restoration checked) while the lease is still held;
5. a would-be writer that arrived in the window is blocked in the kernel by our lease (open
   for writing and truncate break it and wait).  It passed its permission check while the
   flag was off, so it is stopped (SIGSTOP interrupts the wait) before the lease is
   released and continued afterwards: its open or truncate starts again from the path walk
   and meets the seal (EPERM).  Nobody gets a writable descriptor out of a window;
6. after releasing, a fresh lease is tried: refused means a writer got through anyway (it
   passed its permission check while the flag was off but reached the lease only after we
   let go; it happens about once in a thousand windows under a hammering writer).  ext4
   refuses every write to an immutable inode, also through open descriptors, so its data
   is safe, but such a descriptor would keep every later window from opening: its holder
   is killed.  Where the filesystem lets it write despite the seal (XFS, btrfs: checked),
   the caller's ``on_writer`` moves the names it knows to a fresh copy as well.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from . import attrs, syscalls
from .hashing import read_xattrs

log = logging.getLogger("vsstore")

RESTORE_TRIES = 50
EXT4_SUPER_MAGIC = 0xEF53
# Filesystems that refuse writes to an immutable inode through descriptors opened before
# the flag was set (ext4 since Linux 5.4; XFS and btrfs let them write: checked).
ENFORCING = {EXT4_SUPER_MAGIC}


class SharedInodeBusy(OSError):
    """The shared inode is open for writing: no window may open on it now."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EBUSY, f"{what}: open for writing by another process; not unsealed")


class MetadataNotRestored(OSError):
    """Someone kept changing the shared inode's metadata while we restored it."""

    def __init__(self, what: str) -> None:
        super().__init__(
            errno.EAGAIN,
            f"{what}: its metadata kept changing during an unseal window and could not be restored",
        )


@dataclass(frozen=True, slots=True)
class Meta:
    """What must not change on a shared inode while it is unsealed."""

    mode: int
    uid: int
    gid: int
    mtime_ns: int
    flags: int  # inode flags other than immutable
    xattrs: tuple[tuple[str, bytes], ...]  # every xattr but our marker

    @classmethod
    def of(cls, fd: int) -> Meta:
        return cls.parts(os.fstat(fd), tuple(read_xattrs(fd)), syscalls.get_inode_flags(fd))

    @classmethod
    def parts(cls, st: os.stat_result, xattrs: Sequence[tuple[str, bytes]], flags: int) -> Meta:
        """From what a caller read and verified (xattrs without our marker)."""
        return cls(
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            flags & ~syscalls.FS_IMMUTABLE_FL,
            tuple(xattrs),
        )


def enforced(fd: int) -> bool:
    """Does this file's filesystem refuse writes to an immutable inode also through
    descriptors opened before the flag was set?"""
    return syscalls.fs_type(fd) in ENFORCING


def _restore(fd: int, want: Meta) -> None:
    """Put ``want``'s metadata back on the (unsealed) inode."""
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (want.uid, want.gid):
        os.fchown(fd, want.uid, want.gid)  # clears set-id bits and file capabilities: first
    if os.fstat(fd).st_mode != want.mode:
        os.fchmod(fd, want.mode & 0o7777)
    have = dict(read_xattrs(fd))
    wanted = dict(want.xattrs)
    for n in have.keys() - wanted.keys():
        os.removexattr(fd, n)
    for n, v in wanted.items():
        if have.get(n) != v:
            os.setxattr(fd, n, v)
    flags = syscalls.get_inode_flags(fd)
    if flags & ~syscalls.FS_IMMUTABLE_FL != want.flags:
        syscalls.set_inode_flags(fd, want.flags | (flags & syscalls.FS_IMMUTABLE_FL))
    if os.fstat(fd).st_mtime_ns != want.mtime_ns:
        os.utime(fd, ns=(os.fstat(fd).st_atime_ns, want.mtime_ns))


# -- would-be writers ----------------------------------------------------------------------


def breakers(fd: int) -> list[int]:
    """Pids waiting for our lease on ``fd`` to go (openers for writing, truncaters), from
    /proc/locks: the lines marked ``->`` under our lease's line."""
    st = os.fstat(fd)
    me = os.getpid()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    try:
        with open("/proc/locks") as f:
            ours = None
            for line in f:
                fields = line.split()
                if len(fields) < 5:
                    continue
                if fields[1] == "->":
                    if ours is not None and fields[0] == ours and fields[2] == "LEASE":
                        out.append(int(fields[5]))
                    continue
                ours = (
                    fields[0]
                    if (fields[1] == "LEASE" and fields[4] == str(me) and fields[5] == dev)
                    else None
                )
    except (OSError, ValueError, IndexError):
        pass
    return out


def _stop(pids: list[int], fd: int) -> list[int]:
    """Stop each waiter (the stop interrupts its wait; once continued, its system call starts
    again from the beginning) and wait until none waits on the lease any more.  A waiter
    that does not leave the wait is killed.  Our own process is never a waiter in use (no
    part of vsstore opens a shared inode for writing); it could not be stopped alone."""
    stopped = []
    for pid in pids:
        if pid == os.getpid():
            log.error("a thread of this process waits to write a shared inode")
            continue
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while (left := [p for p in breakers(fd) if p in stopped]) and time.monotonic() < deadline:
        time.sleep(0.001)
    for pid in left:
        log.warning("pid %d still waits to write a shared inode after SIGSTOP; killed", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stopped


def _lease(fd: int, what: str) -> bool:
    """Take a read lease: False while someone has the file open for writing.  Leases that
    cannot work at all (switched off by fs.leases-enable) are an error: no window then."""
    syscalls.ignore_lease_signal()
    try:
        fcntl.fcntl(fd, syscalls.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EBUSY):
            return False
        raise OSError(
            e.errno,
            f"{what}: cannot take a read lease ({e.strerror}); vsstore "
            f"needs file leases (sysctl fs.leases-enable=1)",
        ) from None
    return True


def writer_pids(fd: int) -> list[int]:
    """Processes holding the inode of ``fd`` open for writing (for the message)."""
    st = os.fstat(fd)
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            for n in os.listdir(f"/proc/{pid}/fd"):
                try:
                    s = os.stat(f"/proc/{pid}/fd/{n}")
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as f:
                    flags = next((int(x.split()[1], 8) for x in f if x.startswith("flags:")), 0)
                if flags & os.O_ACCMODE != os.O_RDONLY:
                    out.append(int(pid))
                    break
        except OSError:
            continue
    return out


# -- the window ---------------------------------------------------------------------------


@contextmanager
def unsealed(
    fd: int,
    immutable: bool = True,
    *,
    what: str = "shared inode",
    expect: Meta | None = None,
    seal: bool = False,
    on_writer: Callable[[int], None] | None = None,
) -> Iterator[None]:
    """Run the body with the immutable flag of the shared inode open as ``fd`` (read-only)
    lifted, guarded as the module says.  ``immutable``: the flag is our policy (False: no
    flag to lift, nothing to guard).  ``expect``: the metadata the inode must have afterwards
    (default: what it has now).  ``seal``: seal it afterwards even if it was not sealed
    before (a new store object).  ``on_writer(fd)``: a writer got a descriptor on a
    filesystem that lets it write despite the flag; move the names you know elsewhere."""
    was = immutable and attrs.is_immutable(fd)
    if not was and not seal:
        yield
        return
    if not syscalls.lease_held(fd) and not _lease(fd, what):
        raise SharedInodeBusy(what)
    stopped: list[int] = []
    try:
        want = expect if expect is not None else Meta.of(fd)
        if was:
            attrs.set_immutable(fd, False)
        try:
            yield
        finally:
            attrs.seal(fd, immutable)
            if not syscalls.lease_held(fd):
                stopped = _stop(breakers(fd), fd)
            _verify(fd, want, what, immutable)
    finally:
        syscalls.release_lease(fd)
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    if stopped:
        log.warning(
            "%s: %d process(es) tried to open it for writing while it was unsealed "
            "(pids %s); refused",
            what,
            len(stopped),
            ", ".join(map(str, stopped)),
        )
    if not _pinned(fd, what):
        return
    # A writer got a descriptor anyway: it passed its permission check while the flag was
    # off and reached the lease only after we let go.  Holding a shared inode open for
    # writing is never legitimate (outside a window the seal refuses it), and while it is
    # held no window can open on the inode again: it is ended.  (Its descriptor may be
    # installed a moment after we notice: look again until the inode is free.)
    if not enforced(fd) and on_writer is not None:
        on_writer(fd)  # it may write despite the seal: move the names the caller knows
    killed: set[int] = set()
    deadline = time.monotonic() + 2.0
    while _pinned(fd, what):
        if time.monotonic() > deadline:
            log.error("%s: still open for writing by a process we could not find", what)
            break
        for pid in writer_pids(fd):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
    if killed:
        log.error(
            "%s: process(es) %s got it open for writing by racing an unseal window; killed",
            what,
            ", ".join(map(str, sorted(killed))),
        )


def _pinned(fd: int, what: str) -> bool:
    """Does anybody hold the inode open for writing (no read lease can be had)?"""
    if _lease(fd, what):
        syscalls.release_lease(fd)
        return False
    return True


def _verify(fd: int, want: Meta, what: str, immutable: bool) -> None:
    """After sealing: the metadata must be ``want``'s; restore it (unsealing for a moment,
    lease still held) until a check after sealing holds."""
    for _ in range(RESTORE_TRIES):
        now = Meta.of(fd)
        if now == want:
            return
        log.warning(
            "%s: metadata changed while unsealed (mode %o uid %d gid %d, %d xattrs); restored",
            what,
            now.mode,
            now.uid,
            now.gid,
            len(now.xattrs),
        )
        attrs.set_immutable(fd, False)
        try:
            _restore(fd, want)
        finally:
            attrs.seal(fd, immutable)
    raise MetadataNotRestored(what)
