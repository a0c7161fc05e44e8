"""Layer 2: attributes, index and store on a real filesystem."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from vsstore import attrs
from vsstore.errors import ConfigError
from vsstore.hashing import content_digests, meta_class, read_xattrs
from vsstore.index import Index
from vsstore.store import Store, object_name


def test_seal_sets_marker_and_immutable_and_immutable_forbids_writes(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"data" * 10)
    fd = os.open(p, os.O_RDONLY)
    try:
        attrs.seal(fd, immutable=True)
        a = attrs.read_attrs(fd)
        assert (a.iunlink, a.immutable, a.letters()) == (True, True, "UIa")
        assert os.getxattr(p, attrs.MARKER_TRUSTED) == b"1"
        with pytest.raises(PermissionError):
            open(p, "ab")
        with pytest.raises(PermissionError):
            os.unlink(p)
        attrs.set_immutable(fd, False)
        os.unlink(p)
    finally:
        os.close(fd)


def test_meta_class_sees_mode_owner_xattrs_mtime_but_not_our_marker(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 32)
    fd = os.open(p, os.O_RDONLY)
    try:

        def cls(ignore=False):
            return meta_class(os.fstat(fd), read_xattrs(fd), ignore)

        base = cls()
        attrs.set_marker(fd)
        assert cls() == base
        os.setxattr(fd, "user.color", b"red")
        with_x = cls()
        assert with_x != base
        os.removexattr(fd, "user.color")
        os.fchmod(fd, 0o600)
        assert cls() != base
        os.fchmod(fd, 0o644)
        os.fchown(fd, 1, 1)
        assert cls() != base
        os.fchown(fd, 0, 0)
        before = cls(ignore=True)
        os.utime(fd, (1, 1))
        assert cls(ignore=True) == before and cls() != base
    finally:
        os.close(fd)


def test_digests(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"q" * 3_000_000)
    b.write_bytes(b"q" * 3_000_000)
    c.write_bytes(b"q" * 2_999_999 + b"r")
    fa, fb, fc = (os.open(x, os.O_RDONLY) for x in (a, b, c))
    try:
        da, db, dc = (content_digests(f, 3_000_000) for f in (fa, fb, fc))
        assert da == db
        assert da[0] != dc[0] and da[1] != dc[1]
        assert len(da[0]) == 16 and len(da[1]) == 32
    finally:
        for f in (fa, fb, fc):
            os.close(f)


def _load(idx: Index, dev: int, sizes: tuple[int, int] | None = None) -> dict:
    return {r[0]: r for r in idx.rows(dev, sizes)}


def test_index_round_trip_and_corrupt_file_is_moved_aside(tmp_path):
    path = tmp_path / "state" / "index.sqlite"
    idx = Index(path)
    idx.store([(1, 2, 3, 4, 5, b"d" * 16, b"s" * 32, b"m" * 8, b"a" * 8)])
    idx.store([(1, 7, 300, 4, 5, b"e" * 16, b"t" * 32, b"m" * 8, b"a" * 8)])
    assert _load(idx, 1)[2] == (2, 3, 4, 5, b"d" * 16, b"s" * 32, b"m" * 8, b"a" * 8)
    assert set(_load(idx, 1)) == {2, 7} and _load(idx, 2) == {}
    assert set(_load(idx, 1, (3, 299))) == {2} and set(_load(idx, 1, (4, 300))) == {7}
    idx.close()
    path.write_bytes(b"this is not a database" * 100)
    for extra in ("-wal", "-shm"):
        p = path.with_name(path.name + extra)
        if p.exists():
            p.unlink()
    idx = Index(path)
    assert idx.warning and "moved it to" in idx.warning
    assert _load(idx, 1) == {}
    assert any(p.name.startswith("index.sqlite.corrupt-") for p in path.parent.iterdir())
    idx.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    idx = Index(path)
    assert idx.warning and "schema version 99" in idx.warning
    idx.close()


HOSTILE = [os.fsdecode(b"\xff\xfe"), "new\nline", "tab\tx", "-rf"]


def test_journal_keeps_names_as_bytes(tmp_path):
    """Names need not be UTF-8: the journal stores and gives back their bytes."""
    idx = Index(tmp_path / "index.sqlite")
    root = os.fsdecode(b"/guests/\xe9t\xe9")
    rows = [
        ("join", root, os.fsdecode(b"usr/\x80"), n, ".vsu~00000000000000aa", 5, 7) for n in HOSTILE
    ]
    ids = idx.journal_add(rows)
    assert [
        (r.kind, r.root, r.dir, r.name, r.tmp, r.orig_ino, r.obj_ino) for r in idx.journal()
    ] == rows
    raw = idx.db.execute("SELECT typeof(name), name, root FROM journal ORDER BY id").fetchall()
    assert raw[0] == ("blob", b"\xff\xfe", b"/guests/\xe9t\xe9")
    idx.journal_done(ids)
    assert idx.journal() == []
    idx.close()


def test_a_version_3_index_keeps_its_journal_and_cache(tmp_path):
    """Version 3 kept journal paths as TEXT; opening it converts them, nothing is lost
    (the rows of a crashed run are what lets the next run tidy up)."""
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '3');
        CREATE TABLE inode (dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, digest BLOB NOT NULL,
            strong BLOB NOT NULL, meta BLOB NOT NULL, meta_any BLOB NOT NULL,
            PRIMARY KEY (dev, ino)) WITHOUT ROWID;
        CREATE TABLE journal (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, root TEXT NOT NULL,
            dir TEXT NOT NULL, name TEXT NOT NULL, tmp TEXT NOT NULL, orig_ino INTEGER NOT NULL,
            obj_ino INTEGER NOT NULL);
        INSERT INTO inode VALUES (1, 2, 3, 4, 5, x'64', x'73', x'6d', x'61');
        INSERT INTO journal VALUES (9, 'join', '/vservers/a', 'usr/lib', 'grüße',
                                    '.vsu~0123456789abcdef', 11, 12);
    """)
    db.commit()
    db.close()
    idx = Index(path)
    assert idx.warning is None
    assert _load(idx, 1)[2][4] == b"d"
    [row] = idx.journal()
    assert (row.id, row.root, row.dir, row.name, row.tmp, row.orig_ino, row.obj_ino) == (
        9,
        "/vservers/a",
        "usr/lib",
        "grüße",
        ".vsu~0123456789abcdef",
        11,
        12,
    )
    assert idx.db.execute("SELECT typeof(name) FROM journal").fetchone() == ("blob",)
    assert idx.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == ("4",)
    idx.close()


