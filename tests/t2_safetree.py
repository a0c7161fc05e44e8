"""Layer 2: resolving and walking hostile guest trees (real symlinks, real mounts)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from vsstore.safetree import GuestTree


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "guest"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/ls").write_bytes(b"ls" * 20)
    (root / "var/lock").mkdir(parents=True)
    outside = tmp_path / "outside"
    (outside / "lib").mkdir(parents=True)
    (outside / "lib/secret").write_bytes(b"secret" * 10)
    os.symlink(outside / "lib", root / "var/lock/subsys")  # absolute, points out
    os.symlink("../../../outside/lib", root / "usr/bin/up")  # relative, climbs out
    os.symlink("/etc/shadow", root / "usr/bin/shadow")
    with GuestTree(root, "g") as t:
        yield t


def test_walk_lists_regular_files_and_never_follows_symlinks(tree):
    found = {rel for rel, _ in tree.walk()}
    assert found == {"usr/bin/ls"}


def test_open_beneath_refuses_every_symlink(tree):
    for rel in ("var/lock/subsys/secret", "usr/bin/up/secret", "usr/bin/shadow", "var/lock/subsys"):
        with pytest.raises(OSError) as e:
            tree.open_beneath(rel)
        assert e.value.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR), rel
    with pytest.raises(OSError):
        tree.open_beneath("../outside/lib/secret")
    fd = tree.open_beneath("usr/bin/ls")
    assert os.read(fd, 4) == b"lsls"
    os.close(fd)


def test_component_fallback_is_as_strict(tree):
    with pytest.raises(OSError):
        tree._open_by_components("var/lock/subsys/secret", os.O_RDONLY, 0)
    with pytest.raises(OSError):
        tree._open_by_components("usr/../../outside/lib/secret", os.O_RDONLY, 0)
    fd = tree._open_by_components("usr/bin/ls", os.O_RDONLY, 0)
    os.close(fd)


def test_open_in_root_resolves_symlinks_inside_the_guest(tree):
    (tree.root / "etc").mkdir()
    (tree.root / "etc/passwd").write_text("guest passwd\n")
    os.symlink("/etc/passwd", tree.root / "usr/bin/pw")  # absolute: means the guest's /etc
    fd = tree.open_in_root("usr/bin/pw")
    assert os.read(fd, 100) == b"guest passwd\n"
    os.close(fd)


def test_walk_does_not_cross_mount_points(tree, tmp_path):
    mnt = tree.root / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        (mnt / "onother").write_bytes(b"x" * 100)
        assert "mnt/onother" not in {rel for rel, _ in tree.walk()}
        with pytest.raises(OSError) as e:
            tree.open_beneath("mnt/onother")
        assert e.value.errno == errno.EXDEV
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_walk_prunes_and_starts_below(tree):
    (tree.root / "etc").mkdir()
    (tree.root / "etc/x").write_text("x")
    assert {r for r, _ in tree.walk(prune_dir=lambda d: d == "etc")} == {"usr/bin/ls"}
    assert {r for r, _ in tree.walk(start="etc")} == {"etc/x"}


def test_open_regular_never_opens_a_device_or_fifo(tree):
    os.mkfifo(tree.root / "usr/bin/fifo")  # opening a FIFO for reading would block
    os.mknod(tree.root / "usr/bin/null", 0o644 | 0o020000, os.makedev(1, 3))
    for rel in ("usr/bin/fifo", "usr/bin/null"):
        with pytest.raises(OSError) as e:
            tree.open_regular(rel)
        assert e.value.errno == errno.ESTALE
    ls = os.stat(tree.root / "usr/bin/ls")
    fd = tree.open_regular("usr/bin/ls", expect=(ls.st_dev, ls.st_ino))
    os.close(fd)
    with pytest.raises(OSError):
        tree.open_regular("usr/bin/ls", expect=(ls.st_dev, ls.st_ino + 1))
    with pytest.raises(OSError):
        tree.open_regular("var/lock/subsys/secret")


def test_open_regular_takes_the_callers_open_flags(tree):
    """O_NOFOLLOW (tar, rsync, find open every file with it) holds for the name, and
    must not make the reopen fail; O_TRUNC and O_WRONLY reach the file."""
    fd = tree.open_regular("usr/bin/ls", flags=os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    os.close(fd)
    fd = tree.open_regular("usr/bin/ls", flags=os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    os.close(fd)
    assert os.stat(tree.root / "usr/bin/ls").st_size == 0


def test_listings_give_each_directorys_files_unstated_with_their_inode_numbers(tree):
    os.symlink("bin/ls", tree.root / "usr/ls-link")
    got = {prefix + e.name: e.inode() for prefix, entries in tree.listings() for e in entries}
    assert got == {rel: st.st_ino for rel, st in tree.walk()}  # regular files only
    assert got["usr/bin/ls"] == os.stat(tree.root / "usr/bin/ls").st_ino
    assert "usr/ls-link" not in got
