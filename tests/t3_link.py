"""Layer 3: the unification engine in-process, with the link protocol's seams (HOOKS) used
to make guests misbehave at exact moments.  Real files, real leases, real flags."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from conftest import fill, flags, inode, small_fs, snapshot
from unify import apply, engine, scan
from vsstore import attrs, hashing, syscalls
from vsstore.config import Paths, resolve_guest
from vsstore.errors import NoSpaceError
from vsstore.excludes import build_excludes
from vsstore.index import Index
from vsstore.safetree import GuestTree
from vsstore.store import Store

BIN = b"\x7fELF" + bytes(range(256)) * 40


def unify_run(host, *names, default_excludes=False, **kw) -> engine.Summary:
    paths = Paths.from_env()
    guests = [resolve_guest(n, paths) for n in names]
    excl = {g.name: build_excludes(use_default=default_excludes) for g in guests}
    idx = Index(paths.index_file)
    store = Store(paths.default_store)
    try:
        return engine.run(guests, excl, store, idx, engine.Options(**kw))
    finally:
        store.close()
        idx.close()


@pytest.fixture(autouse=True)
def clean_hooks():
    yield
    apply.HOOKS.clear()
    hashing.digest_hook = None


def test_identical_files_become_one_sealed_inode_in_the_store(host):
    a = host.guest("a", {"usr/bin/x": BIN, "usr/bin/only-a": BIN + b"a"})
    b = host.guest("b", {"usr/bin/x": BIN})
    c = host.guest("c", {"usr/bin/x": BIN})
    before = {g: snapshot(host.root / g) for g in "abc"}
    s = unify_run(host, "a", "b", "c")
    assert (s.files_linked, s.objects_created, s.errors) == (2, 1, 0)
    assert s.bytes_saved == 2 * len(BIN)
    ino = inode(a / "usr/bin/x")
    assert inode(b / "usr/bin/x") == ino == inode(c / "usr/bin/x")
    assert os.stat(a / "usr/bin/x").st_nlink == 4  # three guests and the store
    assert os.stat(a / "usr/bin/only-a").st_nlink == 1
    objs = [p for p in host.store.rglob("*") if p.is_file()]
    assert [inode(p) for p in objs] == [ino]
    assert flags(a / "usr/bin/x") == "UIa"
    assert {g: snapshot(host.root / g) for g in "abc"} == before  # content and metadata kept
    assert not list(host.root.rglob(".vsu~*"))


def test_metadata_mismatch_is_never_linked(host):
    def spec(n, mode=0o755, uid=0, gid=0, mtime=1_600_000_000):
        return (BIN + n.encode(), mode, uid, gid, mtime)

    host.guest("a", {n: spec(n) for n in "mogxt"})
    b = host.guest(
        "b",
        {
            "m": spec("m", 0o700),
            "o": spec("o", uid=1000),
            "g": spec("g", gid=50),
            "x": spec("x"),
            "t": spec("t", mtime=1_500_000_000),
        },
    )
    os.setxattr(
        b / "x", "security.capability", bytes.fromhex("0100000200200000000000000000000000000000")
    )
    s = unify_run(host, "a", "b")
    assert s.files_linked == 0
    for name in "mogxt":
        assert os.stat(b / name).st_nlink == 1, name
    s = unify_run(host, "a", "b", ignore_mtime=True)
    assert s.files_linked == 1
    assert os.stat(b / "t").st_nlink == 3
    for name in "mogx":
        assert os.stat(b / name).st_nlink == 1, name


def test_second_run_reads_and_links_nothing(host):
    for g in "ab":
        host.guest(g, {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(20)})
    first = unify_run(host, "a", "b")
    assert first.files_hashed == 40 and first.files_linked == 20
    again = unify_run(host, "a", "b")
    assert (again.files_hashed, again.files_linked, again.errors) == (0, 0, 0)
    host.guest("c", {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(20)})
    added = unify_run(host, "a", "b", "c")
    assert added.files_hashed == 20 and added.files_linked == 20


def test_symlinks_out_of_the_guest_are_never_followed(host):
    outside = host.base / "hostlib"
    outside.mkdir()
    (outside / "x").write_bytes(BIN)
    os.utime(outside / "x", (1_600_000_000, 1_600_000_000))
    a = host.guest("a", {"usr/bin/x": BIN})
    host.guest("b", {"usr/bin/x": BIN})
    (a / "var/lock").mkdir(parents=True)
    os.symlink(outside, a / "var/lock/subsys")
    os.symlink(outside / "x", a / "usr/bin/link-to-host")
    s = unify_run(host, "a", "b")
    assert s.files_linked == 1
    assert os.stat(outside / "x").st_nlink == 1
    assert flags(outside / "x") == "uia"


def test_a_file_changed_between_hashing_and_linking_is_not_replaced(host):
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})

    def change(**_):
        with open(b / "f", "r+b") as f:
            f.write(b"CHANGED")

    apply.HOOKS["hashed"] = change
    s = unify_run(host, "a", "b")
    assert s.files_linked == 0 and s.skipped_changed == 1 and s.errors >= 1
    assert (b / "f").read_bytes() == b"CHANGED" + BIN[7:]


def test_a_file_written_after_it_was_opened_for_hashing_is_skipped(host, monkeypatch):
    """The hashing opens files ahead and looks at each once, after reading it, against
    the walk's stat: a write between the open and the read (or during it) is seen there,
    and the file is neither indexed nor linked."""
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    victim = inode(b / "f")
    real = engine.content_digests

    def write_first(fd: int, size: int) -> tuple[bytes, bytes]:
        if os.fstat(fd).st_ino == victim:
            with open(b / "f", "r+b") as f:
                f.write(b"CHANGED")
            os.utime(b / "f", ns=(1, 1))
        return real(fd, size)

    monkeypatch.setattr(engine, "content_digests", write_first)
    s = unify_run(host, "a", "b")
    assert s.files_linked == 0 and s.errors == 1
    assert any("f: skipped: changed during the run" in m for m in s.messages), s.messages
    assert (b / "f").read_bytes() == b"CHANGED" + BIN[7:] and inode(b / "f") == victim


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("keep", [engine.KEEP_FDS, 1, 0])
def test_the_linker_leases_the_descriptor_the_hashing_read(host, monkeypatch, keep):
    """A file hashed is linked through the descriptor the hashing opened (one safe open
    per file, not two), as many as ``KEEP_FDS`` at once; past it, or without, the linker
    opens the name again.  The same links either way, and no descriptor left open."""
    files = {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(5)}
    for g in "abc":
        host.guest(g, files)
    opened: list[str] = []
    real = GuestTree.open_regular

    def counting(self, rel, *a, **kw):
        opened.append(rel)
        return real(self, rel, *a, **kw)

    monkeypatch.setattr(GuestTree, "open_regular", counting)
    monkeypatch.setattr(engine, "KEEP_FDS", keep)
    before = _fds()
    s = unify_run(host, "a", "b", "c")
    assert _fds() == before
    assert (s.files_hashed, s.files_linked, s.objects_created, s.errors) == (15, 10, 5, 0)
    reopened = len(opened) - s.files_hashed
    assert reopened == (15 if keep == 0 else 15 - keep if keep < 15 else 0), opened
    for i in range(5):
        assert len({inode(host.root / g / f"usr/lib/f{i}") for g in "abc"}) == 1


def test_no_index_row_is_written_for_an_inode_the_run_replaced(host, monkeypatch):
    """The hashes of a first run are stored after its links: the inodes that became
    names of objects (gone) get no row only to lose it again; the ones kept do, and an
    unchanged re-run reads nothing."""
    files = {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(5)}
    files["etc/own"] = BIN[:99]
    inos = {}
    for g in "abc":
        root = host.guest(g, {**files, "etc/own": BIN[:99] + g.encode()})
        inos.update({(g, rel): inode(root / rel) for rel in files})
    stored: list[int] = []
    real = Index.store

    def store(self, rows):
        rows = list(rows)
        stored.extend(r[1] for r in rows)
        return real(self, rows)

    monkeypatch.setattr(Index, "store", store)
    s = unify_run(host, "a", "b", "c")
    assert (s.files_hashed, s.files_linked) == (18, 10)
    replaced = {i for (g, rel), i in inos.items() if inode(host.root / g / rel) != i}
    assert len(replaced) == 10 and not replaced & set(stored), stored
    assert {inos[(g, "etc/own")] for g in "abc"} <= set(stored)
    again = unify_run(host, "a", "b", "c")
    assert (again.files_hashed, again.files_linked, again.errors) == (0, 0, 0)


def test_the_index_lookup_holds_no_row_beyond_its_record(tmp_path):
    """The rows are merged with the records in inode order: what the lookup leaves on
    the records (their digests) is all it allocates; it never holds the rows as a
    dict (about 0.4 KiB per inode)."""
    import tracemalloc

    idx = Index(tmp_path / "index.sqlite")
    n = 20_000
    idx.store(
        (1, i, 100 + i % 7, i, i, i.to_bytes(16, "big"), bytes(32), b"m" * 8, b"a" * 8)
        for i in range(n)
    )
    recs = [scan.InodeRec(1, i, 100 + i % 7, i, i if i % 10 else -1, 1) for i in range(n, 0, -1)]
    tracemalloc.start()
    try:
        to_hash = engine._from_index(recs, idx)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        idx.close()
    assert [r.ino for r in to_hash] == [i for i in range(n, 0, -1) if i % 10 == 0 or i == n]
    assert all(r.digest == r.ino.to_bytes(16, "big") for r in recs if r not in to_hash)
    assert peak - current < n * 40, (peak, current)


def test_a_file_removed_between_hashing_and_linking_is_no_error(host):
    """The guest deleted it after it was read (its descriptor still open for the linker):
    nothing to do, as for a file gone before it was read."""
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    apply.HOOKS["hashed"] = lambda **_: os.unlink(b / "f")
    s = unify_run(host, "a", "b")
    assert (s.files_linked, s.errors, s.objects_created) == (0, 0, 0)
    assert not (b / "f").exists() and (host.root / "a/f").read_bytes() == BIN


def test_a_directory_swapped_between_hashing_and_linking_keeps_both_files(host):
    """The guest moved the directory of a file that was read and put another file of the
    same size under the old name: the inode read is not what the name holds now; the
    new file stays the guest's own, the one read keeps its content."""
    host.guest("a", {"usr/lib/f": BIN})
    b = host.guest("b", {"usr/lib/f": BIN})
    other = bytes(reversed(BIN))

    def swap(**_):
        os.rename(b / "usr/lib", b / "usr/lib.old")
        (b / "usr/lib").mkdir()
        (b / "usr/lib/f").write_bytes(other)

    apply.HOOKS["hashed"] = swap
    unify_run(host, "a", "b")
    assert (b / "usr/lib/f").read_bytes() == other
    assert (b / "usr/lib.old/f").read_bytes() == BIN
    assert inode(b / "usr/lib/f") != inode(host.root / "a/usr/lib/f")
    assert not [p for p in (b / "usr/lib").iterdir() if p.name != "f"]


