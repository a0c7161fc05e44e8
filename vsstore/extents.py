"""Extent sharing: the kernel's FIDEDUPERANGE and FIEMAP, and whether a filesystem has them.

On filesystems with shared extents (XFS with reflink, btrfs) two files can keep their own
inodes, metadata and write access and still share their blocks.  ``FIDEDUPERANGE`` asks the
kernel to share a range of one file's blocks with another's: it locks both inodes, flushes
and compares the bytes itself and shares them only if they are identical (else it says
"differs"), so a guest writing at that moment can never lose a write, and a later write
simply gets new blocks (copy-on-write in the filesystem).  That is why this is the one way
vsstore ever touches a private file's blocks: nothing else replaces a private file's content.

The kernel lets the destination be opened read-only by a caller with CAP_SYS_ADMIN (or its
owner; ``allow_file_dedupe`` in fs/remap_range.c), so deduping a guest's file opens it
``O_RDONLY | O_NOATIME`` and changes nothing the guest sees: no mtime, no ctime, no mode,
no xattr (``t2_extents`` measures it on XFS and btrfs).

``FIEMAP`` tells which extents of a file are shared (FIEMAP_EXTENT_SHARED) and where they lie
on the device, which is what ``vsunify report`` counts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .syscalls import fs_type

# linux/fs.h: _IOWR(0x94, 54, struct file_dedupe_range)
FIDEDUPERANGE = 0xC0189436
FILE_DEDUPE_RANGE_SAME = 0
FILE_DEDUPE_RANGE_DIFFERS = 1
# linux/fs.h: _IOWR('f', 11, struct fiemap)
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_SHARED = 0x2000

# struct file_dedupe_range { u64 src_offset, src_length; u16 dest_count, reserved1;
#                            u32 reserved2; struct file_dedupe_range_info info[]; }
_RANGE = struct.Struct("=QQHHI")
# struct file_dedupe_range_info { s64 dest_fd; u64 dest_offset, bytes_deduped;
#                                 s32 status; u32 reserved; }
_INFO = struct.Struct("=qQQiI")
# The kernel copies the whole argument into one page (fs/ioctl.c: ENOMEM beyond it).
MAX_DESTS = (4096 - _RANGE.size) // _INFO.size
# One call's length: btrfs shares at most 16 MiB per call (BTRFS_MAX_DEDUPE_LEN) and says
# so in bytes_deduped; asking for no more keeps every filesystem's answer whole.
CHUNK = 16 << 20

# struct fiemap { u64 fm_start, fm_length; u32 fm_flags, fm_mapped_extents,
#                 fm_extent_count, fm_reserved; struct fiemap_extent fm_extents[]; }
_FIEMAP = struct.Struct("=QQIIII")
# struct fiemap_extent { u64 fe_logical, fe_physical, fe_length, fe_reserved64[2];
#                        u32 fe_flags, fe_reserved[3]; }
_EXTENT = struct.Struct("=QQQQQIIII")
_EXTENTS_PER_CALL = 64

# Errors that say "this filesystem (or this pair of files) cannot share extents".
UNSUPPORTED_ERRNOS = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What FIDEDUPERANGE did with one destination: ``shared`` bytes from offset 0 on;
    ``differs`` when the kernel found different bytes (the rest was left alone);
    ``error`` an errno when it refused (immutable, a swap file, another filesystem...)."""

    shared: int
    differs: bool = False
    error: int = 0

    @property
    def whole(self) -> bool:
        return not self.differs and not self.error


def dedupe(src_fd: int, dst_fds: Sequence[int], length: int) -> list[Outcome]:
    """Share bytes [0, length) of every file in ``dst_fds`` with ``src_fd``'s, where the
    kernel finds them identical.  Each destination goes as far as it is identical: one
    that differs (or is refused) somewhere stops there; its ``shared`` says how far it got.
    Raises OSError only when the call itself fails (e.g. EOPNOTSUPP, EXDEV for every
    destination at once: the kernel checks the source first)."""
    shared = [0] * len(dst_fds)
    stop: list[Outcome | None] = [None] * len(dst_fds)
    off = 0
    while off < length:
        todo = [i for i in range(len(dst_fds)) if stop[i] is None and shared[i] == off]
        if not todo:
            break
        n = min(CHUNK, length - off)
        for start in range(0, len(todo), MAX_DESTS):
            batch = todo[start : start + MAX_DESTS]
            for i, (got, status) in zip(
                batch, _call(src_fd, off, n, [dst_fds[i] for i in batch]), strict=True
            ):
                if status == FILE_DEDUPE_RANGE_SAME:
                    shared[i] += got
                    if got == 0:  # no progress: the kernel would say the same again
                        stop[i] = Outcome(shared[i], error=errno.EIO)
                elif status == FILE_DEDUPE_RANGE_DIFFERS:
                    stop[i] = Outcome(shared[i], differs=True)
                else:
                    stop[i] = Outcome(shared[i], error=-status)
        # A destination the kernel shared less of than asked (and said SAME) goes on from
        # where it stopped, alone.
        behind = [i for i in todo if stop[i] is None and off < shared[i] < off + n]
        for i in behind:
            while stop[i] is None and shared[i] < off + n:
                ((got, status),) = _call(src_fd, shared[i], off + n - shared[i], [dst_fds[i]])
                if status == FILE_DEDUPE_RANGE_SAME and got > 0:
                    shared[i] += got
                elif status == FILE_DEDUPE_RANGE_DIFFERS:
                    stop[i] = Outcome(shared[i], differs=True)
                else:
                    stop[i] = Outcome(shared[i], error=-status if status < 0 else errno.EIO)
        off += n
    return [s if s is not None else Outcome(shared[i]) for i, s in enumerate(stop)]


