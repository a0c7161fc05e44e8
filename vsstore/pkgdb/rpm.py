"""rpm: config files (``%config``) and owned files with digests, from the guest's rpm
database, parsed here in pure Python: never the guest's binaries, never the host's rpm
library (a manipulated database once overflowed it).

Three database formats, tried in rpm's order of age, newest first, each in
``var/lib/rpm`` and in the newer ``usr/lib/sysimage/rpm``:

* ``rpmdb.sqlite`` (rpm >= 4.16): the guest's bytes are copied into a private temporary
  directory (with a ``-wal``/``-journal`` file, so sqlite sees committed state) and only
  that copy is opened, with bounded blob sizes and a bounded number of VM steps.
* ``Packages.db`` (ndb, rpm's own format since 4.15, used by SUSE): slot pages ("RpmP",
  "Slot") pointing to blobs ("BlbS" ... "BlbE", adler32-checked).
* ``Packages`` (Berkeley DB hash, rpm < 4.16): buckets, page chains and overflow pages.

Every one stores the same thing per package: an rpm header blob (see ``_parse``).  The
first database present is authoritative: a broken one is an error, never a reason to
fall back to an older, possibly stale one.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import stat
import struct
import sys
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterator

from .base import Budget, PackageFiles, PkgDbError, decode

DIRS = ("var/lib/rpm", "usr/lib/sysimage/rpm")
SQLITE, NDB, BDB = "rpmdb.sqlite", "Packages.db", "Packages"

# Header tags and types (rpm's rpmtag.h).
RPMTAG_NAME = 1000
RPMTAG_FILEDIGESTS = 1035
RPMTAG_FILEFLAGS = 1037
RPMTAG_OLDFILENAMES = 1027
RPMTAG_DIRINDEXES = 1116
RPMTAG_BASENAMES = 1117
RPMTAG_DIRNAMES = 1118
RPMTAG_FILEDIGESTALGO = 5011
_REGION_TAGS = (61, 62, 63)  # HEADERIMAGE, HEADERSIGNATURES, HEADERIMMUTABLE
_TAG_NAMES = {
    RPMTAG_NAME: "NAME",
    RPMTAG_FILEDIGESTS: "FILEDIGESTS",
    RPMTAG_FILEFLAGS: "FILEFLAGS",
    RPMTAG_OLDFILENAMES: "OLDFILENAMES",
    RPMTAG_DIRINDEXES: "DIRINDEXES",
    RPMTAG_BASENAMES: "BASENAMES",
    RPMTAG_DIRNAMES: "DIRNAMES",
    RPMTAG_FILEDIGESTALGO: "FILEDIGESTALGO",
}
RPMFILE_CONFIG = 1 << 0

RPM_NULL, RPM_CHAR, RPM_INT8, RPM_INT16, RPM_INT32, RPM_INT64 = range(6)
RPM_STRING, RPM_BIN, RPM_STRING_ARRAY, RPM_I18NSTRING = range(6, 10)
_FIXED_SIZE = {
    RPM_NULL: 0,
    RPM_CHAR: 1,
    RPM_INT8: 1,
    RPM_INT16: 2,
    RPM_INT32: 4,
    RPM_INT64: 8,
    RPM_BIN: 1,
}
_STRING_TYPES = (RPM_STRING, RPM_STRING_ARRAY, RPM_I18NSTRING)

# rpm's PGPHASHALGO_* numbers.  Without FILEDIGESTALGO, rpm reads the digests as MD5.
DIGEST_ALGOS = {
    1: "md5",
    2: "sha1",
    3: "ripemd160",
    5: "md2",
    6: "tiger192",
    7: "haval-5-160",
    8: "sha256",
    9: "sha384",
    10: "sha512",
    11: "sha224",
}
_HEX = re.compile(r"[0-9a-f]+")

BDB_HINT = (
    "convert it with `rpmdb --rebuilddb` inside the guest (rpm >= 4.16 writes sqlite) "
    "or exclude the guest's config by a static list"
)
# sqlite virtual-machine steps for one query: far above what reading every row of a real
# database takes, low enough that a hostile schema cannot keep us busy for long.
SQLITE_MAX_STEPS = 200_000_000
_STEP_CHUNK = 10_000


class _Bad(Exception):
    """A defect found while parsing; the caller adds the file and the package."""


def _tag(tag: int) -> str:
    """'tag 1117 (BASENAMES)' for messages."""
    name = _TAG_NAMES.get(tag)
    return f"tag {tag} ({name})" if name else f"tag {tag}"


# -- finding the database -----------------------------------------------------------------


def _probe(budget: Budget, rel: str) -> tuple[str | None, str | None]:
    """(state, symlink) for ``rel``: state None when nothing is there, 'file' for a regular
    file, otherwise what stands in the way; symlink is the path of the symlink found on the
    way, if that is what stands there.  Walks component by component so that a symlinked
    directory is told apart from a missing one on every kernel."""
    parts = rel.split("/")
    mode = 0
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            fd = budget.tree.open_beneath(prefix, os.O_PATH)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None, None
            if e.errno == errno.ELOOP:
                return f"/{prefix} is a symlink (never followed)", prefix
            if e.errno == errno.EXDEV:
                return f"/{prefix} is on another filesystem (never crossed)", None
            return f"/{prefix}: {e.strerror}", None
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if stat.S_ISLNK(mode):
            return f"/{prefix} is a symlink (never followed)", prefix
        if i < len(parts) and not stat.S_ISDIR(mode):
            return None, None  # a file where a directory would be: no database below it
    return ("file" if stat.S_ISREG(mode) else "not a regular file"), None


def _is_alias(budget: Budget, link: str) -> bool:
    """Whether symlink ``link`` is one of the database directories pointing to the other
    (Fedora and openSUSE: var/lib/rpm -> ../../usr/lib/sysimage/rpm).  That directory is
    looked at under its own name, so the link is not needed and nothing is missed."""
    if link not in DIRS:
        return False
    parent, _, name = link.rpartition("/")
    try:
        fd = budget.tree.open_beneath(parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        target = os.readlink(name, dir_fd=fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    if len(target) > budget.limits.max_path_bytes:
        return False
    points_to = os.path.normpath(target if target.startswith("/") else f"/{parent}/{target}")
    return points_to.lstrip("/") in DIRS and points_to.lstrip("/") != link


def read(budget: Budget) -> PackageFiles | None:
    """The guest's rpm database, or None if it has none.  A database that exists but
    cannot be read, or that may be behind a symlink (other than one database directory
    pointing to the other), is a PkgDbError: rpm might be using exactly that one."""
    found: tuple[str, Callable[[Budget, str], PackageFiles]] | None = None
    readers: tuple[tuple[str, Callable[[Budget, str], PackageFiles]], ...] = (
        (SQLITE, _read_sqlite),
        (NDB, _read_ndb),
        (BDB, _read_bdb),
    )
    for name, reader in readers:
        for d in DIRS:
            rel = f"{d}/{name}"
            state, link = _probe(budget, rel)
            if state is None:
                continue
            if state == "file":
                found = found or (rel, reader)
            elif link is None or not _is_alias(budget, link):
                raise budget.fail(rel, f"rpm database not read: {state}")
    if found is None:
        return None
    rel, reader = found
    return reader(budget, rel)


# -- header blobs -------------------------------------------------------------------------

_IL_DL = struct.Struct(">II")


class _Collector:
    """Turns header blobs into one PackageFiles, counting packages and paths."""

    def __init__(self, budget: Budget, rel: str) -> None:
        self.budget = budget
        self.rel = rel
        self.res = PackageFiles(manager="rpm", source="/" + rel)
        self.packages = 0
        self.paths = 0

    def fail(self, what: str) -> PkgDbError:
        return self.budget.fail(self.rel, what)

    def add(self, pkgno: int, blob: bytes) -> None:
        """One package's header blob; ``pkgno`` is its number in the database."""
        limits = self.budget.limits
        self.packages += 1
        if self.packages > limits.max_packages:
            raise self.fail(f"more than {limits.max_packages} packages")
        try:
            name, files = _parse(blob, self.budget, limits.max_paths - self.paths)
        except _Bad as e:
            raise self.fail(f"package {pkgno}: {e}") from None
        except (struct.error, IndexError, ValueError, OverflowError, MemoryError) as e:
            # Not expected (every bound is checked first); kept so that no other error
            # type can escape whatever the bytes are.
            raise self.fail(f"package {pkgno}: malformed header ({type(e).__name__})") from None
        self.paths += len(files)
        where = f"{self.rel}: package {pkgno}"
        res = self.res
        for raw, flags, digest in files:
            path = self.budget.check_path(where, raw)
            if flags & RPMFILE_CONFIG:
                res.config.setdefault(path, name)
            if res.owned.get(path) is None:
                res.owned[path] = digest