def test_a_file_open_for_writing_is_left_alone(host):
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    w = os.open(b / "f", os.O_WRONLY)
    try:
        s = unify_run(host, "a", "b")
    finally:
        os.close(w)
    assert s.files_linked == 0 and s.skipped_busy == 1
    assert os.stat(b / "f").st_nlink == 1


class _Opener:
    """Another process opening ``path`` (it blocks while we hold a lease), then maybe
    writing; ``result()`` tells what it got: "wrote", "opened" or the errno's name."""

    def __init__(self, path, flags, data=None) -> None:
        code = (
            "import errno, os, sys\n"
            "try:\n"
            f"    fd = os.open({str(path)!r}, {flags})\n"
            "except OSError as e:\n"
            "    print(errno.errorcode[e.errno]); sys.exit()\n"
            f"data = {data!r}\n"
            "try:\n"
            "    os.write(fd, data) if data else None\n"
            "    print('wrote' if data else 'opened')\n"
            "except OSError as e:\n"
            "    print('opened', errno.errorcode[e.errno])\n"
        )
        self.p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # the open is now waiting for our lease to go

    def result(self) -> str:
        out, _ = self.p.communicate(timeout=30)
        return out.strip()


def _opener(path, flags, data=None) -> _Opener:
    return _Opener(path, flags, data)


