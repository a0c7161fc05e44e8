"""Layer 3: the cow overlay's Operations driven in-process, without a mount (s3ql's t3_fs_api).

``CowFS`` is built over guest trees that the ``host`` fixture makes and the engine unifies;
each operation is one ``trio.run``, with a stand-in for pyfuse3's RequestContext (pid, uid,
gid, umask), as the kernel would send it.  Callers are real processes: the test process
is the host; a guest's process is a ``sleep`` in a pid namespace of its own (or nested in
one), attached with ``CowFS.attach`` as the lifecycle does.  Nothing is mounted (the
kernel is told nothing), so the overlay's decisions are tested in milliseconds, including
races a mount cannot force; t4_cow keeps what needs the kernel (page cache,
invalidation, direct_io, ENOSPC, a killed writer, umount).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

import cow.fs
from conftest import flags, inode
from cow.fs import NO_OPENDIR, CowFS
from unify import engine
from vsstore import syscalls
from vsstore.config import Paths, resolve_guest
from vsstore.excludes import build_excludes
from vsstore.index import Index
from vsstore.store import Store
from vsstore.window import unsealed

ROOT = pyfuse3.ROOT_INODE
SHARED = b"shared library content " * 100
UNSHARE = ("unshare", "--pid", "--fork", "--kill-child")  # a pid namespace for what follows


@dataclass(frozen=True)
class Ctx:
    """What pyfuse3's RequestContext tells an operation."""

    pid: int
    uid: int = 0
    gid: int = 0
    umask: int = 0o022


HOST = Ctx(os.getpid())  # the test process: host namespaces, root "/"


# -- driving the operations ----------------------------------------------------------------


def call(fs: CowFS, op: str, *args: object) -> Any:
    """One request, as the kernel would send it."""
    return trio.run(getattr(fs, op), *args)


def refused(fs: CowFS, op: str, *args: object) -> int:
    """The errno a request fails with (it must fail, and only with a FUSEError)."""
    with pytest.raises(pyfuse3.FUSEError) as e:
        call(fs, op, *args)
    return e.value.errno


def lookup(fs: CowFS, path: str, ctx: Ctx = HOST) -> pyfuse3.EntryAttributes:
    """A path walk from the overlay's root: one lookup per component."""
    node, a = ROOT, pyfuse3.EntryAttributes()
    for part in path.split("/"):
        a = call(fs, "lookup", node, part.encode(), ctx)
        node = a.st_ino
    return a


def nid(fs: CowFS, path: str, ctx: Ctx = HOST) -> int:
    return lookup(fs, path, ctx).st_ino


_CHANGES = {
    "size": ("st_size", "update_size"),
    "mode": ("st_mode", "update_mode"),
    "uid": ("st_uid", "update_uid"),
    "gid": ("st_gid", "update_gid"),
    "atime_ns": ("st_atime_ns", "update_atime"),
    "mtime_ns": ("st_mtime_ns", "update_mtime"),
}


def changes(**change: int) -> tuple[pyfuse3.EntryAttributes, SimpleNamespace]:
    """A setattr's (attr, fields) asking for ``change`` (size, mode, uid, gid, atime_ns,
    mtime_ns) and nothing else."""
    attr = pyfuse3.EntryAttributes()
    fields = SimpleNamespace(update_ctime=False, **{f: False for _, f in _CHANGES.values()})
    for k, v in change.items():
        setattr(attr, _CHANGES[k][0], v)
        setattr(fields, _CHANGES[k][1], True)
    return attr, fields


def setattr_(
    fs: CowFS, node: int, ctx: Ctx = HOST, fh: int | None = None, **change: int
) -> pyfuse3.EntryAttributes:
    return call(fs, "setattr", node, *changes(**change), fh, ctx)


def write(fs: CowFS, node: int, data: bytes, ctx: Ctx = HOST) -> pyfuse3.FileInfo:
    """Open ``node`` to append, write ``data``, release; returns the open's FileInfo."""
    fi = call(fs, "open", node, os.O_WRONLY | os.O_APPEND, ctx)
    try:
        call(fs, "write", fi.fh, 0, data)
    finally:
        call(fs, "release", fi.fh)
    return fi


@pytest.fixture(autouse=True)
def readdir_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyfuse3.readdir_reply writes to the kernel's buffer; here the token is a list."""

    def reply(token: list[str], name: bytes, attr: object, next_id: int) -> bool:
        token.append(os.fsdecode(name))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


def listing(fs: CowFS, node: int, ctx: Ctx = HOST) -> list[str]:
    """As the kernel lists: opendir (with our pyfuse3 it answers ENOSYS, and readdir is
    handed the directory's node), readdir, releasedir."""
    names: list[str] = []
    try:
        fh = call(fs, "opendir", node, ctx)
    except pyfuse3.FUSEError as e:
        assert e.errno == errno.ENOSYS
        call(fs, "readdir", node, 0, names)
        return names
    try:
        call(fs, "readdir", fh, 0, names)
    finally:
        call(fs, "releasedir", fh)
    return names


# -- guests and callers --------------------------------------------------------------------


def unify(*names: str) -> None:
    """Unify the guests in-process (see t3_link)."""
    paths = Paths.from_env()
    guests = [resolve_guest(n, paths) for n in names]
    idx = Index(paths.index_file)
    store = Store(paths.default_store)
    try:
        s = engine.run(
            guests,
            {g.name: build_excludes(use_default=False) for g in guests},
            store,
            idx,
            engine.Options(),
        )
    finally:
        store.close()
        idx.close()
    assert s.errors == 0, s.messages


@pytest.fixture
def fs(host) -> Iterator[CowFS]:
    """Guests a and b sharing usr/lib/libx.so (unified), each with a file of its own;
    the overlay over both, not mounted."""
    for g in "ab":
        host.guest(g, {"usr/lib/libx.so": SHARED, f"usr/own-{g}": f"{g}'s own file\n".encode()})
    unify("a", "b")
    fs = CowFS({g: str(host.root / g) for g in "ab"})
    try:
        yield fs
    finally:
        fs.close()


def the_object(host) -> Path:
    return next(p for p in host.store.rglob("*") if p.is_file())


@dataclass
class Proc:
    """A process requests can come from: ``pid`` (as the host sees it) sleeps in the
    namespaces ``popen`` (its outermost ancestor of ours) made for it."""

    popen: subprocess.Popen[bytes]
    pid: int

    @property
    def ctx(self) -> Ctx:
        return Ctx(self.pid)

    def pidns_fd(self) -> int:
        """The pid namespace the first ``unshare`` made (what the lifecycle attaches)."""
        return os.open(f"/proc/{self.popen.pid}/ns/pid_for_children", os.O_RDONLY)


