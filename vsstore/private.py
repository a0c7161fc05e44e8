"""Give one guest name its own copy of a shared inode: what deunify, the cow overlay's
copy-up and package upgrades all need, done one way.

The copy (content, owner, mode, xattrs except ours, times) is written to a temporary name
beside the shared one and fsynced; then, in a short window in which the shared inode's
immutable flag is lifted (it forbids rename; ``vsstore.window`` guards that moment), the
two names are swapped with RENAME_EXCHANGE and what came out is checked to be the shared
inode, else the swap is undone.  The shared inode itself never changes, so no other guest sees anything.
"""

from __future__ import annotations

import itertools
import os

from . import syscalls
from .hashing import read_xattrs
from .index import Index
from .names import shown
from .window import unsealed

_tmp_prefix = os.urandom(4).hex()
_tmp_count = itertools.count()


def tmp_name() -> str:
    """A fresh temporary name: a per-process random half and a counter."""
    return f".vsu~{_tmp_prefix}{next(_tmp_count) & 0xFFFFFFFF:08x}"


def copy_file(src: int, dirfd: int, name: str) -> int:
    """Create ``name`` in ``dirfd`` as a private copy of open file ``src``: content, owner,
    mode, xattrs (not ours) and times, fsynced.  Returns the new file's fd (read-only)."""
    st = os.fstat(src)
    fd = os.open(
        name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dirfd
    )
    try:
        off = 0
        while off < st.st_size:
            n = os.copy_file_range(src, fd, st.st_size - off, off, off)
            if n == 0:
                break
            off += n
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, st.st_mode & 0o7777)
        for xname, value in read_xattrs(src):
            os.setxattr(fd, xname, value)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name, dir_fd=dirfd)
        raise
    return fd


def privatize(
    root: str, d: str, dfd: int, base: str, ofd: int, index: Index | None, immutable: bool
) -> os.stat_result | None:
    """Replace name ``base`` in directory ``dfd`` (``d`` below guest ``root``), which holds
    the shared inode open as ``ofd``, by a private copy.  Returns the copy's stat, or None
    when the name was replaced by someone else meanwhile (then nothing changed)."""
    ost = os.fstat(ofd)
    tmp = tmp_name()
    cfd = copy_file(ofd, dfd, tmp)
    try:
        cst = os.fstat(cfd)
    finally:
        os.close(cfd)
    try:
        ids = (
            index.journal_add([("deunify", root, d, base, tmp, cst.st_ino, ost.st_ino)])
            if index is not None
            else []
        )
    except BaseException:  # not journaled (a full index): the copy must not stay behind
        os.unlink(tmp, dir_fd=dfd)
        raise
    done = True
    with unsealed(ofd, immutable, what=shown(f"{root}/{d + '/' if d else ''}{base}")):
        syscalls.renameat2(dfd, tmp, dfd, base, syscalls.RENAME_EXCHANGE)
        if os.stat(tmp, dir_fd=dfd, follow_symlinks=False).st_ino != ost.st_ino:
            syscalls.renameat2(dfd, tmp, dfd, base, syscalls.RENAME_EXCHANGE)
            done = False
        os.unlink(tmp, dir_fd=dfd)
    if index is not None:
        index.journal_done(ids)
    return cst if done else None