def test_a_writer_arriving_during_the_swap_keeps_its_own_file(host):
    a = host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    openers = []
    apply.HOOKS["linked"] = lambda **_: openers.append(_opener(b / "f", os.O_WRONLY, b"MINE"))
    s = unify_run(host, "a", "b")
    assert openers[0].result() == "wrote"
    assert s.files_linked == 0 and s.skipped_busy == 1
    assert (b / "f").read_bytes() == b"MINE" + BIN[4:]
    assert (a / "f").read_bytes() == BIN
    assert not list(host.root.rglob(".vsu~*"))


def test_a_name_replaced_during_the_swap_is_put_back(host):
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})

    def replace(**_):
        (b / "new").write_bytes(b"guest's new file")
        os.rename(b / "new", b / "f")

    apply.HOOKS["linked"] = replace
    s = unify_run(host, "a", "b")
    assert s.files_linked == 0 and s.errors == 1
    assert (b / "f").read_bytes() == b"guest's new file"
    assert not list(host.root.rglob(".vsu~*"))


def test_a_forced_hash_collision_never_links_different_contents(host):
    other = bytes(reversed(BIN))
    a = host.guest("a", {"same": BIN, "diff": BIN})
    b = host.guest("b", {"same": BIN, "diff": other})
    hashing.digest_hook = lambda d: b"\0" * 16  # every file "collides"
    s = unify_run(host, "a", "b")
    assert (b / "diff").read_bytes() == other and (a / "diff").read_bytes() == BIN
    assert inode(a / "diff") != inode(b / "diff")
    assert s.errors >= 1
    assert any("content differs" in m for m in s.messages)


def test_emlink_starts_another_generation_of_the_object(host):
    for g in "abcde":
        host.guest(g, {"f": BIN})
    s = unify_run(host, "a", "b", "c", "d", "e", link_limit=3)
    # Three links per object (the store's and two guests'): {a,b} {c,d} {e}.
    assert s.files_linked == 2 and s.objects_created == 3 and s.errors == 0
    objs = sorted(p.name for p in host.store.rglob("*") if p.is_file())
    assert [o[-2:] for o in objs[1:]] == [".1", ".2"]
    inos = [inode(host.root / g / "f") for g in "abcde"]
    assert inos[0] == inos[1] and inos[2] == inos[3] and len(set(inos)) == 3
    for g in "abcde":
        assert (host.root / g / "f").read_bytes() == BIN


def test_real_emlink_on_ext4(host):
    a = host.guest("a", {"f": BIN})
    host.guest("b", {"f": BIN})
    unify_run(host, "a", "b", immutable=False)
    many = a / "many"
    many.mkdir()
    n = os.stat(a / "f").st_nlink
    try:
        for i in range(70_000 - n):
            os.link(a / "f", many / str(i))
    except OSError as e:
        assert e.errno == 31  # EMLINK: the object is full
    c = host.guest("c", {"f": BIN}, configure=False)
    d = host.guest("d", {"f": BIN}, configure=False)
    s = unify_run(host, "b", str(c), str(d), immutable=False)
    assert s.errors == 0 and s.files_linked == 1
    # The full object takes no more names: c's file became generation 1 and d joined it.
    assert inode(c / "f") != inode(a / "f") and inode(c / "f") == inode(d / "f")
    gen1 = [p for p in host.store.rglob("*") if p.name.endswith(".1")]
    assert len(gen1) == 1 and inode(gen1[0]) == inode(c / "f")
    assert (c / "f").read_bytes() == BIN == (d / "f").read_bytes()


def test_a_writer_on_the_object_while_it_is_unsealed_is_refused(host):
    """A guest opening its (shared) name for writing while the object is unsealed for a
    link waits on our lease; it is stopped before the lease goes and its open starts again
    against the seal: EPERM.  Nobody's content changes, the batch stands."""
    a = host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    unify_run(host, "a", "b")
    shared = inode(a / "f")
    c = host.guest("c", {"f": BIN})
    openers = []

    def writer(**_):  # a's guest opens its (shared) file for writing in the window
        openers.append(_opener(a / "f", os.O_WRONLY, b"EVIL"))

    apply.HOOKS["linked"] = writer
    s = unify_run(host, "a", "b", "c")
    apply.HOOKS.clear()
    assert openers[0].result() == "EPERM"
    assert s.errors == 0 and s.files_linked == 1
    for g in (a, b, c):
        assert (g / "f").read_bytes() == BIN
        assert inode(g / "f") == shared
    obj = next(p for p in host.store.rglob("*") if p.is_file())
    assert obj.read_bytes() == BIN and flags(obj) == "UIa"


