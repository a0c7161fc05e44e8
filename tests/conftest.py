"""Shared fixtures: a throw-away host (config, guests, store, state) on a real filesystem.

Tests run as root on a filesystem with chattr +i and trusted.* xattrs (ext4 under /var/tmp
by default; VSSTORE_TEST_TMP moves it).  Every tree is unsealed and removed afterwards, also
when the test fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from vsstore import attrs
from vsstore.attrs import unseal_tree

TEST_TMP = os.environ.get("VSSTORE_TEST_TMP", "/var/tmp")
REPO = Path(__file__).resolve().parent.parent

FileSpec = bytes | tuple  # bytes, or (bytes, mode, uid, gid, mtime_s), trailing ones optional
_DEFAULTS = (b"", 0o644, 0, 0, 1_600_000_000)


@dataclass
class Host:
    base: Path
    env: dict[str, str]

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "vservers"

    @property
    def root(self) -> Path:
        return self.base / "vservers"

    @property
    def store(self) -> Path:
        return self.root / ".hash"

    @property
    def index(self) -> Path:
        return self.base / "state" / "index.sqlite"

    def guest(self, name: str, files: dict[str, FileSpec], configure: bool = True) -> Path:
        """Create a guest tree with ``files`` (rel path -> bytes or a spec tuple)."""
        tree = self.root / name
        tree.mkdir(parents=True, exist_ok=True)
        for rel, spec in files.items():
            full = (spec,) if isinstance(spec, bytes) else tuple(spec)
            data, mode, uid, gid, mtime = full + _DEFAULTS[len(full) :]
            p = tree / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.chown(p, uid, gid)
            os.chmod(p, mode)
            os.utime(p, (mtime, mtime))
        if configure:
            c = self.conf / name
            c.mkdir(parents=True, exist_ok=True)
            if not (c / "vdir").exists():
                os.symlink(tree, c / "vdir")
        return tree

    def vsunify(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        wrap: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        """Run vsunify in a subprocess, as a user would (``wrap``: a command that runs it,
        such as prlimit)."""
        p = subprocess.run(
            [*wrap, sys.executable, "-m", "unify.cli", *args],
            cwd=REPO,
            env={**os.environ, **self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"vsunify {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
            )
        return p

    def run_json(self, *args: str, check: bool = True) -> dict:
        p = self.vsunify("run", "--json", *args, check=check)
        return json.loads(p.stdout)


def _sweep_test_mounts() -> None:
    """Unmount overlays a crashed test run left below TEST_TMP (lazily: nothing may hang).
    Only dead ones (their daemon is gone: ENOTCONN): another test run on this machine may
    be using its own right now."""
    with open("/proc/self/mountinfo") as f:
        ours = [
            line.split()[4]
            for line in f
            if " - fuse.vscow " in line
            and line.split()[4].startswith(os.path.join(TEST_TMP, "vsstore-test-"))
        ]
    for m in ours:
        try:
            os.stat(m)
            continue  # served: not ours to take away
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                continue
        subprocess.run(["fusermount3", "-u", "-z", m], check=False)


@pytest.fixture(scope="session", autouse=True)
def sweep_mounts() -> Iterator[None]:
    _sweep_test_mounts()
    yield
    _sweep_test_mounts()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    base = Path(tempfile.mkdtemp(prefix="vsstore-test-", dir=TEST_TMP))
    env = {
        "VSERVERS_CONFDIR": str(base / "etc" / "vservers"),
        "VSERVERS_ROOT": str(base / "vservers"),
        "VSSTORE_STATEDIR": str(base / "state"),
        "VSSTORE_RUNDIR": str(base / "run"),
        "VSSTORE_LOGDIR": str(base / "log"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (base / "vservers").mkdir()
    try:
        yield Host(base, env)
    finally:
        unseal_tree(base)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def small_fs(at: Path, size_mib: int, kind: str = "tmpfs") -> Iterator[Path]:
    """A small filesystem mounted at ``at``: tmpfs, or ``ext4`` on a loop image beside it.
    Unmounted afterwards, also when the test fails."""
    at.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(at)], check=True
        )
    else:
        img = at.with_name(at.name + ".img")
        with open(img, "wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(img)], check=True)
        subprocess.run(["mount", "-o", "loop", str(img), str(at)], check=True)
    try:
        yield at
    finally:
        unseal_tree(at)
        subprocess.run(["umount", str(at)], check=True)


def fill(d: Path) -> Path:
    """Fill the filesystem holding directory ``d`` to its last block; returns the filler
    file (remove it to free the space again)."""
    f = d / ".filler"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 1024):
            try:
                while True:
                    os.write(fd, bytes(chunk))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return f


def inode(p: Path) -> int:
    return os.lstat(p).st_ino


def snapshot(root: Path) -> dict[str, tuple]:
    """Content and metadata of every regular file below root (for 'nothing lost' checks)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = os.lstat(p)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(p, n, follow_symlinks=False))
                    for n in os.listxattr(p, follow_symlinks=False)
                    if ".vsstore." not in n
                )
            )
            out[str(p.relative_to(root))] = (
                p.read_bytes(),
                st.st_mode,
                st.st_uid,
                st.st_gid,
                xattrs,
            )
    return out


def flags(p: Path) -> str:
    """vsattr's letters for a file: U/u iunlink marker, I/i immutable, A/a append-only."""
    fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return attrs.read_attrs(fd).letters()
    finally:
        os.close(fd)


@pytest.fixture
def vs(host: Host) -> Iterator[object]:
    """A ``vserver`` runner for this test's host (tests/guests.py); afterwards every guest
    with a run state is stopped (or killed, never a reused pid) and the overlay unmounted,
    also when the test failed."""
    from guests import Vserver, leave_nothing

    v = Vserver(host)
    try:
        yield v
    finally:
        leave_nothing(v, host)
