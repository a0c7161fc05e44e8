"""Layer 2: the rpm database reader, against databases rpm itself wrote (fixtures made by
tests/fixtures/rpm/make.sh, with rpm's own answers in expected.json) and against broken or
hostile ones, which must give PkgDbError naming the file and nothing else."""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from vsstore.pkgdb import rpm
from vsstore.pkgdb.base import Budget, Limits, PackageFiles, PkgDbError
from vsstore.safetree import GuestTree

FIX = Path(__file__).parent / "fixtures" / "rpm"
EXPECTED = json.loads((FIX / "expected.json").read_text())
SQLITE = "var/lib/rpm/rpmdb.sqlite"
ALGO = {None: "md5", 8: "sha256", 10: "sha512"}


def make_guest(tmp_path: Path, files: dict[str, bytes | Path]) -> Path:
    """A guest root with ``files`` (bytes, or a fixture file to copy)."""
    root = tmp_path / "guest"
    root.mkdir(exist_ok=True)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, p)
        else:
            p.write_bytes(data)
    return root


def read(root: Path, **limits: int) -> PackageFiles | None:
    with GuestTree(root, "g") as tree:
        return rpm.read(Budget(tree, Limits(**limits)))


def read_fails(root: Path, *words: str, **limits: int) -> str:
    """Read, expecting PkgDbError; returns its message after checking it names the guest
    and contains ``words``."""
    with pytest.raises(PkgDbError) as info:
        read(root, **limits)
    msg = info.value.message
    assert "guest 'g'" in msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# -- header blobs built by hand -----------------------------------------------------------


def header(*entries: tuple[int, int, bytes, int]) -> bytes:
    """An rpm header blob from (tag, type, data, count), data laid out in order, aligned."""
    index, data = b"", b""
    for tag, typ, payload, count in entries:
        data += bytes(-len(data) % {3: 2, 4: 4, 5: 8}.get(typ, 1))
        index += struct.pack(">IIII", tag, typ, len(data), count)
        data += payload
    return struct.pack(">II", len(entries), len(data)) + index + data


def strz(*values: str) -> bytes:
    return b"".join(v.encode() + b"\0" for v in values)


def i32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


DIGEST = "ab" * 32


def package(
    name: str = "p",
    dirnames: tuple[str, ...] = ("/etc/", "/usr/bin/"),
    files: tuple[tuple[int, str, int, str], ...] = ((0, "p.conf", 1, DIGEST), (1, "p", 0, DIGEST)),
    **replace: tuple[int, bytes, int],
) -> bytes:
    """A plausible header; ``replace`` swaps whole entries by tag name: NAME=(type, data,
    count), or None to drop one."""
    entries = {
        "NAME": (rpm.RPM_STRING, strz(name), 1),
        "FILEDIGESTS": (rpm.RPM_STRING_ARRAY, strz(*(f[3] for f in files)), len(files)),
        "FILEFLAGS": (rpm.RPM_INT32, i32(*(f[2] for f in files)), len(files)),
        "DIRINDEXES": (rpm.RPM_INT32, i32(*(f[0] for f in files)), len(files)),
        "BASENAMES": (rpm.RPM_STRING_ARRAY, strz(*(f[1] for f in files)), len(files)),
        "DIRNAMES": (rpm.RPM_STRING_ARRAY, strz(*dirnames), len(dirnames)),
        "FILEDIGESTALGO": (rpm.RPM_INT32, i32(8), 1),
    }
    entries.update(replace)
    return header(*[(getattr(rpm, f"RPMTAG_{k}"), *v) for k, v in entries.items() if v is not None])


def sqlite_db(
    path: Path,
    rows: list[tuple[object, object]],
    schema: str = "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, "
    "blob BLOB NOT NULL)",
) -> bytes:
    """An rpm-like sqlite database with ``rows``, as bytes (made on the host, for the test)."""
    con = sqlite3.connect(path)
    con.executescript(schema)
    if rows:
        con.executemany("INSERT INTO Packages (hnum, blob) VALUES (?, ?)", rows)
    con.commit()
    con.close()
    data = path.read_bytes()
    path.unlink()
    return data