def _index(blob: bytes, max_entries: int) -> tuple[dict[int, tuple[int, int, int]], int]:
    """The header's index as {tag: (type, absolute data offset, count)} and the end of its
    data.  Checks every entry's type and bounds; skips region tags."""
    if len(blob) < 8:
        raise _Bad(f"header of {len(blob)} bytes, shorter than its 8-byte intro")
    il, dl = _IL_DL.unpack_from(blob)
    if not 1 <= il <= max_entries:
        raise _Bad(f"header declares {il} index entries (limit {max_entries})")
    start = 8 + 16 * il
    if start + dl != len(blob):
        raise _Bad(f"header of {len(blob)} bytes declares {il} index entries and {dl} data bytes")
    entries: dict[int, tuple[int, int, int]] = {}
    for tag, typ, off, count in struct.iter_unpack(">IIII", memoryview(blob)[8:start]):
        if tag in _REGION_TAGS:
            continue
        if typ > RPM_I18NSTRING:
            raise _Bad(f"{_tag(tag)} has unknown type {typ}")
        if off > dl:
            raise _Bad(f"{_tag(tag)}: data offset {off} beyond the {dl} data bytes")
        size = _FIXED_SIZE.get(typ)
        if size is not None and off + count * size > dl:
            raise _Bad(f"{_tag(tag)}: {count} values of {size} bytes run past the data")
        if typ in _STRING_TYPES and count > dl - off:
            raise _Bad(f"{_tag(tag)}: {count} strings cannot fit in the data")
        if typ == RPM_STRING and count != 1:
            raise _Bad(f"{_tag(tag)}: a string with count {count}")
        entries[tag] = (typ, start + off, count)  # a repeated (dribbled) tag: the last wins
    return entries, len(blob)


