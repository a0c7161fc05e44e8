#!/usr/bin/env python3
"""The floor under any pyfuse3 overlay: a read-only pyfuse3 filesystem that serves a copy of
a tree's metadata from memory (no backing I/O at all while serving, hour-long entry and
attribute timeouts) timed on the same warm `find` and `tar` as bench_cow.py.  What it takes
is what pyfuse3's request path costs (opendir/readdirplus/releasedir per directory; pyfuse3
asks for READDIRPLUS every time and cannot let the kernel cache directories), so no overlay
built on pyfuse3 can be faster on these rows.

    python bench/pyfuse3_floor.py [TREE]      (default: the corpus guest bookworm-services)

With ``--small N`` it is a writable one-directory filesystem in memory instead (create,
write, getxattr, getattr, release, unlink answered at once, nothing stored but sizes), timed
on bench_cow.py's small-file rows (N x 4 KiB files created and written, then unlinked)
beside fuse-overlayfs over the same kind of directory on tmpfs, so neither waits on a disk:
what pyfuse3's request path costs per file, under any overlay written on it.

    python bench/pyfuse3_floor.py --small 5000 [--rounds 5]
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


def serve_small(mnt: str) -> None:
    import pyfuse3
    import trio

    root = os.lstat("/")
    files: dict[bytes, int] = {}
    sizes: dict[int, int] = {}

    def attr(nid: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = nid
        a.st_mode = (stat.S_IFDIR | 0o755) if nid == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o644)
        a.st_nlink = 1
        a.st_size = sizes.get(nid, 0)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = root.st_mtime_ns
        a.entry_timeout = a.attr_timeout = 3600
        return a

    class SmallFloor(pyfuse3.Operations):
        async def getattr(self, inode, ctx=None):  # type: ignore[no-untyped-def]
            return attr(inode)

        async def lookup(self, parent, name, ctx=None):  # type: ignore[no-untyped-def]
            nid = files.get(name)
            if nid is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return attr(nid)

        async def create(self, parent, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
            nid = files[name] = len(sizes) + 2
            sizes[nid] = 0
            return pyfuse3.FileInfo(fh=nid), attr(nid)

        async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
            sizes[fh] = max(sizes[fh], off + len(buf))
            return len(buf)

        async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
            raise pyfuse3.FUSEError(errno.ENODATA)

        async def flush(self, fh):  # type: ignore[no-untyped-def]
            pass

        async def release(self, fh):  # type: ignore[no-untyped-def]
            pass

        async def unlink(self, parent, name, ctx):  # type: ignore[no-untyped-def]
            del files[name]

        async def forget(self, inode_list):  # type: ignore[no-untyped-def]
            pass

    pyfuse3.init(SmallFloor(), mnt, {"fsname=pyfuse3-floor", "default_permissions"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()


def small_files(d: str, n: int) -> tuple[float, float]:
    """bench_cow.py's small-file rows in directory ``d``: create+write, then unlink."""
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    data = b"x" * 4096
    try:
        t0 = time.perf_counter()
        for i in range(n):
            fd = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            os.write(fd, data)
            os.close(fd)
        t1 = time.perf_counter()
        for i in range(n):
            os.unlink(f"f{i}", dir_fd=dfd)
        return t1 - t0, time.perf_counter() - t1
    finally:
        os.close(dfd)


def wait_mounted(mnt: str) -> None:
    for _ in range(200):
        if os.path.ismount(mnt):
            return
        time.sleep(0.05)
    raise SystemExit(f"{mnt}: not mounted after 10 s")


def main_small(n: int, rounds: int) -> int:
    with tempfile.TemporaryDirectory(prefix="vsstore-floor-", dir="/dev/shm") as base:
        floor, fo = os.path.join(base, "floor"), os.path.join(base, "fuse-overlayfs")
        for d in (floor, fo, *(os.path.join(base, x) for x in ("lower", "upper", "work"))):
            os.mkdir(d)
        procs = [
            subprocess.Popen([sys.executable, __file__, "--serve-small", floor]),
            subprocess.Popen(
                [
                    "fuse-overlayfs",
                    "-f",
                    "-o",
                    f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
                    fo,
                ]
            ),
        ]
        try:
            for m in (floor, fo):
                wait_mounted(m)
            times: dict[str, list[tuple[float, float]]] = {
                "pyfuse3 floor": [],
                "fuse-overlayfs": [],
            }
            for r in range(rounds):  # taking turns, the order rotating
                order = [("pyfuse3 floor", floor), ("fuse-overlayfs", fo)][:: 1 if r % 2 else -1]
                for label, d in order:
                    times[label].append(small_files(d, n))
            print(f"{n} x 4 KiB files on tmpfs; median of {rounds} rounds, taking turns (seconds)")
            print("| operation | fuse-overlayfs | pyfuse3 floor | floor / fuse-overlayfs |")
            print("|---|--:|--:|--:|")
            for i, label in enumerate(("create+write", "unlink")):
                fo_t = sorted(t[i] for t in times["fuse-overlayfs"])[rounds // 2]
                fl_t = sorted(t[i] for t in times["pyfuse3 floor"])[rounds // 2]
                print(
                    f"| {n} x 4 KiB files: {label} | {fo_t:.3f} | {fl_t:.3f} | {fl_t / fo_t:.2f} |"
                )
        finally:
            for m in (floor, fo):
                subprocess.run(["fusermount3", "-u", m], check=False)
            for p in procs:
                p.wait(timeout=10)
    return 0


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
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-small":
        serve_small(sys.argv[2])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--small":
        rounds = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--rounds" else 5
        return main_small(int(sys.argv[2]), rounds)
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
