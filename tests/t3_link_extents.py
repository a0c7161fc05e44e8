"""Layer 3: vsunify's extent phase (unify/dedupe.py) on guests living on loop-mounted XFS
and btrfs images: what hardlinks must leave alone (excluded files, duplicates whose
metadata differ) shares its blocks, stays the guest's own and writable, keeps every bit of
its metadata; '=' rules, --no-reflink and --reflink-only; the index spares a re-run;
ext4 guests behave as before."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fsimages import REFLINK_KINDS, physical, reflink_host

from conftest import Host, flags, inode
from unify import apply, engine
from unify.dedupe import Reflink
from vsstore.config import Paths, resolve_guest
from vsstore.excludes import build_excludes
from vsstore.index import Index
from vsstore.store import Store

MIB = 1 << 20
BIG = os.urandom(3 * MIB) + b"odd tail"  # a config file or database, the same in each guest
BIN = b"\x7fELF" + os.urandom(200_000)


@pytest.fixture(params=REFLINK_KINDS)
def rhost(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """A throw-away host whose guests, store and index live on a fresh XFS (reflink) or
    btrfs image."""
    with reflink_host(request.param, monkeypatch) as h:
        yield h


@pytest.fixture(autouse=True)
def clean_hooks() -> Iterator[None]:
    yield
    apply.HOOKS.clear()


def unify_run(*names: str, exclude: tuple[str, ...] = (), **kw: Any) -> engine.Summary:
    """A run with the built-in exclude list (and ``exclude`` rules before it)."""
    paths = Paths.from_env()
    guests = [resolve_guest(n, paths) for n in names]
    excl = {g.name: build_excludes(cli=exclude) for g in guests}
    idx = Index(paths.index_file)
    store = Store(paths.default_store)
    try:
        return engine.run(guests, excl, store, idx, engine.Options(**kw))
    finally:
        store.close()
        idx.close()


def _stat(p: Path) -> tuple:
    st = os.lstat(p)
    xattrs = sorted((n, os.getxattr(p, n)) for n in os.listxattr(p) if ".vsstore." not in n)
    return (st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, xattrs)


def _object(host: Host, p: Path) -> Path:
    return next(o for o in host.store.rglob("*") if o.is_file() and inode(o) == inode(p))


def test_excluded_files_share_blocks_and_stay_the_guests_own(rhost: Host) -> None:
    a = rhost.guest("a", {"etc/big.db": BIG, "usr/bin/x": BIN, "etc/own": BIG[:MIB] + b"a"})
    b = rhost.guest("b", {"etc/big.db": BIG, "usr/bin/x": BIN, "etc/own": BIG[:MIB] + b"b"})
    before = {p: _stat(p) for p in (a / "etc/big.db", b / "etc/big.db")}
    s = unify_run("a", "b")
    assert (s.reflink, s.files_linked, s.errors) == ("on", 1, 0)
    assert (s.files_deduped, s.bytes_deduped) == (1, len(BIG))
    assert inode(a / "usr/bin/x") == inode(b / "usr/bin/x")  # hardlinks as before
    assert physical(a / "etc/big.db") == physical(b / "etc/big.db")  # the blocks, once
    assert set(physical(a / "etc/own")).isdisjoint(physical(b / "etc/own"))
    # Nothing of the files changed: inode, mode, owner, times, xattrs; no seal.
    assert {p: _stat(p) for p in before} == before
    assert flags(b / "etc/big.db") == "uia"
    # The guest's own still: writable in place, and the other keeps its bytes.
    with open(b / "etc/big.db", "r+b") as f:
        f.seek(MIB)
        f.write(b"b's change")
    assert (a / "etc/big.db").read_bytes() == BIG
    assert (b / "etc/big.db").read_bytes() == BIG[:MIB] + b"b's change" + BIG[MIB + 10 :]


def test_duplicates_whose_metadata_differ_share_blocks_with_the_object(rhost: Host) -> None:
    cap = bytes.fromhex("01000002" + "00200000" + "00" * 12)
    a = rhost.guest("a", {"usr/bin/y": (BIN, 0o755)})
    rhost.guest("c", {"usr/bin/y": (BIN, 0o755)})
    b = rhost.guest("b", {"usr/bin/y": (BIN, 0o4750, 1000, 50)})
    d = rhost.guest("d", {"usr/bin/y": (BIN, 0o755, 0, 0, 1_500_000_000)})
    os.setxattr(d / "usr/bin/y", "security.capability", cap)
    before = {p: _stat(p) for p in (b / "usr/bin/y", d / "usr/bin/y")}
    dry = unify_run("a", "b", "c", "d", dry_run=True)  # what is linked is not counted twice
    assert (dry.files_linked, dry.files_deduped) == (1, 2)
    s = unify_run("a", "b", "c", "d")
    assert (s.files_linked, s.files_deduped, s.errors) == (1, 2, 0)
    obj = _object(rhost, a / "usr/bin/y")
    assert physical(obj) == physical(b / "usr/bin/y") == physical(d / "usr/bin/y")
    assert {p: _stat(p) for p in before} == before  # setuid, owner, capability, mtime, ctime
    assert inode(b / "usr/bin/y") != inode(a / "usr/bin/y") != inode(d / "usr/bin/y")


def test_an_unchanged_rerun_asks_nothing_and_a_changed_file_is_shared_again(rhost: Host) -> None:
    a = rhost.guest("a", {"var/lib/x.db": BIG})
    b = rhost.guest("b", {"var/lib/x.db": BIG})
    rhost.guest("c", {"var/lib/x.db": BIG})
    assert unify_run("a", "b", "c").files_deduped == 2
    again = unify_run("a", "b", "c")
    assert (again.files_hashed, again.files_deduped) == (0, 0)  # the index remembers
    (b / "var/lib/x.db").write_bytes(BIG)  # rewritten by its guest: new blocks
    assert set(physical(a / "var/lib/x.db")).isdisjoint(physical(b / "var/lib/x.db"))
    third = unify_run("a", "b", "c")
    assert (third.files_hashed, third.files_deduped) == (1, 1)
    assert physical(a / "var/lib/x.db") == physical(b / "var/lib/x.db")


def test_equals_rules_and_no_reflink_leave_files_alone(rhost: Host) -> None:
    a = rhost.guest("a", {"etc/keep": BIG, "tmp/scratch": BIG, "etc/big.db": BIG[:-1]})
    b = rhost.guest("b", {"etc/keep": BIG, "tmp/scratch": BIG, "etc/big.db": BIG[:-1]})
    s = unify_run("a", "b", reflink=Reflink.OFF)
    assert (s.reflink, s.files_deduped) == ("off", 0)
    assert set(physical(a / "etc/big.db")).isdisjoint(physical(b / "etc/big.db"))
    s = unify_run("a", "b", exclude=("=/etc/keep",))  # /tmp: '=' in the built-in list
    assert s.files_deduped == 1
    assert physical(a / "etc/big.db") == physical(b / "etc/big.db")
    for rel in ("etc/keep", "tmp/scratch"):
        assert set(physical(a / rel)).isdisjoint(physical(b / rel)), rel


def test_reflink_only_links_nothing_and_shares_blocks(rhost: Host) -> None:
    a = rhost.guest("a", {"usr/bin/x": BIN, "etc/big.db": BIG})
    b = rhost.guest("b", {"usr/bin/x": BIN, "etc/big.db": BIG})
    s = unify_run("a", "b", reflink=Reflink.ONLY)
    assert (s.files_linked, s.objects_created, s.files_deduped) == (0, 0, 2)
    assert inode(a / "usr/bin/x") != inode(b / "usr/bin/x")
    for rel in ("usr/bin/x", "etc/big.db"):
        assert physical(a / rel) == physical(b / rel), rel
    assert flags(b / "usr/bin/x") == "uia"


def test_a_guest_writing_while_its_file_is_shared_loses_nothing(rhost: Host) -> None:
    """The guest writes its file at the very moment the kernel is asked to share it (the
    hook runs just before the call, the writer goes on during it): every write is there."""
    rhost.guest("a", {"var/db": BIG})
    b = rhost.guest("b", {"var/db": BIG})
    want = bytearray(BIG)
    threads: list[threading.Thread] = []

    def writer() -> None:
        fd = os.open(b / "var/db", os.O_WRONLY)
        try:
            for k in range(300):
                off = (k * 104_729) % (len(BIG) - 16)
                chunk = b"guest write %04d" % k
                os.pwrite(fd, chunk, off)
                want[off : off + len(chunk)] = chunk
        finally:
            os.close(fd)

    def start(paths: object) -> None:
        t = threading.Thread(target=writer)
        threads.append(t)
        t.start()

    apply.HOOKS["dedupe"] = start
    s = unify_run("a", "b")
    for t in threads:
        t.join()
    assert threads and s.errors == 0
    assert (b / "var/db").read_bytes() == bytes(want)
    assert (rhost.root / "a/var/db").read_bytes() == BIG


def test_ext4_guests_behave_as_before(host: Host) -> None:
    a = host.guest("a", {"etc/big.db": BIG, "usr/bin/x": BIN})
    host.guest("b", {"etc/big.db": BIG, "usr/bin/x": BIN})
    s = unify_run("a", "b")
    assert s.reflink.startswith("unavailable: ") and "cannot share extents" in s.reflink
    assert (s.files_linked, s.files_deduped, s.files_scanned) == (1, 0, 2)
    p = host.vsunify("run", "--reflink-only", "a", "b", check=False)
    assert p.returncode == 7 and "Traceback" not in p.stderr
    assert "--reflink-only" in p.stderr and "XFS" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert flags(a / "etc/big.db") == "uia"


def test_the_command_line_says_what_it_shared(rhost: Host) -> None:
    rhost.guest("a", {"etc/big.db": BIG, "srv/key": BIG[:-2]})
    rhost.guest("b", {"etc/big.db": BIG, "srv/key": BIG[:-2]})
    p = rhost.vsunify("run", "--no-reflink", "--reflink-only", "a", "b", check=False)
    assert p.returncode == 2 and "not allowed with" in p.stderr
    a = rhost.root / "a/etc/big.db"
    dry = rhost.run_json("--dry-run", "--exclude", "=/srv", "a", "b")
    assert (dry["reflink"], dry["files_deduped"], dry["bytes_deduped"]) == ("on", 1, len(BIG))
    assert set(physical(a)).isdisjoint(physical(rhost.root / "b/etc/big.db"))
    assert not rhost.store.exists()  # a dry run makes no store (its probe leaves nothing)
    out = rhost.run_json("--exclude", "=/srv", "a", "b")
    assert (out["reflink"], out["files_deduped"], out["bytes_deduped"]) == ("on", 1, len(BIG))
    line = rhost.vsunify("run", "a", "b").stdout
    assert "0 shared extents" in line
    rules = rhost.vsunify("excludes", "a").stdout
    assert "=/tmp" in rules and "default list" in rules


def test_files_already_sharing_the_sources_blocks_are_not_compared_again(rhost: Host) -> None:
    """A reflink copy (what `build -m clone` makes) is found in place by FIEMAP: remembered,
    not handed to the kernel to read and compare again."""
    a = rhost.guest("a", {"etc/big.db": BIG})
    b = rhost.guest("b", {})
    (b / "etc").mkdir()
    subprocess.run(
        ["cp", "-a", "--reflink=always", str(a / "etc/big.db"), str(b / "etc")], check=True
    )
    rhost.guest("c", {"etc/big.db": BIG})
    s = unify_run("a", "b", "c")
    assert (s.files_deduped, s.errors) == (1, 0)  # c only
    assert (
        physical(a / "etc/big.db")
        == physical(b / "etc/big.db")
        == physical(rhost.root / "c/etc/big.db")
    )
    assert unify_run("a", "b", "c").files_deduped == 0