@contextmanager
def process(*argv: str) -> Iterator[Proc]:
    """``argv`` (unshare, chroot, ... ending in a sleep) running, its sleeper found.  Killed
    afterwards (unshare --kill-child takes its children along)."""
    p = subprocess.Popen(argv)
    try:
        leaf, end = p.pid, time.monotonic() + 10
        while True:
            try:
                exe = os.path.basename(os.readlink(f"/proc/{leaf}/exe"))
            except OSError:
                exe = ""
            if exe in ("sleep", "busybox"):
                break
            kids = Path(f"/proc/{leaf}/task/{leaf}/children").read_text().split()
            if kids:
                leaf = int(kids[0])
                continue
            assert time.monotonic() < end and p.poll() is None, argv
            time.sleep(0.01)
        yield Proc(p, leaf)
    finally:
        p.kill()
        p.wait()


# -- lookups, attributes, reading ----------------------------------------------------------


def test_a_shared_file_is_one_node_in_every_guest_and_its_entry_is_never_cached(fs, host):
    a, b = lookup(fs, "a/usr/lib/libx.so"), lookup(fs, "b/usr/lib/libx.so")
    assert a.st_ino == b.st_ino and a.st_nlink == 3 and a.st_size == len(SHARED)
    assert a.entry_timeout == 0  # every path walk to it comes through lookup
    own = lookup(fs, "a/usr/own-a")
    assert own.st_ino not in (a.st_ino, ROOT) and own.entry_timeout == CowFS.ENTRY_TIMEOUT
    assert call(fs, "getattr", a.st_ino, HOST).st_size == len(SHARED)
    fi = call(fs, "open", a.st_ino, os.O_RDONLY, HOST)
    try:
        assert not fi.direct_io and fi.keep_cache  # one page cache for every guest
        assert call(fs, "read", fi.fh, 0, 1 << 20) == SHARED
    finally:
        call(fs, "release", fi.fh)
    assert listing(fs, ROOT) == ["a", "b"]
    assert listing(fs, nid(fs, "b/usr")) == ["lib", "own-b"]
    assert call(fs, "getattr", ROOT, HOST).st_nlink == 4
    for parent, name in ((ROOT, b"c"), (nid(fs, "a/usr"), b".."), (nid(fs, "a/usr"), b"nope")):
        assert refused(fs, "lookup", parent, name, HOST) == errno.ENOENT
    assert call(fs, "statfs", HOST).f_blocks > 0
    assert os.stat(the_object(host)).st_nlink == 3 and flags(the_object(host)) == "UIa"


def test_forget_drops_the_node_and_the_lookups_of_it(fs):
    node = nid(fs, "a/usr/lib/libx.so")
    nid(fs, "b/usr/lib/libx.so")
    call(fs, "forget", [(node, 1)])
    assert call(fs, "getattr", node, HOST).st_ino == node  # looked up twice
    call(fs, "forget", [(node, 1)])
    assert refused(fs, "getattr", node, HOST) == errno.ESTALE
    assert refused(fs, "open", node, os.O_RDONLY, HOST) == errno.ESTALE
    assert not [k for k in fs.callers.recent if k[1] == node]


# -- copy-up -------------------------------------------------------------------------------


def test_opening_a_shared_file_for_writing_copies_up_only_the_callers_name(fs, host, caplog):
    caplog.set_level(logging.INFO, logger="vsstore.cow")
    node = nid(fs, "a/usr/lib/libx.so")
    assert write(fs, node, b"patched").direct_io  # the shared inode's cache never sees it
    assert "copy-up a:/usr/lib/libx.so" in caplog.text
    copy, obj = host.root / "a/usr/lib/libx.so", the_object(host)
    assert copy.read_bytes() == SHARED + b"patched"
    assert flags(copy) == "uia" and os.stat(copy).st_nlink == 1
    assert os.stat(copy).st_mode == os.stat(obj).st_mode
    assert obj.read_bytes() == SHARED and flags(obj) == "UIa" and os.stat(obj).st_nlink == 2
    assert inode(host.root / "b/usr/lib/libx.so") == inode(obj)
    # The kernel's node is still the shared inode (one link fewer); a's name is the copy.
    assert call(fs, "getattr", node, HOST).st_nlink == 2
    again = lookup(fs, "a/usr/lib/libx.so")
    assert again.st_ino != node and again.entry_timeout == CowFS.ENTRY_TIMEOUT
    assert not write(fs, again.st_ino, b"!").direct_io  # a's own file now: no copy-up
    assert copy.read_bytes() == SHARED + b"patched!" and inode(copy) == again.st_ino


def test_a_guests_own_hardlinks_of_a_shared_inode_follow_its_copy_up(fs, host):
    lib = host.root / "a/usr/lib"
    fd = os.open(lib / "libx.so", os.O_RDONLY)
    try:
        with unsealed(fd, True):  # a second name in guest a for the shared inode
            os.link(lib / "libx.so", lib / "libx.so.1")
    finally:
        os.close(fd)
    node = nid(fs, "a/usr/lib/libx.so.1")
    assert nid(fs, "a/usr/lib/libx.so") == node
    write(fs, node, b"!")  # through libx.so, the host's last lookup
    assert inode(lib / "libx.so") == inode(lib / "libx.so.1") != inode(the_object(host))
    assert (lib / "libx.so.1").read_bytes() == SHARED + b"!"
    assert os.stat(lib / "libx.so").st_nlink == 2
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED
    assert os.stat(the_object(host)).st_nlink == 2


def test_truncate_and_chmod_of_a_shared_file_copy_up_and_answer_for_the_shared_inode(fs, host):
    obj = the_object(host)
    node = nid(fs, "a/usr/lib/libx.so")
    answer = setattr_(fs, node, size=10)  # truncate(2): by name
    assert (answer.st_ino, answer.st_size, answer.st_nlink) == (node, len(SHARED), 2)
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED[:10]
    assert nid(fs, "b/usr/lib/libx.so") == node
    answer = setattr_(fs, node, mode=0o100600)  # through b's name, the host's last lookup
    assert answer.st_mode & 0o777 == 0o644 and answer.st_nlink == 1  # the store's alone
    assert os.stat(host.root / "b/usr/lib/libx.so").st_mode & 0o777 == 0o600
    assert flags(host.root / "b/usr/lib/libx.so") == "uia"
    assert obj.read_bytes() == SHARED and os.stat(obj).st_mode & 0o777 == 0o644
    assert flags(obj) == "UIa" and os.stat(obj).st_nlink == 1
    # No guest's name holds the node any more: it answers with what it last was.
    assert call(fs, "getattr", node, HOST).st_nlink == 1