def guest_with_blobs(tmp_path: Path, *blobs: bytes) -> Path:
    db = sqlite_db(tmp_path / "made.sqlite", [(i, b) for i, b in enumerate(blobs, 1)])
    return make_guest(tmp_path, {SQLITE: db})


# -- databases rpm wrote ------------------------------------------------------------------


def assert_is_rpms_answer(res: PackageFiles | None, source: str) -> None:
    assert res is not None
    assert res.manager == "rpm" and res.source == source
    assert sorted(res.config) == sorted(EXPECTED["qac"])
    assert sorted(res.owned) == sorted(EXPECTED["filenames"])
    for path, info in EXPECTED["files"].items():
        if info["flags"] & 1:
            assert res.config[path] == info["package"]
        want = f"{ALGO[info['digestalgo']]}:{info['digest']}" if info["digest"] else None
        assert res.owned[path] == want, path


@pytest.mark.parametrize(
    ("fixture", "name"),
    [
        ("rpmdb.sqlite", "rpmdb.sqlite"),
        ("Packages.db", "Packages.db"),
        ("Packages", "Packages"),
        ("Packages.be", "Packages"),
    ],
)
@pytest.mark.parametrize("where", ["var/lib/rpm", "usr/lib/sysimage/rpm"])
def test_each_format_and_location_gives_rpms_own_config_and_file_lists(
    tmp_path, fixture, name, where
):
    root = make_guest(tmp_path, {f"{where}/{name}": FIX / fixture})
    assert_is_rpms_answer(read(root), f"/{where}/{name}")


def test_fixture_covers_config_kinds_digest_algorithms_and_non_ascii_names():
    files = EXPECTED["files"]
    assert {f["digestalgo"] for f in files.values()} == {None, 8, 10}
    flags = {p: f["flags"] for p, f in files.items()}
    assert flags["/etc/vs-alpha/alpha.conf"] == 1  # %config
    assert flags["/etc/vs-alpha/local.conf"] == 1 | 16  # %config(noreplace)
    assert flags["/etc/vs-alpha/state.conf"] & 64  # %ghost
    assert "/usr/share/vs-beta/naïve file.txt" in files
    assert sorted(EXPECTED["packages"]) == ["vs-alpha", "vs-beta", "vs-gamma"]


def test_directories_symlinks_and_ghosts_have_no_digest(tmp_path):
    res = read(make_guest(tmp_path, {SQLITE: FIX / "rpmdb.sqlite"}))
    assert res is not None
    for path in ("/etc/vs-alpha", "/usr/share/vs-alpha/link.txt", "/etc/vs-alpha/state.conf"):
        assert res.owned[path] is None
    assert res.owned["/usr/share/vs-beta/README"].startswith("md5:")
    assert res.owned["/usr/share/vs-alpha/data.txt"].startswith("sha256:")


def test_sqlite_is_preferred_over_older_formats(tmp_path):
    root = make_guest(
        tmp_path,
        {
            SQLITE: FIX / "rpmdb.sqlite",
            "var/lib/rpm/Packages": b"\0" * 4096,
            "var/lib/rpm/Packages.db": b"junk",
        },
    )
    res = read(root)
    assert res is not None and res.source == "/" + SQLITE


def test_broken_preferred_database_is_an_error_not_a_fallback_to_an_older_one(tmp_path):
    root = make_guest(
        tmp_path, {SQLITE: b"not sqlite at all" * 100, "var/lib/rpm/Packages": FIX / "Packages"}
    )
    read_fails(root, "/var/lib/rpm/rpmdb.sqlite", "not a readable sqlite")