def test_a_writer_on_a_new_object_is_refused(host):
    a = host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    openers = []
    apply.HOOKS["linked"] = lambda **_: openers.append(_opener(a / "f", os.O_WRONLY, b"MINE"))
    s = unify_run(host, "a", "b")
    assert openers[0].result() == "EPERM"
    assert s.files_linked == 1
    assert (a / "f").read_bytes() == BIN == (b / "f").read_bytes()
    assert inode(a / "f") == inode(b / "f") and flags(a / "f") == "UIa"


def test_metadata_changed_in_the_link_window_is_restored(host):
    """chmod, chown, utimes and setxattr do not break a lease: a guest changing its name of
    the object while it is unsealed must not change what every other guest sees."""
    a = host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    unify_run(host, "a", "b")
    c = host.guest("c", {"f": BIN})

    def tamper(**_):
        os.chmod(a / "f", 0o4777)
        os.chown(a / "f", 1234, 1234)
        os.setxattr(a / "f", "user.evil", b"1")
        os.utime(a / "f", (5, 5))

    apply.HOOKS["linked"] = tamper
    s = unify_run(host, "a", "b", "c")
    apply.HOOKS.clear()
    assert s.files_linked == 1
    for g in (a, b, c):
        st = os.stat(g / "f")
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0)
        assert st.st_mtime == 1_600_000_000
        assert "user.evil" not in os.listxattr(g / "f")
    assert unify_run(host, "a", "b", "c").files_linked == 0  # the index holds the truth


def test_hardlinks_inside_a_guest_move_together(host):
    a = host.guest("a", {"usr/bin/perl": BIN})
    os.link(a / "usr/bin/perl", a / "usr/bin/perl5.36")
    b = host.guest("b", {"usr/bin/perl": BIN})
    s = unify_run(host, "b", "a")
    ino = inode(b / "usr/bin/perl")
    assert inode(a / "usr/bin/perl") == ino == inode(a / "usr/bin/perl5.36")
    assert s.bytes_saved == len(BIN)


def test_an_inode_with_names_outside_the_scan_is_never_sealed(host):
    a = host.guest("a", {"usr/share/x": BIN})
    b = host.guest("b", {"usr/share/x": BIN})
    for g in (a, b):
        (g / "etc").mkdir()
        os.link(g / "usr/share/x", g / "etc/x")  # /etc is excluded by default
    s = unify_run(host, "a", "b", default_excludes=True)
    assert s.files_linked == 0
    for g in (a, b):
        assert flags(g / "etc/x") == "uia"


def test_dry_run_changes_nothing(host):
    host.guest("a", {"f": BIN})
    b = host.guest("b", {"f": BIN})
    s = unify_run(host, "a", "b", dry_run=True)
    assert s.files_linked == 1 and s.bytes_saved == len(BIN)
    assert os.stat(b / "f").st_nlink == 1
    assert not [p for p in host.store.rglob("*") if p.is_file()]


def test_a_sealed_inode_with_unseen_names_keeps_its_seal(host):
    a = host.guest("a", {"f": BIN})
    host.guest("b", {"f": BIN})
    os.link(a / "f", host.base / "outside-name")  # a name no run will see
    fd = os.open(a / "f", os.O_RDONLY)
    attrs.seal(fd, immutable=True)
    os.close(fd)
    s = unify_run(host, "a", "b")
    assert s.files_linked == 0
    assert flags(a / "f") == "UIa"


def test_a_forced_collision_with_an_existing_object_is_caught_by_blake3(host):
    hashing.digest_hook = lambda d: b"\0" * 16
    a = host.guest("a", {"f": BIN})
    host.guest("b", {"f": BIN})
    assert unify_run(host, "a", "b").files_linked == 1
    other = bytes(reversed(BIN))
    c = host.guest("c", {"f": other})
    s = unify_run(host, "a", "b", "c")
    assert s.files_linked == 0 and any("content differs" in m for m in s.messages)
    assert (c / "f").read_bytes() == other and inode(c / "f") != inode(a / "f")


def test_a_guest_replacing_a_shared_file_is_seen_by_the_next_run(host):
    for g in "abc":
        host.guest(g, {"usr/lib/f": BIN})
    unify_run(host, "a", "b", "c")
    new = BIN + b"upgraded"
    for g in "ab":  # two guests upgrade the file the way dpkg does: new file, rename over
        p = host.root / g / "usr/lib"
        (p / "f.new").write_bytes(new)
        os.utime(p / "f.new", (1_600_000_000, 1_600_000_000))
        fd = os.open(p / "f", os.O_RDONLY)
        attrs.set_immutable(fd, False)
        os.rename(p / "f.new", p / "f")
        os.close(fd)
    s = unify_run(host, "a", "b", "c")
    # The two new files, and the object (lifting its flag changed its ctime) ...
    assert s.files_hashed == 3 and s.files_linked == 1
    assert inode(host.root / "a/usr/lib/f") == inode(host.root / "b/usr/lib/f")
    assert (host.root / "c/usr/lib/f").read_bytes() == BIN
    assert flags(host.root / "c/usr/lib/f") == "UIa"  # ... which is sealed again


def test_an_unsealed_object_is_checked_then_used_and_sealed(host):
    a = host.guest("a", {"f": BIN})
    host.guest("b", {"f": BIN})
    unify_run(host, "a", "b")
    obj = next(p for p in host.store.rglob("*") if p.is_file())
    fd = os.open(obj, os.O_RDONLY)
    attrs.set_immutable(fd, False)
    attrs.clear_marker(fd)  # as if sealing had never happened
    os.close(fd)
    c = host.guest("c", {"f": BIN})
    s = unify_run(host, "a", "b", "c")
    assert s.files_linked == 1 and s.errors == 0
    assert inode(c / "f") == inode(a / "f") == inode(obj)
    assert flags(obj) == "UIa"