def test_store_names_scan_and_generations(tmp_path):
    store = Store(tmp_path / "store")
    f = tmp_path / "file"
    f.write_bytes(b"z" * 100)
    key = (bytes(range(16)), bytes(range(8)))
    fd = os.open(f, os.O_RDONLY)
    try:
        o0 = store.reserve(key, [], 0)
        store.link(fd, o0)
        o1 = store.reserve(key, [o0], 0)
        store.link(fd, o1)
    finally:
        os.close(fd)
    assert o0.name == object_name(key, 0) == "00/000102030405060708090a0b0c0d0e0f-0001020304050607"
    assert o1.name.endswith(".1")
    (tmp_path / "store" / "00" / "junk").write_text("not an object")
    found = store.scan()
    assert [o.gen for o in found[key]] == [0, 1]
    assert found[key][0].nlink == 3
    store.close()


def test_store_refuses_other_filesystems_and_overlap(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        with Store(mnt / "store") as s:
            with pytest.raises(ConfigError, match="another filesystem"):
                s.check_guest("g", tmp_path, os.stat(tmp_path).st_dev)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    with Store(tmp_path / "g" / ".hash") as s:
        with pytest.raises(ConfigError, match="overlap"):
            s.check_guest("g", tmp_path / "g", os.stat(tmp_path).st_dev)


def test_cow_state_file_is_never_seen_half_written(tmp_path):
    """Readers (vsunify's cow_served, the sweep of stale shares) and a command killed while
    writing must never leave or see a torn state file: it is replaced whole."""
    import json
    import threading

    from vsstore.runtime import write_cow_state

    f = tmp_path / "vscow" / "mnt.json"
    write_cow_state(f, {"pid": 1, "guests": {}})
    done = threading.Event()
    torn: list[str] = []

    def read() -> None:
        while not done.is_set():
            text = f.read_text()
            try:
                json.loads(text)
            except ValueError:
                torn.append(text)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(3000):
            write_cow_state(f, {"pid": i, "guests": {f"g{j}": "/x" * 50 for j in range(50)}})
    finally:
        done.set()
        reader.join()
    assert torn == []
    assert json.loads(f.read_text())["pid"] == 2999
    assert [p.name for p in f.parent.iterdir()] == ["mnt.json"]  # no temporary left