def test_ftruncate_through_a_handle_on_a_copy_answers_for_the_shared_inode(fs, host):
    node = nid(fs, "a/usr/lib/libx.so")
    fi = call(fs, "open", node, os.O_RDWR, HOST)
    try:
        assert fi.direct_io
        answer = setattr_(fs, node, fh=fi.fh, size=5)
    finally:
        call(fs, "release", fi.fh)
    assert (answer.st_ino, answer.st_size) == (node, len(SHARED))
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED[:5]
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED


def test_owner_and_times_of_a_private_file_change_in_place(fs, host):
    own = host.root / "a/usr/own-a"
    before = os.stat(own)
    node = nid(fs, "a/usr/own-a")
    answer = setattr_(fs, node, uid=1234, gid=4321, mtime_ns=5_000_000_000)
    st = os.stat(own)
    assert st.st_ino == before.st_ino == node
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 4321, 5_000_000_000)
    assert st.st_atime_ns == before.st_atime_ns  # not asked for: kept
    assert (answer.st_uid, answer.st_mtime_ns) == (1234, 5_000_000_000)
    assert setattr_(fs, node, mode=0o100600).st_mode & 0o777 == 0o600
    os.symlink("own-a", own.with_name("link"))
    link = nid(fs, "a/usr/link")
    assert refused(fs, "setattr", link, *changes(mode=0o777), None, HOST) == errno.EOPNOTSUPP
    assert setattr_(fs, link, uid=7).st_uid == 7 and os.lstat(own.with_name("link")).st_uid == 7


def test_xattrs_copy_up_and_our_marker_is_hidden_and_untouchable(fs, host):
    node = nid(fs, "a/usr/lib/libx.so")
    marker = os.fsencode(next(n for n in os.listxattr(the_object(host)) if ".vsstore." in n))
    assert refused(fs, "getxattr", node, marker, HOST) == errno.ENODATA
    assert marker not in call(fs, "listxattr", node, HOST)
    assert refused(fs, "removexattr", node, marker, HOST) == errno.EPERM
    assert refused(fs, "setxattr", node, marker, b"", HOST) == errno.EPERM
    call(fs, "setxattr", node, b"user.color", b"red", HOST)
    a = host.root / "a/usr/lib/libx.so"
    assert os.getxattr(a, "user.color") == b"red" and flags(a) == "uia"
    assert nid(fs, "b/usr/lib/libx.so") == node
    assert b"user.color" not in call(fs, "listxattr", node, HOST)  # b's: the shared inode
    assert flags(host.root / "b/usr/lib/libx.so") == "UIa"
    assert call(fs, "getxattr", nid(fs, "a/usr/lib/libx.so"), b"user.color", HOST) == b"red"


# -- names ---------------------------------------------------------------------------------


def test_unlink_rename_and_link_of_a_shared_name_touch_only_that_name(fs, host):
    lib_a, lib_b = nid(fs, "a/usr/lib"), nid(fs, "b/usr/lib")
    node = nid(fs, "a/usr/lib/libx.so")
    call(fs, "rename", lib_a, b"libx.so", lib_a, b"libx.so.old", 0, HOST)
    call(fs, "unlink", lib_b, b"libx.so", HOST)
    assert call(fs, "link", node, lib_a, b"libx.so.2", HOST).st_ino == node
    obj = the_object(host)
    assert flags(obj) == "UIa" and os.stat(obj).st_nlink == 3  # the store, a's two names
    a = host.root / "a/usr/lib"
    assert sorted(os.listdir(a)) == ["libx.so.2", "libx.so.old"]
    assert inode(a / "libx.so.old") == inode(a / "libx.so.2") == inode(obj)
    assert os.listdir(host.root / "b/usr/lib") == []
    assert list(fs.nodes.get(node).names) == [
        ("a", "usr/lib/libx.so.old"),
        ("a", "usr/lib/libx.so.2"),
    ]
    assert refused(fs, "lookup", lib_b, b"libx.so", HOST) == errno.ENOENT
    assert refused(fs, "rmdir", lib_b, b"nope", HOST) == errno.ENOENT


def test_nothing_crosses_guests_and_the_list_of_guests_is_fixed(fs, host):
    own, usr_a, usr_b = nid(fs, "a/usr/own-a"), nid(fs, "a/usr"), nid(fs, "b/usr")
    assert refused(fs, "rename", usr_a, b"own-a", usr_b, b"own-a", 0, HOST) == errno.EXDEV
    assert refused(fs, "link", own, usr_b, b"own-a", HOST) == errno.EXDEV
    assert refused(fs, "mkdir", ROOT, b"c", 0o755, HOST) == errno.EPERM
    assert refused(fs, "rmdir", ROOT, b"a", HOST) == errno.EPERM
    assert refused(fs, "rename", ROOT, b"a", ROOT, b"c", 0, HOST) == errno.EPERM
    assert refused(fs, "mknod", ROOT, b"c", stat.S_IFCHR | 0o600, 0x0101, HOST) == errno.EPERM
    assert sorted(os.listdir(host.root / "b/usr")) == ["lib", "own-b"]


def test_rename_noreplace_and_exchange(fs, host):
    usr = host.root / "a/usr"
    (usr / "x").write_bytes(b"x")
    (usr / "y").write_bytes(b"y")
    d, x, y = nid(fs, "a/usr"), nid(fs, "a/usr/x"), nid(fs, "a/usr/y")
    assert refused(fs, "rename", d, b"x", d, b"y", syscalls.RENAME_NOREPLACE, HOST) == errno.EEXIST
    call(fs, "rename", d, b"x", d, b"y", syscalls.RENAME_EXCHANGE, HOST)
    assert (usr / "x").read_bytes() == b"y" and (usr / "y").read_bytes() == b"x"
    assert list(fs.nodes.get(x).names) == [("a", "usr/y")]
    assert list(fs.nodes.get(y).names) == [("a", "usr/x")]
    assert (nid(fs, "a/usr/x"), nid(fs, "a/usr/y")) == (y, x)
    # A shared name exchanged with a private one: the window lifts the seal for it.
    shared, lib = nid(fs, "a/usr/lib/libx.so"), nid(fs, "a/usr/lib")
    call(fs, "rename", lib, b"libx.so", d, b"x", syscalls.RENAME_EXCHANGE, HOST)
    obj = the_object(host)
    assert inode(usr / "x") == inode(obj) and flags(obj) == "UIa"
    assert (usr / "lib/libx.so").read_bytes() == b"y"
    assert ("a", "usr/x") in fs.nodes.get(shared).names
    assert ("a", "usr/lib/libx.so") in fs.nodes.get(y).names