def test_an_object_whose_content_no_longer_matches_its_name_is_dropped(host):
    a = host.guest("a", {"f": BIN})
    host.guest("b", {"f": BIN})
    unify_run(host, "a", "b", immutable=False)
    with open(a / "f", "r+b") as f:  # without the immutable flag, a guest can do this
        f.write(b"EVIL")
    c = host.guest("c", {"f": BIN})
    s = unify_run(host, "a", "b", "c", immutable=False)
    assert any("content changed although guests share it" in m for m in s.messages)
    assert (c / "f").read_bytes() == BIN
    assert not any(p.is_file() and inode(p) == inode(a / "f") for p in host.store.rglob("*"))


# Names a guest may hold: not UTF-8, control characters, an option's look.
HOSTILE = [os.fsdecode(b"\xff\xfe"), "new\nline", "tab\tx", "-rf", "--help", "a\\xff"]
HOSTILE_SHOWN = ["\\xff\\xfe", "new\\nline", "tab\\tx", "-rf", "--help", "a\\\\xff"]


def test_hostile_names_are_linked_in_one_run(host):
    files = {f"usr/lib/{n}": BIN + os.fsencode(n) for n in HOSTILE}
    a = host.guest("a", files)
    b = host.guest("b", files)
    before = {g: snapshot(host.root / g) for g in "ab"}
    s = unify_run(host, "a", "b")
    assert (s.files_linked, s.objects_created, s.errors) == (len(HOSTILE), len(HOSTILE), 0)
    for n in HOSTILE:
        assert inode(a / "usr/lib" / n) == inode(b / "usr/lib" / n), n
        assert flags(a / "usr/lib" / n) == "UIa"
    assert {g: snapshot(host.root / g) for g in "ab"} == before
    assert not list(host.root.rglob(".vsu~*"))
    again = unify_run(host, "a", "b")  # the index found them by inode: nothing to read
    assert (again.files_hashed, again.files_linked, again.errors) == (0, 0, 0)


def test_messages_show_hostile_names_escaped(host):
    files = {f"usr/lib/{n}": BIN + os.fsencode(n) for n in HOSTILE}
    host.guest("a", files)
    b = host.guest("b", files)
    writers = [os.open(b / "usr/lib" / n, os.O_WRONLY) for n in HOSTILE]
    try:
        s = unify_run(host, "a", "b")
    finally:
        for w in writers:
            os.close(w)
    assert s.files_linked == 0 and s.errors == len(HOSTILE)
    for shown_name in HOSTILE_SHOWN:
        assert (
            f"b:/usr/lib/{shown_name}: skipped: open for writing by another process" in s.messages
        ), (shown_name, s.messages)
    for m in s.messages:
        assert m.isprintable(), m  # no newline, tab or undecodable byte in any message


def _journal_rows(host) -> int:
    idx = Index(host.index)
    try:
        return len(idx.journal())
    finally:
        idx.close()


def test_a_journal_that_cannot_be_written_stops_the_run_before_any_link(host):
    """The index's filesystem fills up after hashing: the run stops with NoSpaceError
    before its first link (nothing is linked that is not journaled); once space is free,
    the next run does the work."""
    files = {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(20)}
    with small_fs(host.base / "state", 1) as state:
        for g in "ab":
            host.guest(g, files)
        before = {g: snapshot(host.root / g) for g in "ab"}
        filler = []
        apply.HOOKS["hashed"] = lambda **_: filler.append(fill(state))
        with pytest.raises(NoSpaceError, match=f"no space left on {state} for the index"):
            unify_run(host, "a", "b")
        assert filler  # the disk filled between hashing and linking
        assert {g: snapshot(host.root / g) for g in "ab"} == before
        assert all(os.stat(host.root / g / rel).st_nlink == 1 for g in "ab" for rel in files)
        assert not list(host.root.rglob(".vsu~*"))
        apply.HOOKS.clear()
        filler[0].unlink()
        s = unify_run(host, "a", "b")
        assert (s.files_linked, s.errors) == (20, 0)
        assert _journal_rows(host) == 0
        assert {g: snapshot(host.root / g) for g in "ab"} == before


def test_a_full_guest_filesystem_stops_the_run_after_finishing_its_window(host):
    """The guests' filesystem fills up while a window links: no name is linked after the
    first ENOSPC, what was linked is finished (sealed, duplicates removed), and the run
    stops with NoSpaceError naming the filesystem; the next run tidies up and goes on."""
    files = {f"usr/lib/f{i}": BIN + bytes([i]) for i in range(20)}
    with small_fs(host.root, 16, "ext4") as root:
        for g in "ab":
            host.guest(g, files)
        before = {g: snapshot(root / g) for g in "ab"}
        for i in range(256):  # the store's directories exist: only the guests' can fill
            (root / ".hash" / f"{i:02x}").mkdir(parents=True)
        stuffing: list = []

        def full(**_):
            if stuffing:
                return
            stuffing.append(fill(root))
            for g in "ab":  # and their directory blocks: no room for a temporary name
                for i in range(10_000):
                    try:
                        os.close(os.open(root / g / f"usr/lib/stuff{i:05d}", os.O_CREAT))
                    except OSError as e:
                        assert e.errno == 28  # ENOSPC
                        break
                    stuffing.append(root / g / f"usr/lib/stuff{i:05d}")

        apply.HOOKS["journaled"] = full
        with pytest.raises(
            NoSpaceError, match=f"no space left on {root} for linking [ab]:/usr/lib/f"
        ):
            unify_run(host, "a", "b")
        assert not list(root.rglob(".vsu~*"))
        # The window got as far as the store: its object is sealed, its seed the only name.
        [obj] = [p for p in (root / ".hash").rglob("*") if p.is_file()]
        assert os.stat(obj).st_nlink == 2 and flags(obj) == "UIa"
        assert _journal_rows(host) > 0  # the chunk's rows: the next run resolves them
        apply.HOOKS.clear()
        for p in stuffing:
            p.unlink()
        assert {g: snapshot(root / g) for g in "ab"} == before
        s = unify_run(host, "a", "b")
        assert s.errors == 0
        assert all(inode(root / "a" / rel) == inode(root / "b" / rel) for rel in files)
        assert _journal_rows(host) == 0
        assert {g: snapshot(root / g) for g in "ab"} == before