def _strings(
    blob: bytes,
    entries: dict[int, tuple[int, int, int]],
    end: int,
    tag: int,
    types: tuple[int, ...],
    max_count: int,
    max_len: int,
) -> list[str] | None:
    """The strings of ``tag`` (None if absent), each NUL-terminated inside the data."""
    entry = entries.get(tag)
    if entry is None:
        return None
    typ, pos, count = entry
    if typ not in types:
        raise _Bad(f"{_tag(tag)} has type {typ}, expected {' or '.join(map(str, types))}")
    if count > max_count:
        raise _Bad(f"{_tag(tag)}: {count} strings, more than the remaining path limit {max_count}")
    parts = blob[pos:end].split(b"\0", count)
    if len(parts) <= count:
        raise _Bad(f"{_tag(tag)}: {count} strings run past the header data")
    del parts[count]
    if parts and max(map(len, parts)) > max_len:
        raise _Bad(f"{_tag(tag)}: a string longer than {max_len} bytes")
    return [decode(p) for p in parts]


def _ints(
    blob: bytes, entries: dict[int, tuple[int, int, int]], tag: int, max_count: int
) -> array[int] | None:
    """The INT32 values of ``tag`` (None if absent), compactly."""
    entry = entries.get(tag)
    if entry is None:
        return None
    typ, pos, count = entry
    if typ != RPM_INT32:
        raise _Bad(f"{_tag(tag)} has type {typ}, expected {RPM_INT32} (int32)")
    if count > max_count:
        raise _Bad(f"{_tag(tag)}: {count} values, more than the remaining path limit {max_count}")
    values = array("I")
    if values.itemsize != 4:  # pragma: no cover - every Linux ABI has 4-byte unsigned int
        values = array("L")
    values.frombytes(blob[pos : pos + 4 * count])
    if sys.byteorder == "little":
        values.byteswap()
    return values


