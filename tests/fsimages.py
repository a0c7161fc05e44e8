"""Filesystems with shared extents for the tests: XFS (reflink) and btrfs on loop images.

An image is a sparse file (it costs the blocks written, not its size), attached to a loop
device, made and mounted; afterwards unmounted, the loop device detached and the image
removed, in that order, also when the test fails (ExitStack: each teardown registered right
after its setup).  A kernel without the filesystem makes the test skip, saying so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from conftest import TEST_TMP, Host
from vsstore.attrs import unseal_tree

# XFS refuses to make a filesystem below 300 MiB; btrfs wants about 110.
SIZES_MIB = {"xfs": 320, "btrfs": 256}
MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}
REFLINK_KINDS = ("xfs", "btrfs")


def kernel_has(kind: str) -> bool:
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == kind for line in f if line.strip())


def skip_unless_available(kind: str) -> None:
    if not kernel_has(kind):
        pytest.skip(f"this kernel has no {kind} (not in /proc/filesystems)")
    tool = MKFS[kind][0]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs xfsprogs, btrfs-progs)")


@contextmanager
def loop_fs(at: Path, kind: str, size_mib: int | None = None) -> Iterator[Path]:
    """A fresh ``kind`` filesystem (xfs, btrfs, ext4) mounted at ``at`` from a sparse image
    beside it; everything undone afterwards."""
    if kind in MKFS:
        skip_unless_available(kind)
    mkfs = MKFS.get(kind, ["mkfs.ext4", "-q", "-m", "0"])
    img = at.with_name(at.name + ".img")
    with ExitStack() as stack:
        with open(img, "wb") as f:
            f.truncate((size_mib or SIZES_MIB.get(kind, 64)) << 20)
        stack.callback(lambda: img.unlink(missing_ok=True))
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
        ).stdout.strip()
        stack.callback(lambda: subprocess.run(["losetup", "-d", dev], check=False))
        subprocess.run([*mkfs, dev], check=True, capture_output=True)
        if not at.exists():
            at.mkdir(parents=True)
            stack.callback(at.rmdir)
        subprocess.run(["mount", dev, str(at)], check=True)
        stack.callback(_umount, at)
        stack.callback(lambda: unseal_tree(at))  # runs first: immutable files block nothing
        yield at


@contextmanager
def reflink_host(
    kind: str, monkeypatch: pytest.MonkeyPatch, size_mib: int | None = None
) -> Iterator[Host]:
    """A throw-away host (conftest.Host) whose guests, store and index live on a fresh
    ``kind`` image (xfs, btrfs)."""
    base = Path(tempfile.mkdtemp(prefix="vsstore-test-", dir=TEST_TMP))
    try:
        with loop_fs(base / kind, kind, size_mib) as m:
            env = {
                "VSERVERS_CONFDIR": str(m / "etc" / "vservers"),
                "VSERVERS_ROOT": str(m / "vservers"),
                "VSSTORE_STATEDIR": str(m / "state"),
                "VSSTORE_RUNDIR": str(m / "run"),
                "VSSTORE_LOGDIR": str(m / "log"),
            }
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            (m / "vservers").mkdir()
            yield Host(m, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _umount(at: Path) -> None:
    """Unmount; a mount still busy (a test left a descriptor open) is detached lazily, so
    the loop device and image go once it closes, and the test fails saying so."""
    if subprocess.run(["umount", str(at)], check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(at)], check=False)
        raise AssertionError(f"{at} was still busy at the end of the test (detached lazily)")


def physical(path: Path | str) -> list[tuple[int, int]]:
    """(physical offset, length) of each extent of a file, after a sync (for comparisons)."""
    from vsstore.extents import extents

    fd = os.open(path, os.O_RDONLY)
    try:
        return [(e.physical, e.length) for e in extents(fd, sync=True)]
    finally:
        os.close(fd)