def _layout(i: int) -> dict[str, bytes]:
    """Files of many sizes: shared by every guest, by some, and each guest's own."""
    files = {f"usr/lib/s{n}": BIN[: 100 + 37 * n] for n in range(12)}
    files.update({f"usr/share/p{n}": BIN[:50] + bytes([n, i % 2]) * (5 + n) for n in range(6)})
    files.update({f"etc/own{n}": BIN[:80] + bytes([i, n]) * (3 + n) for n in range(4)})
    return files


def test_a_run_in_passes_by_size_links_what_one_pass_would(host):
    """A walk over more inodes than ``max_inodes`` goes on in passes by size range: the
    same links, objects and savings as one pass (here: what a dry run of one pass says)."""
    names = [f"g{i}" for i in range(5)]
    for i, g in enumerate(names):
        root = host.guest(g, _layout(i))
        os.link(root / "usr/lib/s3", root / "usr/lib/s3-again")  # a second name
    want = unify_run(host, *names, dry_run=True, max_inodes=None)
    got = unify_run(host, *names, max_inodes=7)
    assert want.objects_created > 3 and want.files_linked > 40
    assert (got.objects_created, got.files_linked, got.bytes_saved, got.errors) == (
        want.objects_created,
        want.files_linked,
        want.bytes_saved,
        0,
    )
    assert got.files_scanned == want.files_scanned == 5 * (len(_layout(0)) + 1)
    for rel in _layout(0):
        inos = {inode(host.root / g / rel) for g in names}
        assert all(
            (host.root / g / rel).read_bytes() == _layout(i)[rel] for i, g in enumerate(names)
        )
        assert len(inos) == (1 if rel.startswith("usr/lib") else 2 if "/p" in rel else 5), rel
    again = unify_run(host, *names, max_inodes=7)
    assert (again.files_hashed, again.files_linked, again.errors) == (0, 0, 0)


def test_a_run_in_passes_walks_each_guest_once(host, monkeypatch):
    """The passes read the first walk's records back from its spill: every guest is
    walked once however many passes there are; a run within its budget spills nothing."""
    names = [f"g{i}" for i in range(5)]
    for i, g in enumerate(names):
        host.guest(g, _layout(i))
    walked: list[str] = []
    real_listings = GuestTree.listings

    def listings(self, *a, **kw):
        walked.append(self.name)
        return real_listings(self, *a, **kw)

    started: list[int] = []
    real_start = scan.Spill.start

    def start(self):
        started.append(1)
        real_start(self)

    monkeypatch.setattr(GuestTree, "listings", listings)
    monkeypatch.setattr(scan.Spill, "start", start)
    passes: list[tuple[int, int]] = []
    real_from_spill = scan.from_spill
    monkeypatch.setattr(
        scan,
        "from_spill",
        lambda sp, t, sizes, o: passes.append(sizes) or real_from_spill(sp, t, sizes, o),
    )
    s = unify_run(host, *names, max_inodes=7)
    assert s.errors == 0 and s.files_linked > 40
    assert len(passes) > 3 and started
    assert sorted(walked) == sorted(names)
    walked.clear()
    started.clear()
    again = unify_run(host, *names, max_inodes=None)
    assert (again.files_hashed, again.files_linked) == (0, 0)
    assert sorted(walked) == sorted(names) and not started


def test_a_file_changed_after_the_walk_of_a_run_in_passes_is_left_alone(host, monkeypatch):
    """A pass works from the first walk's records: a file a guest rewrote since (the same
    size, before its pass) is skipped as changed, and kept as the guest wrote it; the
    next run links it."""
    names = [f"g{i}" for i in range(5)]
    for i, g in enumerate(names):
        host.guest(g, _layout(i))
    target = host.root / "g1/usr/lib/s11"  # the largest shared size: the last pass's
    real_from_spill = scan.from_spill

    def from_spill(sp, trees, sizes, objects):
        lo, hi = sizes
        if lo <= target.stat().st_size < hi and target.read_bytes() == BIN[: 100 + 37 * 11]:
            with open(target, "r+b") as f:
                f.write(b"X")
        return real_from_spill(sp, trees, sizes, objects)

    monkeypatch.setattr(scan, "from_spill", from_spill)
    s = unify_run(host, *names, max_inodes=7)
    assert target.read_bytes() == b"X" + BIN[1 : 100 + 37 * 11]
    assert os.stat(target).st_nlink == 1
    assert s.errors == 1 and any("g1:/usr/lib/s11: skipped: changed" in m for m in s.messages)
    monkeypatch.setattr(scan, "from_spill", real_from_spill)
    with open(target, "r+b") as f:
        f.write(BIN[:1])
    was = os.stat(host.root / "g0/usr/lib/s11")
    os.utime(target, ns=(was.st_atime_ns, was.st_mtime_ns))
    again = unify_run(host, *names, max_inodes=7)
    assert again.errors == 0 and again.files_linked == 1
    assert inode(target) == inode(host.root / "g0/usr/lib/s11")