def test_files_directories_and_fifos_are_made_with_the_callers_owner_and_umask(fs, host):
    d = nid(fs, "a/usr")
    ctx = Ctx(HOST.pid, uid=1000, gid=1001, umask=0o027)
    fi, attr = call(fs, "create", d, b"new", 0o666, os.O_WRONLY, ctx)
    call(fs, "release", fi.fh)
    call(fs, "mkdir", d, b"dir", 0o777, ctx)
    call(fs, "mknod", d, b"fifo", stat.S_IFIFO | 0o666, 0, ctx)
    call(fs, "symlink", d, b"link", b"new", ctx)
    usr = host.root / "a/usr"
    for name, mode in (("new", 0o640), ("dir", 0o750), ("fifo", 0o640)):
        st = os.lstat(usr / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, 1000, 1001), name
    assert os.lstat(usr / "link").st_uid == 1000
    assert call(fs, "readlink", nid(fs, "a/usr/link"), HOST) == b"new"
    assert attr.st_ino == inode(usr / "new")
    assert refused(fs, "rmdir", d, b"lib", HOST) == errno.ENOTEMPTY


def test_a_node_made_for_the_daemons_own_ids_changes_no_credentials(fs, host, monkeypatch):
    """Root's nodes are made as they are (the thread's ids already root's): no credential
    change per request; another caller's still get theirs."""
    calls: list[str] = []
    libc = syscalls._libc

    class Libc:
        def __getattr__(self, name: str) -> Callable[..., int]:
            if name in ("prctl", "setfsuid", "setfsgid"):
                calls.append(name)
                raise AssertionError(f"{name} called")
            return getattr(libc, name)  # openat2 and the rest

    monkeypatch.setattr(syscalls, "_libc", Libc())
    d = nid(fs, "a/usr")
    fi, _ = call(fs, "create", d, b"root-s", 0o644, os.O_WRONLY, HOST)
    call(fs, "release", fi.fh)
    call(fs, "mkdir", d, b"root-dir", 0o755, HOST)
    assert calls == [] and os.lstat(host.root / "a/usr/root-s").st_uid == 0
    assert refused(fs, "mkdir", d, b"theirs", 0o755, Ctx(HOST.pid, uid=1000)) == errno.EIO
    assert calls and not (host.root / "a/usr/theirs").exists()