def test_committed_state_in_a_wal_file_is_read(tmp_path):
    """rpm keeps its sqlite database in WAL mode: a transaction may still sit in -wal."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(FIX / "rpmdb.sqlite", work / "rpmdb.sqlite")
    con = sqlite3.connect(work / "rpmdb.sqlite")
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        con.execute("PRAGMA wal_autocheckpoint = 0")
        alpha = [
            h for h, blob in con.execute("SELECT hnum, blob FROM Packages") if b"alpha.conf" in blob
        ]
        assert len(alpha) == 1
        con.execute("DELETE FROM Packages WHERE hnum = ?", alpha)
        con.commit()
        wal = (work / "rpmdb.sqlite-wal").read_bytes()
        assert wal  # the deletion is only in the WAL
        root = make_guest(
            tmp_path, {SQLITE: (work / "rpmdb.sqlite").read_bytes(), SQLITE + "-wal": wal}
        )
    finally:
        con.close()
    res = read(root)
    assert res is not None
    assert "/etc/vs-alpha/alpha.conf" not in res.owned
    assert "/etc/vs-beta.conf" in res.config


def test_guests_database_directory_is_left_untouched(tmp_path):
    """sqlite only ever opens a private copy: no -shm/-wal/-journal appears in the guest."""
    root = make_guest(tmp_path, {SQLITE: FIX / "rpmdb.sqlite"})
    before = sorted(os.listdir(root / "var/lib/rpm"))
    mtime = os.stat(root / SQLITE).st_mtime_ns
    assert read(root) is not None
    assert sorted(os.listdir(root / "var/lib/rpm")) == before == ["rpmdb.sqlite"]
    assert os.stat(root / SQLITE).st_mtime_ns == mtime


# -- where the database is, and where it is not -------------------------------------------


def test_guest_without_rpm_database_gives_none(tmp_path):
    assert read(make_guest(tmp_path, {"etc/hostname": b"g\n"})) is None
    (tmp_path / "guest/var/lib/rpm").mkdir(parents=True)
    assert read(tmp_path / "guest") is None


def test_empty_sqlite_file_is_an_empty_database(tmp_path):
    res = read(make_guest(tmp_path, {SQLITE: b""}))
    assert res is not None and not res.owned and not res.config


@pytest.mark.parametrize(
    "link", ["var/lib/rpm", "var/lib", "var/lib/rpm/rpmdb.sqlite", "var/lib/rpm/rpmdb.sqlite-wal"]
)
def test_symlinked_database_is_refused_not_followed(tmp_path, link):
    outside = tmp_path / "outside"
    (outside / "rpm").mkdir(parents=True)
    shutil.copyfile(FIX / "rpmdb.sqlite", outside / "rpm/rpmdb.sqlite")
    shutil.copyfile(FIX / "rpmdb.sqlite", outside / "rpmdb.sqlite")
    (outside / "wal").write_bytes(b"")
    target = {
        "var/lib/rpm": outside / "rpm",
        "var/lib": outside,
        "var/lib/rpm/rpmdb.sqlite": outside / "rpmdb.sqlite",
        "var/lib/rpm/rpmdb.sqlite-wal": outside / "wal",
    }[link]
    files: dict[str, bytes | Path] = {"etc/hostname": b"g\n"}
    if link.endswith("-wal"):
        files[SQLITE] = FIX / "rpmdb.sqlite"
    root = make_guest(tmp_path, files)
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, root / link)
    read_fails(root, f"/{link}", "symlink")


@pytest.mark.parametrize("target", ["../../usr/lib/sysimage/rpm", "/usr/lib/sysimage/rpm"])
def test_fedora_layout_reads_sysimage_and_skips_the_var_lib_rpm_alias(tmp_path, target):
    root = make_guest(tmp_path, {"usr/lib/sysimage/rpm/rpmdb.sqlite": FIX / "rpmdb.sqlite"})
    (root / "var/lib").mkdir(parents=True)
    os.symlink(target, root / "var/lib/rpm")
    assert_is_rpms_answer(read(root), "/usr/lib/sysimage/rpm/rpmdb.sqlite")
    os.unlink(root / "usr/lib/sysimage/rpm/rpmdb.sqlite")
    assert read(root) is None  # the alias leads nowhere else


def test_symlink_elsewhere_is_refused_even_when_another_database_is_readable(tmp_path):
    """rpm may be using the database behind the symlink, not the one we can see."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(FIX / "rpmdb.sqlite", outside / "rpmdb.sqlite")
    root = make_guest(tmp_path, {"usr/lib/sysimage/rpm/rpmdb.sqlite": FIX / "rpmdb.sqlite"})
    (root / "var/lib").mkdir(parents=True)
    os.symlink(outside, root / "var/lib/rpm")
    read_fails(root, "/var/lib/rpm is a symlink")
    os.unlink(root / "var/lib/rpm")
    (root / "var/lib/rpm").mkdir()
    os.symlink(outside / "rpmdb.sqlite", root / "var/lib/rpm/Packages")
    read_fails(root, "/var/lib/rpm/Packages is a symlink")