def test_a_spill_gives_back_each_record_of_a_size_range_with_its_name(tmp_path):
    """Names as bytes (not UTF-8, a newline; one longer than 65,535 bytes, as a walk
    by components can reach), records across the reader's 4 MiB chunks."""
    trees = [types.SimpleNamespace(dev=7, n=0), types.SimpleNamespace(dev=7, n=1)]
    sp = scan.Spill(tmp_path)
    buf = bytearray()
    hostile = os.fsdecode(b"usr/\xff\nname")
    want = []
    for i in range(120_000):
        rel = hostile if i % 1000 == 0 else f"d/{i:06d}-" + "x" * (i % 40)
        if i == 12_010:
            rel = "/".join(["y" * 250] * 280)
        raw = os.fsencode(rel)
        buf += scan._SPILLED.pack(7, i, i % 50, -i, i, 1 + i % 3, i % 2, len(raw)) + raw
        if 10 <= i % 50 < 20:
            want.append((i % 2, rel, (7, i, i % 50, -i, i, 1 + i % 3)))
        if len(buf) > 300_000:
            sp.add(buf)
            buf = bytearray()
            if i > 60_000:
                sp.start()
    sp.add(buf)
    sp.start()
    assert os.listdir(tmp_path) == []  # unlinked from the start
    got = [
        (trees.index(t), rel, (r.dev, r.ino, r.size, r.mtime_ns, r.ctime_ns, r.nlink))
        for t, rel, r in sp.read(trees, 10, 20)
    ]
    assert got == want and len(got) == 24_000
    assert sum(1 for _ in sp.read(trees, 0, 1 << 63)) == 120_000
    sp.close()


def test_a_full_state_filesystem_stops_a_run_in_passes_before_it_changes_anything(
    host, monkeypatch
):
    """The spill cannot be written: NoSpaceError naming the state directory's filesystem,
    every guest as it was."""
    names = [f"g{i}" for i in range(3)]
    for i, g in enumerate(names):
        host.guest(g, _layout(i))
    before = {g: snapshot(host.root / g) for g in names}
    with small_fs(host.base / "state", 1) as state:
        filler: list[Path] = []
        real_start = scan.Spill.start
        monkeypatch.setattr(
            scan.Spill, "start", lambda self: filler.append(fill(state)) or real_start(self)
        )
        with pytest.raises(NoSpaceError, match=f"no space left on {state} for the walk"):
            unify_run(host, *names, max_inodes=7)
        assert filler
        assert {g: snapshot(host.root / g) for g in names} == before


def test_a_pass_by_size_reads_only_its_sizes_from_the_index(host, monkeypatch):
    """A run in passes holds one pass's index rows, not the whole index: each pass asks
    the index for the sizes it walked, and an unchanged re-run still reads nothing."""
    names = [f"g{i}" for i in range(5)]
    for i, g in enumerate(names):
        host.guest(g, _layout(i))
    unify_run(host, *names, max_inodes=7)
    idx = Index(Paths.from_env().index_file)
    total = len(list(idx))
    idx.close()
    loaded: list[int] = []
    real = Index.rows

    def rows(self, dev, sizes=None):
        got = list(real(self, dev, sizes))
        loaded.append(len(got))
        return iter(got)

    monkeypatch.setattr(Index, "rows", rows)
    again = unify_run(host, *names, max_inodes=7)
    assert (again.files_hashed, again.files_linked, again.errors) == (0, 0, 0)
    assert len(loaded) > 2 and sum(loaded) <= total and max(loaded) < total / 2, (loaded, total)