@contextmanager
def daemon_umask(mask: int) -> Iterator[None]:
    """The process umask (the daemon's) set to ``mask`` for the block."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_mknod_makes_fifos_sockets_device_nodes_and_files_in_the_callers_tree(fs, host):
    d, usr = nid(fs, "a/usr"), host.root / "a/usr"
    ctx = Ctx(HOST.pid, uid=1000, gid=1001, umask=0o002)
    store_before = sorted(p.name for p in host.store.rglob("*"))
    made = {
        b"fifo": (stat.S_IFIFO | 0o664, 0),
        b"sock": (stat.S_IFSOCK | 0o775, 0),  # what bind(2) of a unix socket asks
        b"chr": (stat.S_IFCHR | 0o620, os.makedev(1, 3)),
        b"blk": (stat.S_IFBLK | 0o660, os.makedev(7, 200)),
        b"reg": (stat.S_IFREG | 0o644, 0),
    }
    for name, (mode, rdev) in made.items():
        attr = call(fs, "mknod", d, name, mode, rdev, ctx)
        st = os.lstat(usr / os.fsdecode(name))
        assert (st.st_mode, st.st_uid, st.st_gid) == (mode, 1000, 1001), name
        assert st.st_rdev == rdev and attr.st_rdev == rdev and attr.st_mode == mode, name
        assert attr.st_ino == nid(fs, f"a/usr/{os.fsdecode(name)}"), name
    assert sorted(p.name for p in host.store.rglob("*")) == store_before  # never in the store
    assert not any((host.root / "b/usr" / os.fsdecode(n)).exists() for n in made)
    assert refused(fs, "mknod", d, b"dir", stat.S_IFDIR | 0o755, 0, ctx) == errno.EINVAL


def test_new_nodes_get_exactly_the_mode_asked_whatever_the_daemons_umask(fs, host):
    """The kernel applied the caller's umask (the request carries it too); the daemon's
    own umask is never applied, and the set-id bits our chown to the caller clears come
    back.  A setgid directory gives its group and its setgid bit (Linux)."""
    d, usr = nid(fs, "a/usr"), host.root / "a/usr"
    ctx = Ctx(HOST.pid, uid=1000, gid=1001, umask=0)
    with daemon_umask(0o077):
        fi, attr = call(fs, "create", d, b"f", 0o620, os.O_WRONLY, ctx)
        call(fs, "release", fi.fh)
        fi, _ = call(fs, "create", d, b"suid", 0o6777, os.O_WRONLY, ctx)
        call(fs, "release", fi.fh)
        call(fs, "mkdir", d, b"dir", 0o777, ctx)
        call(fs, "mknod", d, b"p", stat.S_IFIFO | 0o666, 0, ctx)
        call(fs, "mknod", d, b"sgid", stat.S_IFREG | 0o2755, 0, ctx)
    assert stat.S_IMODE(attr.st_mode) == 0o620
    for name, mode in (("f", 0o620), ("suid", 0o6777), ("dir", 0o777), ("p", 0o666)):
        assert stat.S_IMODE(os.lstat(usr / name).st_mode) == mode, name
    assert stat.S_IMODE(os.lstat(usr / "sgid").st_mode) == 0o2755
    os.chown(usr / "dir", 0, 2000)
    os.chmod(usr / "dir", 0o2777)
    sub = nid(fs, "a/usr/dir")
    with daemon_umask(0o022):
        fi, _ = call(fs, "create", sub, b"f", 0o666, os.O_WRONLY, ctx)
        call(fs, "release", fi.fh)
        call(fs, "mkdir", sub, b"sub", 0o775, ctx)
    st, sst = os.lstat(usr / "dir/f"), os.lstat(usr / "dir/sub")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o666, 1000, 2000)
    assert (stat.S_IMODE(sst.st_mode), sst.st_uid, sst.st_gid) == (0o2775, 1000, 2000)


def test_a_chown_with_a_mode_keeps_the_mode_asked_and_copy_up_keeps_set_id_bits(fs, host):
    usr = host.root / "a/usr"
    (usr / "x").write_bytes(b"x")
    os.chmod(usr / "x", 0o755)
    call(fs, "setattr", nid(fs, "a/usr/x"), *changes(uid=1000, mode=0o104755), None, HOST)
    st = os.lstat(usr / "x")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o4755, 1000)
    # a setuid file shared by both guests: the writing guest's copy keeps every mode bit
    for g in "ab":
        host.guest(g, {"usr/bin/su": (SHARED, 0o4755)})
    unify("a", "b")
    assert inode(usr / "bin/su") == inode(host.root / "b/usr/bin/su")
    write(fs, nid(fs, "a/usr/bin/su"), b"more")
    copy = os.lstat(usr / "bin/su")
    assert copy.st_nlink == 1 and stat.S_IMODE(copy.st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(host.root / "b/usr/bin/su").st_mode) == 0o4755


def test_fifos_sockets_device_nodes_and_symlinks_can_be_hardlinked(fs, host):
    d, usr = nid(fs, "a/usr"), host.root / "a/usr"
    os.mkfifo(usr / "fifo")
    os.mknod(usr / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(usr / "sock", stat.S_IFSOCK | 0o755)
    os.symlink("own-a", usr / "link")
    for name in ("fifo", "chr", "sock", "link"):
        node = nid(fs, f"a/usr/{name}")
        attr = call(fs, "link", node, d, f"{name}2".encode(), HOST)
        assert attr.st_ino == node and attr.st_nlink == 2, name
        assert inode(usr / f"{name}2") == inode(usr / name), name
        assert ("a", f"usr/{name}2") in fs.nodes.get(node).names
    assert os.readlink(usr / "link2") == "own-a"


def _link_again(path: Path, target: str, ino: int) -> None:
    """Make ``path`` a symlink to ``target`` under the inode number ``ino`` (a removed
    symlink's: ext4 hands a freed number out again at once)."""
    for _ in range(50):
        path.unlink(missing_ok=True)
        os.symlink(target, path)
        if os.lstat(path).st_ino == ino:
            return
    raise AssertionError(f"the filesystem never gave inode {ino} out again")


def test_a_symlinks_node_answers_its_own_target_and_keeps_its_id(fs, host):
    os.symlink("own-a", host.root / "a/usr/link")
    node = nid(fs, "a/usr/link")
    assert call(fs, "readlink", node, HOST) == b"own-a"
    assert fs.nodes.get(node).target == b"own-a"
    assert nid(fs, "a/usr/link") == node  # the same symlink: the same node
    assert sorted(listing(fs, nid(fs, "a/usr"))) == ["lib", "link", "own-a"]
    assert nid(fs, "a/usr/link") == node


def test_a_symlink_given_a_removed_ones_inode_number_is_a_new_node(fs, host):
    """The kernel keeps a symlink's target for as long as it holds the node; a new
    symlink under the old one's inode number (the guest holds the old one open, O_PATH)
    must not reach the kernel as the node it holds, or it would read the old target."""
    path = host.root / "a/usr/link"
    os.symlink("own-a", path)
    old = nid(fs, "a/usr/link")
    assert call(fs, "readlink", old, HOST) == b"own-a"
    _link_again(path, "lib/libx.so", os.lstat(path).st_ino)
    new = nid(fs, "a/usr/link")
    assert new != old
    assert call(fs, "readlink", new, HOST) == b"lib/libx.so"
    assert refused(fs, "readlink", old, HOST) == errno.ESTALE  # its inode is gone
    call(fs, "forget", [(old, 1)])  # the old node's end leaves the new one reachable
    assert nid(fs, "a/usr/link") == new
    # made through the overlay: the same
    d = nid(fs, "a/usr")
    call(fs, "unlink", d, b"link", HOST)
    made = call(fs, "symlink", d, b"link", b"own-a", HOST)
    assert os.lstat(path).st_ino == fs.nodes.get(new).ino  # the number came back again
    assert made.st_ino != new
    assert call(fs, "readlink", made.st_ino, HOST) == b"own-a"


@pytest.mark.parametrize("how", ["unlink", "rename over it"])
def test_a_file_removed_through_the_overlay_never_lends_its_node_to_a_new_inode(fs, host, how):
    """A guest holds its file (the kernel keeps the node: an O_PATH descriptor) and removes
    it; the filesystem gives the number to the next file made (in any guest on that
    filesystem).  That file gets a node of its own: were it the old node, the guest could
    reopen the new file through /proc/self/fd of its descriptor."""
    usr = host.root / "a/usr"
    (usr / "mine").write_bytes(b"mine\n")
    old = nid(fs, "a/usr/mine")
    ino = os.lstat(usr / "mine").st_ino
    d = nid(fs, "a/usr")
    if how == "unlink":
        call(fs, "unlink", d, b"mine", HOST)
    else:
        (usr / "other").write_bytes(b"other\n")
        nid(fs, "a/usr/other")
        call(fs, "rename", d, b"other", d, b"mine", 0, HOST)
    for i in range(50):
        fi, made = call(fs, "create", d, f"new{i}".encode(), 0o644, os.O_WRONLY, HOST)
        call(fs, "release", fi.fh)
        if os.lstat(usr / f"new{i}").st_ino == ino:
            break
    assert os.lstat(usr / f"new{i}").st_ino == ino, "the filesystem gave the number out no more"
    assert made.st_ino != old
    assert refused(fs, "open", old, os.O_RDONLY, HOST) == errno.ESTALE
    assert call(fs, "getattr", made.st_ino, HOST).st_size == 0


def test_a_file_with_another_name_left_keeps_its_node(fs, host):
    """Removing one of a guest's two hardlinks leaves the inode its node: the other name,
    looked up later, is the same node (one kernel inode, one page cache)."""
    usr = host.root / "a/usr"
    os.link(usr / "own-a", usr / "own-a2")
    node = nid(fs, "a/usr/own-a")
    call(fs, "unlink", nid(fs, "a/usr"), b"own-a", HOST)
    assert nid(fs, "a/usr/own-a2") == node


def test_a_shared_inode_every_guest_copied_up_is_let_go_of(fs, host):
    """Once every guest's name of a shared inode is copied up, only the store may hold it,
    and vsunify may free it: its number, given to a new inode, must reach a node of its
    own.  The shared node keeps answering for the kernel that holds it."""
    shared = nid(fs, "a/usr/lib/libx.so")
    key = (fs.nodes.get(shared).dev, fs.nodes.get(shared).ino)
    write(fs, shared, b"a's\n")  # the host's last walk was a's name
    assert key in fs.nodes.by_inode  # b's name still holds it
    assert nid(fs, "b/usr/lib/libx.so") == shared
    write(fs, shared, b"b's\n")
    assert key not in fs.nodes.by_inode
    assert call(fs, "getattr", shared, HOST).st_size == len(SHARED)  # its last attributes
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED + b"b's\n"


def test_a_symlink_never_read_keeps_its_node_when_its_number_comes_back(fs, host):
    """Nothing is kept for a symlink the kernel was never told the target of: its inode
    number, given to another symlink, keeps the node (no readlink in the lookup)."""
    path = host.root / "a/usr/link"
    os.symlink("own-a", path)
    node = nid(fs, "a/usr/link")
    _link_again(path, "lib", os.lstat(path).st_ino)
    assert nid(fs, "a/usr/link") == node
    assert call(fs, "readlink", node, HOST) == b"lib"


# -- which guest is calling ----------------------------------------------------------------


def test_a_process_in_an_attached_pid_namespace_writes_to_its_guests_name(fs, host):
    node = nid(fs, "a/usr/lib/libx.so")  # the host's walk: the node is shared
    with process(*UNSHARE, "sleep", "60") as p:
        fs.attach("b", p.pidns_fd())
        assert fs.callers.caller(p.pid) == {"b"}
        assert nid(fs, "b/usr/lib/libx.so", p.ctx) == node  # its own path walk
        write(fs, node, b"from-b\n", p.ctx)
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED + b"from-b\n"
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED
    assert flags(host.root / "a/usr/lib/libx.so") == "UIa"


def test_a_process_in_a_namespace_nested_in_an_attached_one_is_its_guests(fs, host):
    with process(*UNSHARE, *UNSHARE, "sleep", "60") as p:
        fs.attach("a", p.pidns_fd())  # the outer namespace; the sleeper is one below
        assert (
            os.stat(f"/proc/{p.pid}/ns/pid").st_ino
            != os.stat(f"/proc/{p.popen.pid}/ns/pid_for_children").st_ino
        )
        assert fs.callers.caller(p.pid) == {"a"}
        setattr_(fs, nid(fs, "a/usr/lib/libx.so", p.ctx), p.ctx, mode=0o100640)
    assert os.stat(host.root / "a/usr/lib/libx.so").st_mode & 0o777 == 0o640
    assert os.stat(host.root / "b/usr/lib/libx.so").st_mode & 0o777 == 0o644
    assert os.stat(the_object(host)).st_mode & 0o777 == 0o644


def test_a_guests_write_through_another_guests_path_lands_in_its_own_name(fs, host):
    """A process of guest a that reaches the shared inode by b's path gets a's copy, never
    b's: a write is given to one of the caller's own guest's names."""
    nid(fs, "a/usr/lib/libx.so")  # the node knows a's name
    with process(*UNSHARE, "sleep", "60") as p:
        fs.attach("a", p.pidns_fd())
        write(fs, nid(fs, "b/usr/lib/libx.so", p.ctx), b"from-a\n", p.ctx)
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == SHARED + b"from-a\n"
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED
    assert flags(host.root / "b/usr/lib/libx.so") == "UIa"


def test_callers_nobody_attached_are_refused_whatever_their_root(fs, host):
    """A chroot is a path the process shapes itself (a guest keeps CAP_SYS_CHROOT): it
    names no guest, in the host's pid namespace or in one nobody attached; such a process
    may change no guest's tree.  A host-like process (the host's root and mounts) that
    never looked the shared file up has no name to write through."""
    shutil.copy("/bin/busybox", host.root / "b/busybox")
    node, usr = nid(fs, "b/usr/lib/libx.so"), nid(fs, "b/usr")
    chroot = ("chroot", str(host.root / "b"), "/busybox", "sleep", "60")
    callers = {
        "chrooted into b's tree": (chroot, False),
        "in a pid namespace nobody attached, chrooted": ((*UNSHARE, *chroot), False),
        "on the host, without a lookup": (("sleep", "60"), True),
        "in a pid namespace of its own, the host's root, without a lookup": (
            (*UNSHARE, "sleep", "60"),
            True,
        ),
    }
    for what, (argv, host_like) in callers.items():
        with process(*argv) as p:
            assert (fs.callers.caller(p.pid) is None) == host_like, what
            for op, *args in (
                ("open", node, os.O_WRONLY, p.ctx),
                ("open", node, os.O_RDWR | os.O_TRUNC, p.ctx),
                ("setattr", node, *changes(size=0), None, p.ctx),
                ("setxattr", node, b"user.x", b"1", p.ctx),
            ):
                assert refused(fs, op, *args) == errno.EACCES, (what, op)
            if not host_like:
                assert refused(fs, "unlink", usr, b"own-b", p.ctx) == errno.EACCES, what
                assert (
                    refused(fs, "create", usr, b"new", 0o644, os.O_WRONLY, p.ctx) == errno.EACCES
                ), what
    for g in "ab":
        assert (host.root / g / "usr/lib/libx.so").read_bytes() == SHARED
        assert flags(host.root / g / "usr/lib/libx.so") == "UIa"
    assert sorted(os.listdir(host.root / "b/usr")) == ["lib", "own-b"]
    assert os.stat(the_object(host)).st_nlink == 3


def test_a_guests_process_can_change_nothing_in_another_guests_tree(fs, host):
    with process(*UNSHARE, "sleep", "60") as p:
        fs.attach("a", p.pidns_fd())
        ctx = p.ctx
        usr, shared, own = (
            nid(fs, f"b/{rel}", ctx) for rel in ("usr", "usr/lib/libx.so", "usr/own-b")
        )
        attempts = {
            "write to the shared file": ("open", shared, os.O_WRONLY, ctx),
            "truncate it": ("setattr", shared, *changes(size=0), None, ctx),
            "write to b's own file": ("open", own, os.O_WRONLY, ctx),
            "chmod it": ("setattr", own, *changes(mode=0o100777), None, ctx),
            "touch it": ("setattr", own, *changes(mtime_ns=0), None, ctx),
            "set an xattr": ("setxattr", own, b"user.x", b"1", ctx),
            "create": ("create", usr, b"new", 0o644, os.O_WRONLY, ctx),
            "mkdir": ("mkdir", usr, b"d", 0o755, ctx),
            "mkfifo": ("mknod", usr, b"p", stat.S_IFIFO | 0o644, 0, ctx),
            "mknod a device": ("mknod", usr, b"c", stat.S_IFCHR | 0o644, os.makedev(1, 3), ctx),
            "bind a socket": ("mknod", usr, b"s", stat.S_IFSOCK | 0o755, 0, ctx),
            "symlink": ("symlink", usr, b"l", b"own-b", ctx),
            "rename": ("rename", usr, b"own-b", usr, b"moved", 0, ctx),
            "unlink": ("unlink", usr, b"own-b", ctx),
            "rmdir": ("rmdir", usr, b"lib", ctx),
            "link": ("link", shared, usr, b"l2", ctx),
        }
        for what, (op, *args) in attempts.items():
            assert refused(fs, op, *args) == errno.EACCES, what
        fi = call(fs, "open", own, os.O_RDONLY, ctx)  # reading is no change
        try:
            assert call(fs, "read", fi.fh, 0, 100) == b"b's own file\n"
        finally:
            call(fs, "release", fi.fh)
    assert sorted(os.listdir(host.root / "b/usr")) == ["lib", "own-b"]
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED
    assert flags(host.root / "b/usr/lib/libx.so") == "UIa"
    st = os.stat(host.root / "b/usr/own-b")
    assert st.st_mode & 0o777 == 0o644 and st.st_mtime_ns != 0
    assert "user.x" not in os.listxattr(host.root / "b/usr/own-b")


def test_attach_takes_only_a_pid_namespace_of_a_served_guest(fs):
    for kind, guest, why in (
        ("mnt", "b", "not a pid namespace"),
        ("pid", "nobody", "no guest"),
        ("pid", "b", "host"),
    ):
        fd = os.open(f"/proc/self/ns/{kind}", os.O_RDONLY)
        with pytest.raises(ValueError, match=why):
            fs.attach(guest, fd)
        with pytest.raises(OSError):  # taken over: closed also when refused
            os.fstat(fd)
    assert not fs.callers.pidns


def test_removing_a_guest_lets_go_of_its_names_and_of_a_namespace_only_it_had(fs, host):
    node = nid(fs, "a/usr/lib/libx.so")
    nid(fs, "b/usr/lib/libx.so")
    with process(*UNSHARE, "sleep", "60") as p:
        fs.attach("b", p.pidns_fd())
        fs.remove_guest("b")
        assert not fs.callers.pidns
    assert list(fs.nodes.get(node).names) == [("a", "usr/lib/libx.so")]
    assert listing(fs, ROOT) == ["a"]
    assert refused(fs, "lookup", ROOT, b"b", HOST) == errno.ENOENT
    fs.add_guest("b", str(host.root / "b"))
    assert nid(fs, "b/usr/lib/libx.so") == node
    with pytest.raises(ValueError, match="taken"):
        fs.add_guest("b", str(host.root / "b"))


# -- races a mount cannot force ------------------------------------------------------------


def _replace_after_resolve(
    fs: CowFS,
    monkeypatch: pytest.MonkeyPatch,
    path: Path,
    plant: Callable[[Path], Path] | None = None,
) -> None:
    """The next time the overlay finds a name holding a node, the guest replaces ``path``
    with a file of its own right after (once): what ``plant(path)`` made, renamed over it,
    or else a file "planted" (a shared name unsealed for it, as the overlay's rename does)."""
    resolve = fs.nodes.resolve

    def then_replace(node):  # type: ignore[no-untyped-def]
        found = resolve(node)
        monkeypatch.setattr(fs.nodes, "resolve", resolve)
        if plant is not None:
            os.rename(plant(path), path)
            return found
        planted = path.with_name(".planted")
        planted.write_bytes(b"planted\n")
        fd = os.open(path, os.O_RDONLY)
        try:
            with unsealed(fd, True):  # a shared name is sealed: as the overlay's rename does
                os.rename(planted, path)
        finally:
            os.close(fd)
        return found

    monkeypatch.setattr(fs.nodes, "resolve", then_replace)


@pytest.mark.parametrize(
    "rel, flags_",
    [("usr/own-a", os.O_WRONLY), ("usr/own-a", os.O_RDONLY), ("usr/lib/libx.so", os.O_RDONLY)],
)
def test_a_name_replaced_between_lookup_and_open_is_never_opened(
    fs, host, monkeypatch, rel, flags_
):
    """Between finding the node's name and opening it the guest puts another file there:
    the open checks it got the node's inode (ESTALE otherwise), so what was never looked
    up is never opened, for reading or writing; the planted file is left as it is."""
    node = nid(fs, f"a/{rel}")
    _replace_after_resolve(fs, monkeypatch, host.root / "a" / rel)
    assert refused(fs, "open", node, flags_, HOST) == errno.ESTALE
    assert (host.root / "a" / rel).read_bytes() == b"planted\n"
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED
    assert flags(the_object(host)) == "UIa"


def test_a_shared_name_replaced_after_lookup_is_written_as_the_guests_own_file(
    fs, host, monkeypatch
):
    """The same for a write to the shared inode: the guest's name no longer holds it (as
    after a copy-up), so the write goes to what the guest's name holds now; the shared
    inode, b's name and the store are never touched."""
    node = nid(fs, "a/usr/lib/libx.so")
    nid(fs, "b/usr/lib/libx.so")
    nid(fs, "a/usr/lib/libx.so")  # the host's last walk: a's name
    _replace_after_resolve(fs, monkeypatch, host.root / "a/usr/lib/libx.so")
    assert write(fs, node, b"more\n").direct_io
    assert (host.root / "a/usr/lib/libx.so").read_bytes() == b"planted\nmore\n"
    assert (host.root / "b/usr/lib/libx.so").read_bytes() == SHARED
    obj = the_object(host)
    assert obj.read_bytes() == SHARED and flags(obj) == "UIa" and os.stat(obj).st_nlink == 2


@pytest.mark.parametrize("op", ["create", "rename", "link", "readdir"])
def test_a_directory_swapped_as_it_is_opened_is_never_changed_or_listed(fs, host, monkeypatch, op):
    """A request in a directory opens the directory node's name once and checks the
    descriptor is the node's inode: a directory a guest process swaps in at that moment
    is neither changed nor listed (ESTALE), where checking the name and then opening it
    again made, renamed or linked the file in the swapped-in directory, or listed it."""
    usr = host.root / "a/usr"
    (usr / "x").write_bytes(b"x")
    (host.root / "a/f").write_bytes(b"f")
    d, f = nid(fs, "a/usr"), nid(fs, "a/f")
    tree = fs.trees["a"]
    opened = tree.open_beneath

    def swap_then_open(rel: str, flags_: int = os.O_RDONLY, mode: int = 0) -> int:
        if rel == "usr" and flags_ & os.O_DIRECTORY:
            monkeypatch.setattr(tree, "open_beneath", opened)
            os.rename(usr, usr.with_name("usr.old"))
            usr.mkdir()
            (usr / "x").write_bytes(b"planted")
        return opened(rel, flags_, mode)

    monkeypatch.setattr(tree, "open_beneath", swap_then_open)
    if op == "create":
        assert refused(fs, "create", d, b"new", 0o644, os.O_WRONLY, HOST) == errno.ESTALE
    elif op == "rename":
        assert refused(fs, "rename", d, b"x", d, b"new", 0, HOST) == errno.ESTALE
    elif op == "link":
        assert refused(fs, "link", f, d, b"new", HOST) == errno.ESTALE
    else:
        with pytest.raises(pyfuse3.FUSEError) as e:
            listing(fs, d)
        assert e.value.errno == errno.ESTALE
    assert os.listdir(usr) == ["x"] and (usr / "x").read_bytes() == b"planted"
    assert sorted(os.listdir(usr.with_name("usr.old"))) == ["lib", "own-a", "x"]


def test_getattr_and_getxattr_of_an_open_file_answer_through_its_handle(fs, host, monkeypatch):
    """A file open through the overlay answers getattr and getxattr (the kernel asks both
    around every write) through its handle: no name is looked for, and the answer holds
    after its last name is gone, as fstat and fgetxattr do."""
    path = host.root / "a/usr/own-a"
    os.setxattr(path, "user.color", b"red")
    node = nid(fs, "a/usr/own-a")
    fi = call(fs, "open", node, os.O_WRONLY, HOST)
    try:
        call(fs, "write", fi.fh, 0, b"longer than it was\n")
        with monkeypatch.context() as m:
            m.setattr(fs.nodes, "resolve", None)  # no name looked for
            m.setattr(fs.nodes, "some_name", None)
            assert call(fs, "getattr", node, HOST).st_size == len(b"longer than it was\n")
            assert call(fs, "getxattr", node, b"user.color", HOST) == b"red"
        path.unlink()
        assert call(fs, "getattr", node, HOST).st_nlink == 0
        assert call(fs, "getxattr", node, b"user.color", HOST) == b"red"
        assert refused(fs, "getxattr", node, b"security.capability", HOST) == errno.ENODATA
    finally:
        call(fs, "release", fi.fh)
    assert refused(fs, "getxattr", node, b"user.color", HOST) == errno.ESTALE


def test_a_request_that_fails_unexpectedly_is_eio_never_another_exception(fs, monkeypatch):
    def broken(nid: int) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(fs.nodes, "get", broken)
    assert refused(fs, "getattr", 12345, HOST) == errno.EIO


def test_opendir_leaves_directories_to_the_kernels_cache_and_readdir_goes_by_node(fs, host):
    """The suite's pyfuse3 is the patched one (scripts/pyfuse3/build.sh): opendir answers
    ENOSYS (the kernel then caches every listing and sends no opendir again), readdir is
    handed the directory's node, and a listing that goes on at an offset continues the
    one it started (sorted, so offsets are stable)."""
    assert NO_OPENDIR
    assert refused(fs, "opendir", nid(fs, "a/usr"), HOST) == errno.ENOSYS
    names: list[str] = []
    call(fs, "readdir", nid(fs, "a/usr"), 0, names)
    assert names == sorted(os.listdir(host.root / "a/usr"))
    rest: list[str] = []
    call(fs, "readdir", nid(fs, "a/usr"), 1, rest)
    assert rest == names[1:]
    assert listing(fs, ROOT) == ["a", "b"]


def test_on_a_stock_pyfuse3_directories_are_listed_through_handles(fs, host, monkeypatch):
    """Without our pyfuse3 (NO_OPENDIR false) opendir gives a handle, readdir lists through
    it and releasedir drops it."""
    monkeypatch.setattr(cow.fs, "NO_OPENDIR", False)
    fh = call(fs, "opendir", nid(fs, "a/usr"), HOST)
    names: list[str] = []
    call(fs, "readdir", fh, 0, names)
    assert names == sorted(os.listdir(host.root / "a/usr"))
    call(fs, "releasedir", fh)
    assert fh not in fs.dir_handles


def _planted(path: Path) -> Path:
    """A set-uid file of another user (1234) beside ``path``, as a guest process would
    leave it to be renamed into a name the overlay is making."""
    planted = path.with_name(".planted")
    planted.write_bytes(b"planted\n")
    os.chown(planted, 1234, 1234)
    os.chmod(planted, 0o4755)
    return planted


def _as_planted(path: Path) -> None:
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1234, 0o4755)
    assert path.read_bytes() == b"planted\n"


