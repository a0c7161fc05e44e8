"""Content hashes, metadata classes and byte comparison.

Files are grouped by (content digest, metadata class).  The digest is xxh3-128: fast, but
not collision resistant, so it only proposes candidates; every link is confirmed by a byte
comparison (``same_content``) just before it happens.  The metadata class covers everything
a hardlink shares: mode, owner, all xattrs (capabilities, ACLs, labels) except our own
marker, and mtime unless it is ignored.
"""
from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

import xxhash

from .attrs import is_ours

CHUNK = 1 << 20

# Tests replace this to force collisions; production code never touches it.
digest_hook: Callable[[bytes], bytes] | None = None


def content_digest(fd: int, size: int) -> bytes:
    """xxh3-128 of the file's first ``size`` bytes (the size seen by the walk)."""
    h = xxhash.xxh3_128()
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK, size - off), off)
        if not data:
            break
        h.update(data)
        off += len(data)
    d = h.digest()
    return digest_hook(d) if digest_hook is not None else d


def read_xattrs(fd: int) -> list[tuple[str, bytes]]:
    """All xattrs of an open file except ours, sorted by name."""
    try:
        names = os.listxattr(fd)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise
    out = []
    for n in sorted(names):
        if is_ours(n):
            continue
        try:
            out.append((n, os.getxattr(fd, n)))
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return out


def meta_class(st: os.stat_result, xattrs: list[tuple[str, bytes]], ignore_mtime: bool) -> bytes:
    """A 64-bit class of the inode metadata a hardlink would share."""
    h = xxhash.xxh3_64()
    h.update(struct.pack("<IIIq", st.st_mode, st.st_uid, st.st_gid,
                         -1 if ignore_mtime else st.st_mtime_ns))
    for name, value in xattrs:
        n = name.encode()
        h.update(struct.pack("<II", len(n), len(value)))
        h.update(n)
        h.update(value)
    return h.digest()


def same_content(fd_a: int, fd_b: int, size: int) -> bool:
    """Byte comparison of two open files over ``size`` bytes, both exactly that long."""
    if os.fstat(fd_a).st_size != size or os.fstat(fd_b).st_size != size:
        return False
    off = 0
    while off < size:
        a = os.pread(fd_a, CHUNK, off)
        b = os.pread(fd_b, CHUNK, off)
        if a != b or not a:
            return False
        off += len(a)
    return True
