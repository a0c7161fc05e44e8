#!/usr/bin/env python3
"""Extent sharing: vsunify (hardlinks only, hardlinks + extents) against duperemove, side by
side in one run, on real Debian guest trees on a loop-mounted XFS (reflink) or btrfs image.

Run as root from the checkout (drops the page cache before each tool)::

    .venv/bin/python bench/bench_reflink.py [--fs xfs,btrfs] [--work DIR] [--markdown FILE]

For each filesystem and each tool: a fresh image (sparse, made by the benchmark, removed
afterwards), the guest set copied in with ``cp -a`` (a = bookworm-minbase, b = a second
copy of it, c = trixie-minbase, d = bookworm-services: about 920 MB, 23,000 files), caches
dropped, the tool run once over the guests: wall time, CPU time (user + system) and peak
memory (maxrss) of the tool's process (``wait4``), and the space the filesystem uses
before and after (statvfs after sync; XFS also frozen and thawed, so freed inodes are
really freed).  Then "two copies": a and b alone, after a default vsunify run, what b
adds to a.  Markdown to stdout (and ``--markdown FILE``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")) / "debian"
GUESTS = {
    "a": "bookworm-minbase",
    "b": "bookworm-minbase",
    "c": "trixie-minbase",
    "d": "bookworm-services",
}
MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
IMAGE_GIB = 4


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@contextmanager
def image(work: Path, kind: str, gib: int = IMAGE_GIB) -> Iterator[Path]:
    """A fresh ``kind`` filesystem on a sparse loop image; unmounted, detached, removed."""
    with ExitStack() as stack:
        img = work / f"{kind}.img"
        with open(img, "wb") as f:
            f.truncate(gib << 30)
        stack.callback(img.unlink)
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
        ).stdout.strip()
        stack.callback(subprocess.run, ["losetup", "-d", dev], check=False)
        subprocess.run([*MKFS[kind], dev], check=True, capture_output=True)
        mnt = work / kind
        mnt.mkdir()
        stack.callback(mnt.rmdir)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        stack.callback(subprocess.run, ["umount", str(mnt)], check=True)
        stack.callback(subprocess.run, ["chattr", "-R", "-i", str(mnt)], capture_output=True)
        yield mnt


def used(mnt: Path, kind: str) -> int:
    """Bytes the filesystem uses, once everything freed is freed."""
    os.sync()
    if kind == "xfs":  # a freeze flushes XFS's background inode freeing
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        subprocess.run(["fsfreeze", "-u", str(mnt)], check=True)
    elif kind == "btrfs":
        subprocess.run(["btrfs", "filesystem", "sync", str(mnt)], check=True, capture_output=True)
    st = os.statvfs(mnt)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@dataclass
class Measured:
    wall: float
    cpu: float
    maxrss: int  # bytes
    code: int


def timed(cmd: list[str], env: dict[str, str]) -> Measured:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode not in (0, 6):
        raise RuntimeError(f"{shlex.join(cmd)}: exit {p.returncode}: {err[-2000:]}")
    return Measured(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, p.returncode)


def copy_guests(root: Path, names: list[str]) -> None:
    root.mkdir(exist_ok=True)
    for n in names:
        subprocess.run(["cp", "-a", str(CORPUS / GUESTS[n]), str(root / n)], check=True)


def env_for(mnt: Path) -> dict[str, str]:
    return {
        **os.environ,
        "VSERVERS_CONFDIR": str(mnt / "etc"),
        "VSERVERS_ROOT": str(mnt / "vservers"),
        "VSSTORE_STATEDIR": str(mnt / "state"),
        "VSSTORE_RUNDIR": str(mnt / "run"),
        "VSSTORE_LOGDIR": str(mnt / "log"),
    }


def tools(root: Path, names: list[str]) -> dict[str, list[str]]:
    guests = [str(root / n) for n in names]
    vsunify = [sys.executable, "-m", "unify.cli", "run", "-q"]
    return {
        "vsunify --no-reflink (hardlinks)": [*vsunify, "--no-reflink", *guests],
        "vsunify (hardlinks + extents)": [*vsunify, *guests],
        "vsunify --reflink-only": [*vsunify, "--reflink-only", *guests],
        "duperemove -rd": ["duperemove", "-r", "-d", "-q", *guests],
    }


def scale(work: Path, n: int) -> list[str]:
    """N copies of one guest on XFS after a default run, against one copy alone; and what
    the guests' own directories and inodes take (the floor no data sharing removes)."""
    with image(work, "xfs", max(IMAGE_GIB, (n * 260 >> 10) + 2)) as mnt:
        root = mnt / "vservers"
        base = used(mnt, "xfs")
        copy_guests(root, ["a"])
        one = used(mnt, "xfs") - base
        root.joinpath("a").rename(root / "g00")
        for i in range(1, n):
            subprocess.run(
                ["cp", "-a", str(CORPUS / GUESTS["a"]), str(root / f"g{i:02d}")], check=True
            )
        before = used(mnt, "xfs") - base
        guests = sorted(str(p) for p in root.iterdir())
        drop_caches()
        log(f"xfs: {n} copies")
        m = timed([sys.executable, "-m", "unify.cli", "run", "-q", *guests], env_for(mnt))
        after = used(mnt, "xfs") - base
        entries = sum(1 for _ in (root / "g01").rglob("*"))
    return [
        f"### {n} copies of bookworm-minbase on XFS",
        "",
        f"One copy alone uses {mib(one)}; {n} copies {mib(before)} before and {mib(after)} "
        f"after a default `vsunify run` ({m.wall:.1f} s, {m.cpu:.1f} s CPU, "
        f"{mib(m.maxrss)} peak): {after / one:.2f}x one guest, each extra guest "
        f"{mib((after - one) / (n - 1))} ({(after - one) / (n - 1) / one:.1%}). "
        f"Each guest keeps its own {entries:,} directory entries, directories and the inodes "
        "of its private files.",
        "",
    ]


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fs", default="xfs", help="xfs, btrfs or both (xfs,btrfs)")
    ap.add_argument("--work", default="/var/tmp", help="where the sparse images go")
    ap.add_argument("--markdown", metavar="FILE")
    ap.add_argument("--tools", help="comma-separated subset of the tool names' first words")
    ap.add_argument(
        "--scale",
        type=int,
        default=0,
        metavar="N",
        help="also: N copies of bookworm-minbase after a default run, against one (XFS)",
    )
    ap.add_argument("--only-scale", action="store_true", help="only the --scale part")
    args = ap.parse_args()
    missing = [g for g in set(GUESTS.values()) if not (CORPUS / g).is_dir()]
    if missing:
        log(f"no corpus ({', '.join(missing)}): run bench/corpus.sh first")
        return 3
    names = list(GUESTS)
    out = [
        f"## Extent sharing: vsunify vs duperemove ({datetime.now(UTC):%Y-%m-%d})",
        "",
        f"`{shlex.join(['bench/bench_reflink.py', *sys.argv[1:]])}` on {platform.node()}, "
        f"kernel {platform.release()}, {os.cpu_count()} CPUs; duperemove "
        + subprocess.run(["duperemove", "--version"], capture_output=True, text=True)
        .stdout.strip()
        .split()[-1]
        + f". Guests a, b = bookworm-minbase (two copies), c = trixie-minbase, "
        f"d = bookworm-services, `cp -a` onto a fresh {IMAGE_GIB} GiB loop image per tool; "
        "cold cache. *used* is what the filesystem uses (statvfs) for the guests (and the "
        "store and index where vsunify runs); *saved* is before minus after.",
        "",
    ]
    work = Path(tempfile.mkdtemp(prefix="vsstore-bench-reflink-", dir=args.work))
    try:
        for kind in [] if args.only_scale else args.fs.split(","):
            out += [
                f"### {kind}",
                "",
                "| tool | wall s | CPU s | peak memory | used before | used after | saved |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for label, cmd in tools(Path("/"), names).items():
                if args.tools and label.split()[0] not in args.tools.split(","):
                    continue
                with image(work, kind) as mnt:
                    root = mnt / "vservers"
                    base = used(mnt, kind)
                    copy_guests(root, names)
                    before = used(mnt, kind)
                    cmd = tools(root, names)[label]
                    drop_caches()
                    log(f"{kind}: {label}")
                    m = timed(cmd, env_for(mnt))
                    after = used(mnt, kind)
                out.append(
                    f"| {label} | {m.wall:.1f} | {m.cpu:.1f} | {mib(m.maxrss)} | "
                    f"{mib(before - base)} | {mib(after - base)} | {mib(before - after)} |"
                )
            with image(work, kind) as mnt:  # two copies of one guest: what the second adds
                root = mnt / "vservers"
                base = used(mnt, kind)
                copy_guests(root, ["a"])
                one = used(mnt, kind) - base
                copy_guests(root, ["b"])
                timed(tools(root, ["a", "b"])["vsunify (hardlinks + extents)"], env_for(mnt))
                two = used(mnt, kind) - base
            out += [
                "",
                f"Two copies of bookworm-minbase after a default `vsunify run`: the first "
                f"uses {mib(one)}, the second adds {mib(two - one)} "
                f"({(two - one) / one:.1%} of the first).",
                "",
            ]
        if args.scale:
            out += scale(work, args.scale)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join(out) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