@pytest.mark.parametrize("op", ["mkdir", "mknod", "symlink"])
def test_a_file_swapped_in_right_after_a_node_is_made_is_never_chowned_or_chmodded(
    fs, host, monkeypatch, op
):
    """A guest process working on the tree directly (during ``exec --cow``) renames its own
    set-uid file into the name the instant the overlay made the node: the node is born
    the caller's (no chown or chmod by name follows), so the planted file keeps its owner
    and mode, and no set-uid file of the caller's is made."""
    usr = host.root / "a/usr"
    real = {"mkdir": os.mkdir, "mknod": os.mknod, "symlink": os.symlink}[op]

    def then_swap(*args: Any, **kw: Any) -> None:
        real(*args, **kw)
        monkeypatch.setattr(os, op, real)
        target = usr / "new"
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        os.rename(_planted(target), target)

    monkeypatch.setattr(os, op, then_swap)
    ctx = Ctx(HOST.pid, uid=0, gid=0, umask=0o022)  # the host's root, through exec --cow
    d = nid(fs, "a/usr")
    if op == "mkdir":
        call(fs, "mkdir", d, b"new", 0o755, ctx)
    elif op == "mknod":
        call(fs, "mknod", d, b"new", stat.S_IFREG | 0o644, 0, ctx)
    else:
        call(fs, "symlink", d, b"new", b"target", ctx)
    _as_planted(usr / "new")


