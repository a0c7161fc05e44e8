"""Is a package manager at work in a guest?  Its lock files are tested with fcntl
(F_GETLK: who holds a conflicting lock), through GuestTree, never by running guest code.
dpkg and apt hold fcntl write locks on these files while they change the system; rpm its
database lock."""

from __future__ import annotations

import fcntl
import os
import struct

from ..safetree import GuestTree

LOCK_FILES = (
    "var/lib/dpkg/lock-frontend",
    "var/lib/dpkg/lock",
    "var/lib/rpm/.rpm.lock",
    "usr/lib/sysimage/rpm/.rpm.lock",
)

_FLOCK = "hhxxxxqqixxxx"  # struct flock on 64-bit Linux: type, whence, start, len, pid


def holder(fd: int) -> int | None:
    """The pid holding a lock that conflicts with a write lock on all of ``fd``, if any."""
    req = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    res = fcntl.fcntl(fd, fcntl.F_GETLK, req)
    ltype, _whence, _start, _len, pid = struct.unpack(_FLOCK, res)
    return None if ltype == fcntl.F_UNLCK else pid


def held(tree: GuestTree) -> list[tuple[str, int]]:
    """(lock file, holder pid) for every package-manager lock held in the guest now."""
    out = []
    for rel in LOCK_FILES:
        try:
            fd = tree.open_regular(rel)
        except OSError:
            continue  # absent (or not a plain file: then no manager uses it either)
        try:
            pid = holder(fd)
        finally:
            os.close(fd)
        if pid is not None:
            out.append((rel, pid))
    return out
