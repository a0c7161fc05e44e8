#!/usr/bin/env python3
"""The floor under any pyfuse3 overlay: a read-only pyfuse3 filesystem that serves a copy of
a tree's metadata from memory (no backing I/O at all while serving, hour-long entry and
attribute timeouts) timed on the same warm `find` and `tar` as bench_cow.py.  What it takes
is what pyfuse3's request path costs (opendir/readdirplus/releasedir per directory; pyfuse3
asks for READDIRPLUS every time and cannot let the kernel cache directories), so no overlay
built on pyfuse3 can be faster on these rows.

    python bench/pyfuse3_floor.py [TREE]      (default: the corpus guest bookworm-services)
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPUS = Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")) / "debian"
RUNS = 5
COMMANDS = [
    ("find . -printf '%s\\n' > /dev/null", "find (stat of every name)"),
    ("tar -cf /dev/null .", "tar -cf /dev/null (metadata)"),
]


def serve(src: str, mnt: str) -> None:
    import pyfuse3
    import trio

    nodes: dict[int, os.stat_result] = {pyfuse3.ROOT_INODE: os.lstat(src)}
    children: dict[int, list[tuple[bytes, int]]] = {}
    ids: dict[int, int] = {}

    def load(path: str, nid: int) -> None:
        kids = []
        for e in sorted(os.scandir(path), key=lambda e: e.name):
            st = e.stat(follow_symlinks=False)
            cid = ids.setdefault(st.st_ino, len(ids) + 2)
            nodes[cid] = st
            kids.append((os.fsencode(e.name), cid))
            if stat.S_ISDIR(st.st_mode):
                load(e.path, cid)
        children[nid] = kids

    load(src, pyfuse3.ROOT_INODE)
    attrs: dict[int, pyfuse3.EntryAttributes] = {}

    def attr(nid: int) -> pyfuse3.EntryAttributes:
        a = attrs.get(nid)
        if a is None:
            st = nodes[nid]
            a = pyfuse3.EntryAttributes()
            for f in (
                "st_mode",
                "st_nlink",
                "st_uid",
                "st_gid",
                "st_size",
                "st_atime_ns",
                "st_mtime_ns",
                "st_ctime_ns",
            ):
                setattr(a, f, getattr(st, f))
            a.st_ino = nid
            a.entry_timeout = a.attr_timeout = 3600
            attrs[nid] = a
        return a

    class Floor(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            return attr(inode)

        async def lookup(self, parent, name, ctx=None):  # type: ignore[no-untyped-def]
            for n, c in children.get(parent, ()):
                if n == name:
                    return attr(c)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
            return inode

        async def readdir(self, fh, off, token):  # type: ignore[no-untyped-def]
            kids = children[fh]
            for i in range(off, len(kids)):
                n, c = kids[i]
                if not pyfuse3.readdir_reply(token, n, attr(c), i + 1):
                    return

        async def readlink(self, inode, ctx):  # type: ignore[no-untyped-def]
            return b"target"

    pyfuse3.init(Floor(), mnt, {"fsname=pyfuse3-floor", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


def best(cmd: str, cwd: str) -> float:
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", cmd], cwd=cwd, check=True, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3])
        return 0
    tree = sys.argv[1] if len(sys.argv) > 1 else str(CORPUS / "bookworm-services")
    with tempfile.TemporaryDirectory(prefix="vsstore-floor-") as mnt:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", tree, mnt])
        try:
            for _ in range(200):
                if os.path.ismount(mnt):
                    break
                time.sleep(0.05)
            print(f"tree {tree}; best of {RUNS} warm runs (the first one warms the caches)")
            print("| operation | native | pyfuse3 floor |")
            print("|---|--:|--:|")
            for cmd, label in COMMANDS:
                print(f"| {label} | {best(cmd, tree):.3f} | {best(cmd, mnt):.3f} |")
        finally:
            subprocess.run(["fusermount3", "-u", mnt], check=False)
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