def test_create_never_opens_a_file_a_guest_put_in_the_name_meanwhile(fs, host):
    """The kernel sends create only for a name it just found missing; a file a guest
    process put there since is refused (EEXIST), never opened, chowned or chmodded."""
    usr = host.root / "a/usr"
    os.rename(_planted(usr / "new"), usr / "new")
    ctx = Ctx(HOST.pid, uid=0, gid=0)
    d = nid(fs, "a/usr")
    assert refused(fs, "create", d, b"new", 0o644, os.O_WRONLY | os.O_TRUNC, ctx) == errno.EEXIST
    _as_planted(usr / "new")


def test_a_setattr_changes_only_the_inode_it_was_asked_for(fs, host, monkeypatch):
    """Between finding a private file's name and changing it, a guest process renames its
    own set-uid file over that name: the chown and chmod that root asked for the first
    file fail (ESTALE) and the planted file keeps its owner and mode."""
    usr = host.root / "a/usr"
    node = nid(fs, "a/usr/own-a")
    _replace_after_resolve(fs, monkeypatch, usr / "own-a", _planted)
    assert refused(fs, "setattr", node, *changes(uid=0, gid=0, mode=0o104755), None, HOST) == (
        errno.ESTALE
    )
    _as_planted(usr / "own-a")
    # the same request on the name as it is now changes exactly that inode
    setattr_(fs, nid(fs, "a/usr/own-a"), uid=0, gid=0, mode=0o100700)
    st = os.lstat(usr / "own-a")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o700)


def test_an_xattr_change_reaches_only_the_inode_it_was_asked_for(fs, host, monkeypatch):
    """The same swap before a setxattr (say security.capability by root): ESTALE, and the
    planted file gets no attribute."""
    usr = host.root / "a/usr"
    node = nid(fs, "a/usr/own-a")
    _replace_after_resolve(fs, monkeypatch, usr / "own-a", _planted)
    assert refused(fs, "setxattr", node, b"user.granted", b"1", HOST) == errno.ESTALE
    assert "user.granted" not in os.listxattr(usr / "own-a")
    _as_planted(usr / "own-a")