def _parse(
    blob: bytes,
    budget: Budget,
    max_paths: int,
) -> tuple[str, list[tuple[str, int, str | None]]]:
    """(name, [(path, file flags, digest or None)]) from one header blob.

    A blob is the header as rpm stores it in its database: big-endian uint32 il (index
    entries) and dl (data bytes), il entries of (tag, type, offset, count), dl data bytes.
    Paths are DIRNAMES[DIRINDEXES[i]] + BASENAMES[i] (OLDFILENAMES in old headers)."""
    limits = budget.limits
    entries, end = _index(blob, limits.max_header_entries)
    longest = limits.max_line_bytes
    names = _strings(blob, entries, end, RPMTAG_NAME, (RPM_STRING,), 1, longest)
    if not names or not names[0]:
        raise _Bad("no package name")
    name = names[0]

    def strings(tag: int) -> list[str] | None:
        return _strings(blob, entries, end, tag, (RPM_STRING_ARRAY,), max_paths, longest)

    basenames = strings(RPMTAG_BASENAMES)
    if basenames is not None:
        n = len(basenames)
        dirnames = strings(RPMTAG_DIRNAMES) or []
        indexes = _ints(blob, entries, RPMTAG_DIRINDEXES, max_paths)
        if indexes is None or len(indexes) != n:
            raise _Bad(f"{n} BASENAMES but {0 if indexes is None else len(indexes)} DIRINDEXES")
        if len(dirnames) > n:
            raise _Bad(f"{len(dirnames)} DIRNAMES for {n} files")
        if n and max(indexes) >= len(dirnames):
            raise _Bad(f"a DIRINDEXES value beyond the {len(dirnames)} DIRNAMES")
        paths = [dirnames[i] + b for i, b in zip(indexes, basenames, strict=True)]
    else:
        paths = strings(RPMTAG_OLDFILENAMES) or []
    n = len(paths)
    if not n:
        return name, []
    flags = _ints(blob, entries, RPMTAG_FILEFLAGS, max_paths)
    if flags is not None and len(flags) != n:
        raise _Bad(f"{len(flags)} FILEFLAGS for {n} files")
    digests = strings(RPMTAG_FILEDIGESTS)
    if digests is not None and len(digests) != n:
        raise _Bad(f"{len(digests)} FILEDIGESTS for {n} files")
    algo_values = _ints(blob, entries, RPMTAG_FILEDIGESTALGO, 1)
    algo = algo_values[0] if algo_values else 1
    prefix = DIGEST_ALGOS.get(algo, f"rpm-algo-{algo}") + ":"
    out: list[tuple[str, int, str | None]] = []
    for i, path in enumerate(paths):
        digest: str | None = None
        if digests is not None and digests[i]:
            hexd = digests[i].lower()
            if not _HEX.fullmatch(hexd):
                raise _Bad(f"file {path[:200]!r}: digest is not hex: {hexd[:80]!r}")
            digest = prefix + hexd
        out.append((path, flags[i] if flags is not None else 0, digest))
    return name, out


# -- sqlite (rpm >= 4.16) -----------------------------------------------------------------


