"""Layer 2: extent sharing in the kernel (vsstore.extents) on real XFS and btrfs images:
FIDEDUPERANGE shares identical bytes and nothing else, loses no concurrent write, leaves
every bit of the destination's metadata alone, and ext4 says it cannot."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fsimages import REFLINK_KINDS, loop_fs, physical

from conftest import TEST_TMP
from vsstore import extents, syscalls

MIB = 1 << 20


@pytest.fixture(scope="module", params=REFLINK_KINDS)
def fs(request: pytest.FixtureRequest) -> Iterator[Path]:
    """One image per filesystem kind for the module; each test works in its own directory."""
    base = Path(tempfile.mkdtemp(prefix="vsstore-test-ext-", dir=TEST_TMP))
    try:
        with loop_fs(base / request.param, request.param) as m:
            yield m
    finally:
        os.rmdir(base)


@pytest.fixture
def d(fs: Path, request: pytest.FixtureRequest) -> Path:
    p = fs / request.node.name.replace("[", "-").replace("]", "")
    p.mkdir()
    return p


def _files(d: Path, data: bytes, *names: str) -> list[Path]:
    out = []
    for n in names:
        (d / n).write_bytes(data)
        out.append(d / n)
    os.sync()
    return out


def _dedupe(src: Path, *dsts: Path) -> list[extents.Outcome]:
    fds = [os.open(p, os.O_RDONLY | os.O_NOATIME) for p in (src, *dsts)]
    try:
        return extents.dedupe(fds[0], fds[1:], os.stat(src).st_size)
    finally:
        for fd in fds:
            os.close(fd)


def _meta(p: Path) -> tuple:
    st = os.lstat(p)
    xattrs = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))
    return (
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_atime_ns,
        xattrs,
    )


def test_the_probe_says_xfs_and_btrfs_share_extents(fs: Path) -> None:
    fd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert extents.probe(fd) is None
    finally:
        os.close(fd)
    assert sorted(os.listdir(fs)) == sorted(p.name for p in fs.iterdir())  # nothing left


def test_the_probe_says_ext4_cannot(tmp_path: Path) -> None:
    with loop_fs(tmp_path / "e", "ext4") as m:
        fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        try:
            why = extents.probe(fd)
        finally:
            os.close(fd)
        assert why is not None and "cannot share extents" in why
        assert os.listdir(m) == ["lost+found"]


def test_identical_files_come_to_share_their_blocks(d: Path) -> None:
    # More than one call's worth (CHUNK) and a tail that is not a whole block.
    data = os.urandom(extents.CHUNK + 3 * MIB) + b"tail"
    a, b, c = _files(d, data, "a", "b", "c")
    assert set(physical(a)).isdisjoint(physical(b))
    out = _dedupe(a, b, c)
    assert [(o.shared, o.whole) for o in out] == [(len(data), True)] * 2
    assert physical(a) == physical(b) == physical(c)
    for p in (a, b, c):
        fd = os.open(p, os.O_RDONLY)
        try:
            assert extents.shared_bytes(fd) >= len(data)
        finally:
            os.close(fd)
        assert p.read_bytes() == data


def test_different_bytes_are_never_shared(d: Path) -> None:
    data = os.urandom(4 * MIB)
    other = data[: 2 * MIB] + b"X" + data[2 * MIB + 1 :]
    a = _files(d, data, "a")[0]
    b = _files(d, other, "b")[0]
    (out,) = _dedupe(a, b)
    assert out.differs and out.shared < 2 * MIB + 4096
    assert b.read_bytes() == other and a.read_bytes() == data


def test_after_one_copy_is_written_the_other_keeps_its_bytes(d: Path) -> None:
    data = os.urandom(2 * MIB)
    a, b = _files(d, data, "a", "b")
    assert _dedupe(a, b)[0].whole
    with open(b, "r+b") as f:  # the guest that owns b writes in place, as any program does
        f.seek(MIB)
        f.write(b"new bytes of b")
    with open(a, "r+b") as f:
        f.write(b"A")
    assert a.read_bytes() == b"A" + data[1:]
    assert b.read_bytes() == data[:MIB] + b"new bytes of b" + data[MIB + 14 :]


def test_a_writer_during_dedupe_loses_nothing(d: Path) -> None:
    """A thread writes the destination in place while the other dedupes it against its
    former twin again and again: every write is there afterwards."""
    size = 8 * MIB
    data = os.urandom(size)
    a, b = _files(d, data, "a", "b")
    want = bytearray(data)
    done = threading.Event()

    def writer() -> None:
        fd = os.open(b, os.O_WRONLY)
        try:
            for k in range(400):
                off = (k * 7919 * 4096 + k * 13) % (size - 64)
                chunk = b"w%05d" % k + bytes([k & 0xFF]) * 57
                os.pwrite(fd, chunk, off)
                want[off : off + len(chunk)] = chunk
                if k % 50 == 0:
                    os.pwrite(fd, data[off : off + 4096], off)  # back to the twin's bytes
                    want[off : off + 4096] = data[off : off + 4096]
        finally:
            os.close(fd)
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    rounds = 0
    while not done.is_set() or rounds < 3:
        _dedupe(a, b)
        rounds += 1
    t.join()
    assert b.read_bytes() == bytes(want)
    assert a.read_bytes() == data
    _dedupe(a, b)  # once more, quiet: what is still identical is shared, the rest is b's own
    assert b.read_bytes() == bytes(want)


def test_dedupe_changes_none_of_the_destinations_metadata(d: Path) -> None:
    """Opened read-only (root may dedupe into a file it cannot write): mode with setuid,
    owner, file capabilities and other xattrs, mtime, ctime and atime stay as they were."""
    data = os.urandom(MIB) + b"x"
    a, b, c = _files(d, data, "a", "b", "c")
    os.chown(b, 1000, 1000)
    os.chmod(b, 0o4755)
    os.setxattr(c, "security.capability", bytes.fromhex("01000002" + "00200000" + "00" * 12))
    os.setxattr(c, "user.note", b"guest's own")
    os.utime(b, ns=(1_500_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = {p: _meta(p) for p in (b, c)}
    assert all(o.whole for o in _dedupe(a, b, c))
    assert physical(a) == physical(b) == physical(c)
    assert {p: _meta(p) for p in (b, c)} == before


def test_an_immutable_destination_is_refused(d: Path) -> None:
    data = os.urandom(MIB)
    a, b = _files(d, data, "a", "b")
    fd = os.open(b, os.O_RDONLY)
    try:
        syscalls.set_inode_flags(fd, syscalls.FS_IMMUTABLE_FL)
        (out,) = _dedupe(a, b)
        assert (out.shared, out.error) == (0, errno.EPERM)
    finally:
        syscalls.set_inode_flags(fd, 0)
        os.close(fd)
    assert set(physical(a)).isdisjoint(physical(b))