def test_database_that_is_a_directory_or_fifo_is_refused(tmp_path):
    root = make_guest(tmp_path, {})
    (root / SQLITE).mkdir(parents=True)
    read_fails(root, "/var/lib/rpm/rpmdb.sqlite", "not a regular file")
    os.rmdir(root / SQLITE)
    os.mkfifo(root / SQLITE)
    read_fails(root, "/var/lib/rpm/rpmdb.sqlite", "not a regular file")


# -- Berkeley DB and ndb ------------------------------------------------------------------


@pytest.mark.parametrize("order", ["<", ">"])
def test_berkeley_db_btree_gives_the_rebuilddb_advice(tmp_path, order):
    meta = bytearray(4096)
    struct.pack_into(order + "I", meta, 12, 0x00053162)
    root = make_guest(tmp_path, {"var/lib/rpm/Packages": bytes(meta)})
    read_fails(
        root,
        "/var/lib/rpm/Packages",
        "Berkeley DB",
        "not readable by vsstore",
        "rpmdb --rebuilddb",
        "static list",
    )


def test_packages_file_without_any_known_magic_is_refused(tmp_path):
    root = make_guest(tmp_path, {"var/lib/rpm/Packages": os.urandom(8192)})
    read_fails(root, "/var/lib/rpm/Packages", "not an rpm database")