def _read_sqlite(budget: Budget, rel: str) -> PackageFiles:
    """``rpmdb.sqlite``: table Packages(hnum, blob), read from a private copy."""
    coll = _Collector(budget, rel)
    files = {"": budget.read(rel)}
    for suffix in ("-wal", "-journal"):
        state, _ = _probe(budget, rel + suffix)
        if state == "file":
            files[suffix] = budget.read(rel + suffix)
        elif state is not None:
            raise budget.fail(rel + suffix, f"rpm database not read: {state}")
    if not files[""]:
        return coll.res  # an empty file is an empty database to sqlite and to rpm
    total = sum(map(len, files.values()))
    with tempfile.TemporaryDirectory(prefix="vsstore-rpmdb-") as tmp:
        path = os.path.join(tmp, "rpmdb.sqlite")
        for suffix, data in files.items():
            fd = os.open(path + suffix, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        del files
        try:
            _sqlite_rows(path, total, coll)
        except sqlite3.Error as e:
            raise budget.fail(rel, f"not a readable sqlite rpm database: {e}") from None
        except UnicodeDecodeError:  # sqlite's message quoted undecodable schema bytes
            raise budget.fail(rel, "not a readable sqlite rpm database: malformed schema") from None
    return coll.res


def _sqlite_rows(path: str, total: int, coll: _Collector) -> None:
    """Every row (hnum, blob) of Packages, in hnum order, into ``coll``; sqlite bounded."""
    steps = [0]

    def progress() -> int:
        steps[0] += _STEP_CHUNK
        return 1 if steps[0] > SQLITE_MAX_STEPS else 0

    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.text_factory = bytes
        # No blob or string can be longer than the files it came from.
        con.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(total, 1 << 16))
        con.set_progress_handler(progress, _STEP_CHUNK)
        con.execute("PRAGMA trusted_schema = OFF")
        con.execute("PRAGMA cell_size_check = ON")
        tables = con.execute(
            "SELECT type, rootpage FROM sqlite_master WHERE lower(name) = 'packages'"
        ).fetchall()
        if not tables:
            raise coll.fail("sqlite database without a Packages table")
        if len(tables) != 1 or tables[0][0] != b"table" or not tables[0][1]:
            raise coll.fail("Packages is not a plain sqlite table")
        cur = con.execute("SELECT hnum, blob FROM Packages ORDER BY hnum")
        while True:
            row = cur.fetchone()
            if row is None:
                break
            hnum, blob = row
            if not isinstance(hnum, int) or not isinstance(blob, bytes):
                raise coll.fail(f"Packages row {str(hnum)[:40]}: not an (integer, blob) row")
            coll.add(hnum, blob)
    finally:
        con.close()


# -- ndb (rpm >= 4.15, SUSE) --------------------------------------------------------------

_NDB_MAGIC = int.from_bytes(b"RpmP", "little")
_SLOT_MAGIC = int.from_bytes(b"Slot", "little")
_BLOB_MAGIC = int.from_bytes(b"BlbS", "little")
_BLOB_END = int.from_bytes(b"BlbE", "little")
_NDB_PAGE, _NDB_SLOT, _NDB_BLK, _NDB_HEAD = 4096, 16, 16, 32
_BLOB_HEAD, _BLOB_TAIL = 16, 12
_LE4 = struct.Struct("<IIII")