@pytest.mark.parametrize("how", ["in place", "new inode"])
def test_a_rerun_rereads_a_file_changed_with_the_same_size_and_mtime(host, how):
    """The index keys a digest by size, mtime and ctime: a file rewritten with the same
    size and its old mtime put back is read again (its ctime moved)."""
    a = host.guest("a", {"f": BIN + b"A"})
    b = host.guest("b", {"f": BIN + b"B"})
    first = unify_run(host, "a", "b")
    assert (first.files_hashed, first.files_linked) == (2, 0)
    old = os.stat(b / "f")
    if how == "in place":
        with open(b / "f", "r+b") as f:
            f.write(BIN + b"A")
    else:
        (b / "f.new").write_bytes(BIN + b"A")
        os.rename(b / "f.new", b / "f")
    os.utime(b / "f", ns=(old.st_atime_ns, old.st_mtime_ns))
    st = os.stat(b / "f")
    assert (st.st_size, st.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    s = unify_run(host, "a", "b")
    assert s.files_hashed == 1 and s.files_linked >= 1 and s.errors == 0
    assert inode(a / "f") == inode(b / "f")
    assert (a / "f").read_bytes() == (b / "f").read_bytes() == BIN + b"A"


def test_one_guest_over_the_bound_is_unified_in_passes(host):
    """A single guest with more inodes than ``max_inodes`` (the walker itself stops
    keeping records): its duplicates are linked all the same."""
    files = {f"d{n % 3}/f{n}": BIN[: 40 + n % 9] for n in range(60)}
    host.guest("solo", files)
    s = unify_run(host, "solo", max_inodes=5)
    assert s.errors == 0 and s.objects_created == 9 and s.files_linked == 60 - 9
    assert len({inode(host.root / "solo" / rel) for rel in files}) == 9


def test_a_breached_object_moves_every_guest_name_to_a_fresh_copy(host):
    """On a filesystem that lets a writer holding an object open write despite the seal,
    the linker evacuates: every name of the object in the run's guests (a guest's two
    names of it too), and the store's, move to a fresh sealed copy, though a run keeps
    only one name per object (a walk finds the others)."""
    g = {n: host.guest(n, {"usr/f": BIN, "usr/lib/g": BIN}) for n in "abc"}
    unify_run(host, "a", "b", "c")
    old = inode(g["a"] / "usr/f")
    paths = Paths.from_env()
    store, idx = Store(paths.default_store), Index(paths.index_file)
    trees = engine.open_trees([resolve_guest(n, paths) for n in "abc"], store)
    try:
        linker = apply.Linker(
            store, idx, immutable=True, ignore_mtime=False, stats=engine.Summary()
        )
        linker.trees = trees
        (obj,) = [o for group in store.scan().values() for o in group]
        odir, oname = store.dir_and_name(obj)
        ofd = os.open(oname, os.O_RDONLY, dir_fd=odir)
        try:
            attrs.set_immutable(ofd, False)  # as the window left it
            linker.evacuate(obj, ofd)
            left = os.fstat(ofd).st_nlink
        finally:
            os.close(ofd)
    finally:
        for t in trees:
            t.close()
        store.close()
        idx.close()
    new = inode(g["a"] / "usr/f")
    assert new != old and left == 0
    names = [g[n] / rel for n in "abc" for rel in ("usr/f", "usr/lib/g")]
    assert {inode(p) for p in names} == {new}
    assert all(p.read_bytes() == BIN for p in names)
    obj_path = next(p for p in host.store.rglob("*") if p.is_file())
    assert inode(obj_path) == new and flags(obj_path) == "UIa"
    assert os.stat(obj_path).st_nlink == 7


def _drop_from_page_cache(paths: list) -> None:
    for p in paths:  # written back, then dropped
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    cached = subprocess.run(
        ["fincore", "--raw", "--noheadings", "--output", "PAGES", *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert cached == ["0"] * len(paths)  # (fincore asks mincore(2): it reads nothing)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "on-disk"])
def test_files_are_read_ahead_and_hashed_by_the_run_itself(host, monkeypatch, cached):
    """The run hashes in its own thread, cached data or not (reader threads spent more CPU
    handing the interpreter's lock around than reading small files); the data of the
    files ahead is asked for first (WILLNEED), so the kernel reads them meanwhile."""
    paths = []
    for g in "ab":
        root = host.guest(g, {f"usr/f{i}": BIN + bytes([i]) for i in range(5)})
        paths += [root / f"usr/f{i}" for i in range(5)]
    if not cached:
        _drop_from_page_cache(paths)
    events: list[str] = []
    fadvise = os.posix_fadvise

    def spy(fd: int, off: int, n: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            events.append("willneed")
        fadvise(fd, off, n, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    seen: list[str] = []  # the hashing threads

    def hook(d: bytes) -> bytes:
        events.append("digest")
        seen.append(threading.current_thread().name)
        return d

    hashing.digest_hook = hook
    s = unify_run(host, "a", "b")
    assert s.files_linked == 5 and len(seen) == 10
    assert set(seen) == {threading.main_thread().name}
    assert events == ["willneed"] * 10 + ["digest"] * 10  # one chunk: all asked for first
    # what is asked for ahead is bounded in bytes too (a small page cache): here one file
    events.clear()
    for g in "cd":
        host.guest(g, {f"usr/f{i}": BIN + bytes([i]) for i in range(3)})
    monkeypatch.setattr(engine, "AHEAD_BYTES", 1)
    s = unify_run(host, "a", "b", "c", "d")
    assert s.files_linked == 6
    assert events == ["willneed", "digest"] * 6


def test_a_filesystem_that_refuses_the_advice_is_read_all_the_same(host, monkeypatch):
    def refuse(fd: int, off: int, n: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "not here")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    for g in "ab":
        host.guest(g, {f"usr/f{i}": BIN + bytes([i]) for i in range(3)})
    s = unify_run(host, "a", "b")
    assert (s.files_linked, s.errors) == (3, 0)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_closer_takes_finished_descriptors_a_batch_at_a_time_and_closes_all(
    tmp_path, monkeypatch
):
    """Finished descriptors reach the closing thread in batches (a window's two or three
    each would wake it once per window), never more at once than its bound, and every one
    is closed when the linker is done."""
    monkeypatch.setattr(apply.Closer, "BATCH", 4)
    fds = [os.open(tmp_path, os.O_RDONLY) for _ in range(12)]
    closer = apply.Closer(max_fds=6)
    try:
        closer.close_later(fds[:2])
        closer.close_later(fds[2:3])
        assert closer.q.empty() and closer.pending == fds[:3]  # below a batch: kept
        closer.close_later(fds[3:5])
        assert closer.pending == [] and closer.waiting <= 6  # a batch: handed over
        closer.close_later(fds[5:12])  # more than the bound at once: handed over whole
        assert closer.pending == []
    finally:
        closer.finish()
    assert closer.waiting == 0 and not any(_is_open(fd) for fd in fds)


def test_a_window_lets_go_of_its_leases_before_its_descriptors_wait_for_the_closer(
    host, monkeypatch
):
    """The closer takes descriptors a batch at a time, so they may wait a while: none of
    them still holds its lease then (a guest's writer of a joiner left as it was would
    wait for the batch)."""
    host.guest("a", {"f": BIN, "g": BIN + b"g"})
    host.guest("b", {"f": BIN, "g": BIN + b"g"})
    leases: list[int] = []
    real = apply.Closer.close_later

    def looking(self: apply.Closer, fds: list[int]) -> None:
        leases.extend(fcntl.fcntl(fd, syscalls.F_GETLEASE) for fd in fds)
        real(self, fds)

    monkeypatch.setattr(apply.Closer, "close_later", looking)
    s = unify_run(host, "a", "b")
    assert s.files_linked == 2 and len(leases) >= 4
    assert set(leases) == {fcntl.F_UNLCK}