def bdb_page_offset(data: bytes, type_: int) -> int:
    """Byte offset of the first page of ``type_`` in the little-endian Packages fixture."""
    pagesize = struct.unpack_from("<I", data, 20)[0]
    for pgno in range(1, len(data) // pagesize):
        if data[pgno * pagesize + 25] == type_:
            return pgno * pagesize
    raise AssertionError(f"no page of type {type_}")


BDB_DAMAGE = {
    "loop": "reached twice",
    "truncated": "pages of 4096 bytes in a file",
    "page-number": "it says page 999",
    "overflow-length": "overflow page of 65535",
    "entries": "65535 entries",
    "item-type": "item type 4",
}


@pytest.mark.parametrize("damage", sorted(BDB_DAMAGE))
def test_damaged_berkeley_db_is_refused_with_advice(tmp_path, damage):
    data = bytearray((FIX / "Packages").read_bytes())
    hash_page, ovfl_page = bdb_page_offset(data, 13), bdb_page_offset(data, 7)
    pagesize = struct.unpack_from("<I", data, 20)[0]
    if damage == "loop":  # an overflow chain that leads back to its own page
        chained = next(
            p * pagesize
            for p in range(1, len(data) // pagesize)
            if data[p * pagesize + 25] == 7 and struct.unpack_from("<I", data, p * pagesize + 16)[0]
        )
        struct.pack_into("<I", data, chained + 16, chained // pagesize)
    elif damage == "truncated":
        del data[len(data) - pagesize :]
    elif damage == "page-number":
        struct.pack_into("<I", data, hash_page + 8, 999)
    elif damage == "overflow-length":
        struct.pack_into("<H", data, ovfl_page + 22, 0xFFFF)
    elif damage == "entries":
        struct.pack_into("<H", data, hash_page + 20, 0xFFFF)
    elif damage == "item-type":  # the first key becomes an off-page duplicate
        koff = struct.unpack_from("<H", data, hash_page + 26)[0]
        data[hash_page + koff] = 4
    root = make_guest(tmp_path, {"var/lib/rpm/Packages": bytes(data)})
    read_fails(
        root, "/var/lib/rpm/Packages: Berkeley DB hash", BDB_DAMAGE[damage], "rpmdb --rebuilddb"
    )


NDB_DAMAGE = {
    "checksum": "checksum mismatch",
    "slot-magic": "no 'Slot' magic",
    "slot-beyond-file": "outside the blob area",
    "blob-magic": "no 'BlbS' head",
    "tail": "no matching 'BlbE' tail",
    "version": "unknown version 7",
    "odd-size": "not a whole number of blocks",
    "duplicate-slot": "two slots",
}


@pytest.mark.parametrize("damage", sorted(NDB_DAMAGE))
def test_damaged_ndb_is_refused(tmp_path, damage):
    data = bytearray((FIX / "Packages.db").read_bytes())
    slot = 32  # the first slot in use (make.sh's layout)
    pkgidx, blkoff, blkcnt = struct.unpack_from("<III", data, slot + 4)
    assert blkoff
    if damage == "checksum":
        data[blkoff * 16 + 100] ^= 0xFF
    elif damage == "slot-magic":
        data[slot] ^= 1
    elif damage == "slot-beyond-file":
        struct.pack_into("<I", data, slot + 12, 1 << 30)
    elif damage == "blob-magic":
        data[blkoff * 16] ^= 1
    elif damage == "tail":
        data[(blkoff + blkcnt) * 16 - 1] ^= 1
    elif damage == "version":
        struct.pack_into("<I", data, 4, 7)
    elif damage == "odd-size":
        data += b"x"
    elif damage == "duplicate-slot":
        data[slot + 32 : slot + 48] = data[slot : slot + 16]
    root = make_guest(tmp_path, {"var/lib/rpm/Packages.db": bytes(data)})
    read_fails(root, "/var/lib/rpm/Packages.db", NDB_DAMAGE[damage])


# -- hand-made headers --------------------------------------------------------------------


def test_hand_made_header_paths_flags_and_digests(tmp_path):
    root = guest_with_blobs(
        tmp_path,
        package("p"),
        package(
            "q",
            dirnames=("/etc/",),
            files=((0, "p.conf", 1, ""), (0, "q.conf", 17, "CD" * 16)),
            FILEDIGESTALGO=(rpm.RPM_INT32, i32(99), 1),
        ),
    )
    res = read(root)
    assert res is not None
    assert res.config == {"/etc/p.conf": "p", "/etc/q.conf": "q"}  # first owner named
    assert res.owned == {
        "/etc/p.conf": "sha256:" + DIGEST,
        "/usr/bin/p": "sha256:" + DIGEST,
        "/etc/q.conf": "rpm-algo-99:" + "cd" * 16,
    }


def test_old_header_with_oldfilenames(tmp_path):
    blob = header(
        (rpm.RPMTAG_NAME, rpm.RPM_STRING, strz("old"), 1),
        (rpm.RPMTAG_OLDFILENAMES, rpm.RPM_STRING_ARRAY, strz("/etc/old.conf", "/bin/o"), 2),
        (rpm.RPMTAG_FILEFLAGS, rpm.RPM_INT32, i32(1, 0), 2),
        (rpm.RPMTAG_FILEDIGESTS, rpm.RPM_STRING_ARRAY, strz("00" * 16, ""), 2),
    )
    res = read(guest_with_blobs(tmp_path, blob))
    assert res is not None
    assert res.config == {"/etc/old.conf": "old"}
    assert res.owned == {"/etc/old.conf": "md5:" + "00" * 16, "/bin/o": None}


def test_package_without_files_and_region_tags_are_fine(tmp_path):
    blob = header(
        (63, rpm.RPM_BIN, bytes(16), 16),  # an immutable region, ignored
        (rpm.RPMTAG_NAME, rpm.RPM_STRING, strz("gpg-pubkey"), 1),
    )
    res = read(guest_with_blobs(tmp_path, blob))
    assert res is not None and res.owned == {} and res.config == {}


def corrupt(blob: bytes, entry: int, field: int, value: int) -> bytes:
    """``blob`` with index entry ``entry``'s field (0 tag, 1 type, 2 offset, 3 count) set."""
    b = bytearray(blob)
    struct.pack_into(">I", b, 8 + 16 * entry + 4 * field, value)
    return bytes(b)


GOOD = package()  # index entries: NAME, FILEDIGESTS, FILEFLAGS, DIRINDEXES, BASENAMES, ...
BROKEN_HEADERS = {  # case: (blob, what the message says)
    "shorter-than-intro": (GOOD[:5], "shorter than its 8-byte intro"),
    "truncated": (GOOD[:-10], "data bytes"),
    "trailing-bytes": (GOOD + b"\0\0\0\0", "data bytes"),
    "entries-huge": (struct.pack(">II", 10**9, 16) + GOOD[8:], "1000000000 index entries"),
    "entries-zero": (struct.pack(">II", 0, 0), "0 index entries"),
    "data-length-huge": (struct.pack(">II", 7, 0xFFFFFFFF) + GOOD[8:], "4294967295 data bytes"),
    "offset-beyond-data": (corrupt(GOOD, 0, 2, 0x7FFFFFFF), "beyond the"),
    "int32-count-huge": (corrupt(GOOD, 2, 3, 0x3FFFFFFF), "run past the data"),
    "string-count-huge": (corrupt(GOOD, 4, 3, 0xFFFFFFFF), "cannot fit"),
    "string-count-not-one": (corrupt(GOOD, 0, 3, 2), "a string with count 2"),
    "unknown-type": (corrupt(GOOD, 1, 1, 42), "unknown type 42"),
    "name-not-a-string": (corrupt(GOOD, 0, 1, rpm.RPM_INT32), "(NAME) has type 4"),
    "basenames-as-int32": (corrupt(GOOD, 4, 1, rpm.RPM_INT32), "(BASENAMES) has type 4"),
    "flags-as-string-array": (corrupt(GOOD, 2, 1, rpm.RPM_STRING_ARRAY), "(FILEFLAGS) has type 8"),
    "count-mismatch": (corrupt(GOOD, 2, 3, 1), "1 FILEFLAGS for 2 files"),
    "no-name": (package(NAME=None), "no package name"),
    "no-dirindexes": (package(DIRINDEXES=None), "0 DIRINDEXES"),
    "more-dirnames-than-files": (package(files=((0, "x", 0, ""),)), "2 DIRNAMES for 1 files"),
    "dirindex-beyond-dirnames": (
        package(dirnames=("/etc/",), files=((5, "x", 0, ""),)),
        "beyond the 1 DIRNAMES",
    ),
    "unterminated-strings": (
        header(
            (rpm.RPMTAG_NAME, rpm.RPM_STRING, strz("u"), 1),
            (rpm.RPMTAG_BASENAMES, rpm.RPM_STRING_ARRAY, b"abc", 1),
        ),
        "run past the header data",
    ),
    "digest-not-hex": (package(dirnames=("/etc/",), files=((0, "x", 0, "not hex!"),)), "not hex"),
    "dotdot-path": (
        package(dirnames=("/etc/",), files=((0, "../../root/.ssh/authorized_keys", 1, ""),)),
        "'..'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_HEADERS))
def test_malformed_header_is_a_pkgdberror_naming_file_package_and_defect(tmp_path, case):
    blob, reason = BROKEN_HEADERS[case]
    root = guest_with_blobs(tmp_path, package("fine"), blob)
    read_fails(root, "/var/lib/rpm/rpmdb.sqlite: package 2: ", reason)


def test_header_declaring_a_billion_entries_fails_fast_without_allocating(tmp_path):
    blob = struct.pack(">II", 10**9, 10**9) + bytes(64)
    root = guest_with_blobs(tmp_path, blob)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        read_fails(root, "package 1", "index entries")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 2
    assert peak < 8 << 20


def test_limits_on_packages_and_paths(tmp_path):
    root = make_guest(tmp_path, {SQLITE: FIX / "rpmdb.sqlite"})
    read_fails(root, "more than 2 packages", max_packages=2)
    read_fails(root, "more than the remaining path limit 50", max_paths=50)
    read_fails(root, "index entries (limit 5)", max_header_entries=5)
    read_fails(root, "a string longer than 8 bytes", max_line_bytes=8)


# -- hostile or broken sqlite -------------------------------------------------------------

SQLITE_DAMAGE = {
    "garbage": "not a database",
    "truncated": "malformed",
    "no-table": "without a Packages table",
    "view": "not a plain sqlite table",
    "text-hnum": "not an (integer, blob) row",
    "text-blob": "package 1: header",
    "zeroblob-column": "too big",
    "endless-view": "not a plain sqlite table",
}


@pytest.mark.parametrize("case", sorted(SQLITE_DAMAGE))
def test_bad_sqlite_database_is_a_pkgdberror_naming_the_file(tmp_path, case):
    made = tmp_path / "made.sqlite"
    if case == "garbage":
        data = b"SQLite format 3\0" + os.urandom(8192)
    elif case == "truncated":
        data = (FIX / "rpmdb.sqlite").read_bytes()[:20000]
    elif case == "no-table":
        data = sqlite_db(
            made, [], "CREATE TABLE Other (hnum INTEGER, blob BLOB);CREATE TABLE Packages_x (a);"
        )
    elif case == "view":
        data = sqlite_db(
            made,
            [],
            "CREATE TABLE P (hnum INTEGER, blob BLOB);CREATE VIEW Packages AS SELECT * FROM P;",
        )
    elif case == "text-hnum":
        data = sqlite_db(made, [("one", GOOD)], "CREATE TABLE Packages (hnum, blob);")
    elif case == "text-blob":
        data = sqlite_db(made, [(1, "a header as text")], "CREATE TABLE Packages (hnum, blob);")
    elif case == "zeroblob-column":  # a column that would make sqlite allocate 1 GB
        data = sqlite_db(
            made,
            [],
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY, b0 BLOB,"
            " blob BLOB AS (zeroblob(1000000000)));"
            "INSERT INTO Packages (hnum, b0) VALUES (1, x'00');",
        )
    elif case == "endless-view":  # cannot be a view; and would never end if it were run
        data = sqlite_db(
            made,
            [],
            "CREATE VIEW Packages AS WITH RECURSIVE c(hnum, blob) AS "
            "(SELECT 1, x'00' UNION ALL SELECT hnum + 1, blob FROM c) "
            "SELECT * FROM c;",
        )
    root = make_guest(tmp_path, {SQLITE: data})
    t0 = time.monotonic()
    read_fails(root, "/var/lib/rpm/rpmdb.sqlite: ", SQLITE_DAMAGE[case])
    assert time.monotonic() - t0 < 10


def test_sqlite_work_is_bounded_by_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(rpm, "SQLITE_MAX_STEPS", 1000)
    monkeypatch.setattr(rpm, "_STEP_CHUNK", 100)
    many = [package(f"p{i}") for i in range(300)]
    read_fails(guest_with_blobs(tmp_path, *many), "interrupted")


def test_randomly_damaged_fixtures_raise_only_pkgdberror(tmp_path):
    rng = random.Random(4)
    rejected = 0
    fixtures = {
        "rpmdb.sqlite": (FIX / "rpmdb.sqlite").read_bytes(),
        "Packages.db": (FIX / "Packages.db").read_bytes(),
        "Packages": (FIX / "Packages").read_bytes(),
    }
    for n in range(60):
        name = rng.choice(sorted(fixtures))
        data = bytearray(fixtures[name])
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(len(data))
            data[i] = rng.randrange(256)
        root = tmp_path / f"g{n}"
        (root / "var/lib/rpm").mkdir(parents=True)
        (root / "var/lib/rpm" / name).write_bytes(bytes(data))
        with GuestTree(root, "g") as tree:
            try:
                rpm.read(Budget(tree, Limits()))
            except PkgDbError as e:
                assert f"/var/lib/rpm/{name}" in e.message
                rejected += 1
    assert rejected > 10