def _call(src_fd: int, off: int, n: int, dst_fds: Sequence[int]) -> list[tuple[int, int]]:
    """One FIDEDUPERANGE: (bytes_deduped, status) per destination."""
    buf = bytearray(_RANGE.size + _INFO.size * len(dst_fds))
    _RANGE.pack_into(buf, 0, off, n, len(dst_fds), 0, 0)
    for k, fd in enumerate(dst_fds):
        _INFO.pack_into(buf, _RANGE.size + k * _INFO.size, fd, off, 0, 0, 0)
    while True:
        try:
            fcntl.ioctl(src_fd, FIDEDUPERANGE, buf, True)
            break
        except InterruptedError:
            continue
    out = []
    for k in range(len(dst_fds)):
        _fd, _off, got, status, _r = _INFO.unpack_from(buf, _RANGE.size + k * _INFO.size)
        out.append((got, status))
    return out


@dataclass(frozen=True, slots=True)
class Extent:
    logical: int
    physical: int
    length: int
    flags: int

    @property
    def shared(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_SHARED)

    @property
    def located(self) -> bool:
        """Whether ``physical`` is a real place on the device (not inline, not delayed)."""
        return not self.flags & (
            FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE
        )


def extents(fd: int, sync: bool = False) -> list[Extent]:
    """The file's extents (FIEMAP), in order.  ``sync`` flushes dirty data first, so every
    extent has its place on the device.  Raises OSError (EOPNOTSUPP: no FIEMAP here)."""
    out: list[Extent] = []
    start = 0
    flags = FIEMAP_FLAG_SYNC if sync else 0
    while True:
        buf = bytearray(_FIEMAP.size + _EXTENT.size * _EXTENTS_PER_CALL)
        _FIEMAP.pack_into(buf, 0, start, (1 << 64) - 1 - start, flags, 0, _EXTENTS_PER_CALL, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        mapped = _FIEMAP.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        last = False
        for k in range(mapped):
            lg, ph, ln, _r1, _r2, fl, *_ = _EXTENT.unpack_from(buf, _FIEMAP.size + k * _EXTENT.size)
            out.append(Extent(lg, ph, ln, fl))
            last = bool(fl & FIEMAP_EXTENT_LAST)
        if last or mapped < _EXTENTS_PER_CALL:
            return out
        start = out[-1].logical + out[-1].length


XFS_MAGIC = 0x58465342
BTRFS_MAGIC = 0x9123683E


def may_share(fd: int) -> bool:
    """Whether the filesystem of ``fd`` is one whose files can share extents (by its type,
    without writing anything: what a report asks; a run probes)."""
    return fs_type(fd) in (XFS_MAGIC, BTRFS_MAGIC)


def shared_ranges(fd: int) -> list[tuple[int, int]]:
    """(physical start, end) of the file's extents the filesystem says are shared (with any
    file), where they have a place on the device."""
    return [(e.physical, e.physical + e.length) for e in extents(fd) if e.shared and e.located]


def shared_bytes(fd: int) -> int:
    """Bytes of the file in extents the filesystem says are shared (with any file)."""
    return sum(e.length for e in extents(fd) if e.shared)


PROBE_BYTES = 4096 * 2


def probe(dirfd: int) -> str | None:
    """Can the filesystem of directory ``dirfd`` share extents?  None if it can, else why
    not (one line).  Two unnamed files (O_TMPFILE: nothing is left behind, even after a
    crash) with the same bytes are deduped and must come back shared."""
    fds: list[int] = []
    try:
        try:
            for _ in range(2):
                fds.append(
                    os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
                )
        except OSError as e:
            return f"cannot create a probe file: {e.strerror}"
        data = b"vsstore extent probe\n" * (PROBE_BYTES // 21) + b"\n" * (PROBE_BYTES % 21)
        for fd in fds:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        try:
            (got,) = dedupe(fds[0], fds[1:], PROBE_BYTES)
        except OSError as e:
            return f"the filesystem cannot share extents (FIDEDUPERANGE: {e.strerror})"
        if not got.whole or got.shared != PROBE_BYTES:
            why = "differs" if got.differs else os.strerror(got.error) if got.error else "partial"
            return f"the filesystem cannot share extents (FIDEDUPERANGE: {why})"
        return None
    finally:
        for fd in fds:
            os.close(fd)
