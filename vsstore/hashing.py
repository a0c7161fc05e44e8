"""Content hashes, metadata classes and byte comparison.

Files are grouped by (content digest, metadata class).  The digest is xxh3-128: fast, but
not collision resistant (a hostile guest can craft collisions), so it only proposes
candidates.  The same read also computes BLAKE3-256, kept in the index; every link is
confirmed by comparing those, for content unchanged since it was hashed (same size, mtime and
ctime, and nobody writing it: see unify/apply.py).  The metadata class covers everything a
hardlink shares: mode, owner, all xattrs (capabilities, ACLs, labels) except our own marker,
and mtime unless it is ignored.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

import blake3
import xxhash

from .attrs import is_ours

CHUNK = 1 << 20

# Tests replace this to force collisions; production code never touches it.
digest_hook: Callable[[bytes], bytes] | None = None


def content_digests(fd: int, size: int) -> tuple[bytes, bytes]:
    """(xxh3-128, BLAKE3-256) of the file's first ``size`` bytes, in one read."""
    fast = xxhash.xxh3_128()
    strong = blake3.blake3()
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK, size - off), off)
        if not data:
            break
        fast.update(data)
        strong.update(data)
        off += len(data)
    d = fast.digest()
    return (digest_hook(d) if digest_hook is not None else d), strong.digest()


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
    h.update(
        struct.pack(
            "<IIIq", st.st_mode, st.st_uid, st.st_gid, -1 if ignore_mtime else st.st_mtime_ns
        )
    )
    for name, value in xattrs:
        n = name.encode()
        h.update(struct.pack("<II", len(n), len(value)))
        h.update(n)
        h.update(value)
    return h.digest()