def _read_ndb(budget: Budget, rel: str) -> PackageFiles:
    """``Packages.db``: a header (magic, version, generation, slot pages), slot pages of
    16-byte slots (magic, package index, block offset, block count), and blobs in 16-byte
    blocks, each framed by a head (magic, package index, time, length) and a tail
    (adler32, length, magic)."""
    coll = _Collector(budget, rel)
    data = budget.read(rel)
    if not data:
        return coll.res  # rpm itself treats an empty Packages.db as a new database
    if len(data) < _NDB_PAGE or len(data) % _NDB_BLK:
        raise coll.fail(
            f"ndb: {len(data)} bytes is not a whole number of blocks after the first slot page"
        )
    magic, version, _generation, npages = struct.unpack_from("<IIII", data, 0)
    if magic != _NDB_MAGIC:
        raise coll.fail("neither sqlite nor ndb: no 'RpmP' magic")
    if version != 0:
        raise coll.fail(f"ndb: unknown version {version}")
    if not 1 <= npages <= len(data) // _NDB_PAGE:
        raise coll.fail(f"ndb: {npages} slot pages in a file of {len(data)} bytes")
    fileblks = len(data) // _NDB_BLK
    first_blob = npages * (_NDB_PAGE // _NDB_BLK)
    slots: list[tuple[int, int, int]] = []
    for off in range(_NDB_HEAD, npages * _NDB_PAGE, _NDB_SLOT):
        smagic, pkgidx, blkoff, blkcnt = _LE4.unpack_from(data, off)
        if smagic != _SLOT_MAGIC:
            raise coll.fail(f"ndb: slot at byte {off} has no 'Slot' magic")
        if not blkoff:
            continue  # a free slot
        if not pkgidx or not blkcnt or blkoff < first_blob or blkoff + blkcnt > fileblks:
            raise coll.fail(
                f"ndb: slot at byte {off} (package {pkgidx}) points outside the blob area"
            )
        slots.append((pkgidx, blkoff, blkcnt))
    slots.sort()
    for (a, _, _), (b, _, _) in zip(slots, slots[1:], strict=False):
        if a == b:
            raise coll.fail(f"ndb: two slots for package {a}")
    for pkgidx, blkoff, blkcnt in slots:
        coll.add(pkgidx, _ndb_blob(coll, data, pkgidx, blkoff, blkcnt))
    return coll.res


def _ndb_blob(coll: _Collector, data: bytes, pkgidx: int, blkoff: int, blkcnt: int) -> bytes:
    """The header blob in ``blkcnt`` blocks at ``blkoff``, its framing checked."""
    start, end = blkoff * _NDB_BLK, (blkoff + blkcnt) * _NDB_BLK
    if end - start < _BLOB_HEAD + _BLOB_TAIL:
        raise coll.fail(f"package {pkgidx}: ndb blob of {end - start} bytes")
    magic, idx, _stamp, length = _LE4.unpack_from(data, start)
    if magic != _BLOB_MAGIC or idx != pkgidx:
        raise coll.fail(f"package {pkgidx}: ndb blob has no 'BlbS' head for it")
    if blkcnt != (_BLOB_HEAD + length + _BLOB_TAIL + _NDB_BLK - 1) // _NDB_BLK:
        raise coll.fail(f"package {pkgidx}: ndb blob of {length} bytes in {blkcnt} blocks")
    adler, tail_len, tail_magic = struct.unpack_from("<III", data, end - _BLOB_TAIL)
    if tail_magic != _BLOB_END or tail_len != length:
        raise coll.fail(f"package {pkgidx}: ndb blob has no matching 'BlbE' tail")
    if zlib.adler32(memoryview(data)[start : end - _BLOB_TAIL], 1) != adler:
        raise coll.fail(f"package {pkgidx}: ndb blob checksum mismatch")
    return data[start + _BLOB_HEAD : start + _BLOB_HEAD + length]


# -- Berkeley DB hash (rpm < 4.16) ---------------------------------------------------------

_BDB_HASH_MAGIC, _BDB_BTREE_MAGIC = 0x00061561, 0x00053162
_P_HASH_UNSORTED, _P_OVERFLOW, _P_HASH = 2, 7, 13
_H_KEYDATA, _H_OFFPAGE = 1, 3
_PAGE_HEAD = 26


def _read_bdb(budget: Budget, rel: str) -> PackageFiles:
    """``Packages``: a Berkeley DB hash database keyed by the package number, header blobs
    as values (big ones on overflow pages).  Buckets are walked as Berkeley DB lays them
    out; every page is visited at most once."""
    coll = _Collector(budget, rel)
    data = budget.read(rel)
    if len(data) < 512:
        raise coll.fail(f"{len(data)} bytes: not an rpm database (sqlite, ndb or Berkeley DB)")
    order = ""
    for bo in "<>":
        magic = struct.unpack_from(bo + "I", data, 12)[0]
        if magic == _BDB_BTREE_MAGIC:
            raise coll.fail(f"Berkeley DB btree rpm database: not readable by vsstore; {BDB_HINT}")
        if magic == _BDB_HASH_MAGIC:
            order = bo
    if not order:
        raise coll.fail("not an rpm database (no sqlite, ndb or Berkeley DB magic)")
    try:
        for key, blob in _bdb_items(data, order, budget.limits.max_packages):
            coll.add(key, blob)
    except _Bad as e:
        raise coll.fail(f"Berkeley DB hash rpm database: {e}; {BDB_HINT}") from None
    return coll.res


def _bdb_items(data: bytes, bo: str, max_items: int) -> Iterator[tuple[int, bytes]]:
    """(package number, header blob) of every record but rpm's counter (key 0)."""
    meta = struct.unpack_from(bo + "56I", data, 0)
    version, pagesize, lastpage = meta[4], meta[5], meta[8]
    maxbucket, spares = meta[18], meta[24:56]
    if not 8 <= version <= 10:
        raise _Bad(f"unsupported hash version {version}")
    if pagesize not in (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise _Bad(f"page size {pagesize}")
    if (lastpage + 1) * pagesize > len(data):
        raise _Bad(f"{lastpage + 1} pages of {pagesize} bytes in a file of {len(data)} bytes")
    if maxbucket >= lastpage + 1:
        raise _Bad(f"{maxbucket + 1} buckets in {lastpage + 1} pages")
    seen: set[int] = set()
    page_head = struct.Struct(bo + "IIIHHBB")  # pgno, prev, next, entries, hf_offset, ...
    u32 = struct.Struct(bo + "I")

    def page(pgno: int, types: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(start offset, next page, entries, hf_offset) of page ``pgno``, checked."""
        if not 1 <= pgno <= lastpage:
            raise _Bad(f"page number {pgno} outside the file")
        if pgno in seen:
            raise _Bad(f"page {pgno} reached twice (a loop or a shared page)")
        seen.add(pgno)
        start = pgno * pagesize
        no, _prev, nxt, entries, hf, _level, typ = page_head.unpack_from(data, start + 8)
        if no != pgno or typ not in types:
            raise _Bad(
                f"page {pgno} is not the expected "
                f"{'hash' if _P_HASH in types else 'overflow'} page (it says page "
                f"{no}, type {typ})"
            )
        return start, nxt, entries, hf

    def item(start: int, off: int, length: int) -> bytes:
        if length < 1:
            raise _Bad("an empty item")
        kind = data[start + off]
        if kind == _H_KEYDATA:
            return data[start + off + 1 : start + off + length]
        if kind != _H_OFFPAGE:
            raise _Bad(f"item type {kind} (duplicates are not used by rpm)")
        if length != 12:
            raise _Bad("a malformed overflow item")
        pgno, total = struct.unpack_from(bo + "II", data, start + off + 4)
        if not 0 < total <= len(data):
            raise _Bad(f"an overflow item of {total} bytes")
        chunks, got = [], 0
        while got < total:
            ostart, pgno, _, plen = page(pgno, (_P_OVERFLOW,))
            if plen > pagesize - _PAGE_HEAD or plen > total - got or not plen:
                raise _Bad(f"overflow page of {plen} bytes")
            chunks.append(data[ostart + _PAGE_HEAD : ostart + _PAGE_HEAD + plen])
            got += plen
        return b"".join(chunks)

    items = 0
    for bucket in range(maxbucket + 1):
        pgno = bucket + spares[bucket.bit_length()]
        while pgno:
            start, nxt, n, _ = page(pgno, (_P_HASH_UNSORTED, _P_HASH))
            if n % 2 or _PAGE_HEAD + 2 * n > pagesize:
                raise _Bad(f"page {pgno}: {n} entries")
            offs = struct.unpack_from(f"{bo}{n}H", data, start + _PAGE_HEAD)
            low = _PAGE_HEAD + 2 * n
            for i in range(0, n, 2):
                koff, voff = offs[i], offs[i + 1]
                kend = pagesize if i == 0 else offs[i - 1]
                if not low <= voff < koff < kend <= pagesize:
                    raise _Bad(f"page {pgno}: entry {i // 2} out of place")
                key = item(start, koff, kend - koff)
                if len(key) != 4:
                    raise _Bad(f"page {pgno}: a key of {len(key)} bytes")
                number = u32.unpack(key)[0]
                value = item(start, voff, koff - voff)
                if number == 0:
                    continue  # rpm's record of the next package number
                items += 1
                if items > max_items:
                    raise _Bad(f"more than {max_items} packages")
                yield number, value
            pgno = nxt
