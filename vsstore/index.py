"""The incremental index: a cache of content hashes per inode, plus the link journal and
the history of runs.  SQLite, one file, WAL mode.

The index is only a cache: deleting it costs a re-read of every file, never a wrong link,
because every link is confirmed against the file itself just before it happens.  The one
thing it holds that is not derivable is the journal of links in flight, which lets the next
run tidy temporary names a crash left behind; without it those names stay (their content is
identical to the file beside them, so nothing is lost) and the walk reports them.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import NOSPACE_ERRNOS, ConfigError, NoSpaceError
from .names import shown

SCHEMA_VERSION = 4  # 4: journal path columns are bytes (BLOB), as names are on disk

# Links in flight: written before the first temporary name of a batch appears and deleted
# after the last is gone.  See unify/apply.py for how a leftover row is resolved.  Paths are
# bytes (os.fsencode): a guest's names need not be UTF-8.
_JOURNAL = """
CREATE TABLE IF NOT EXISTS {table} (
    id       INTEGER PRIMARY KEY,
    kind     TEXT NOT NULL,      -- 'join' (name -> object), 'deunify' (name -> copy), 'object'
    root     BLOB NOT NULL,      -- guest root (host path); 'object': the store
    dir      BLOB NOT NULL,      -- directory of the name, relative to root
    name     BLOB NOT NULL,      -- the guest's name being replaced
    tmp      BLOB NOT NULL,      -- our temporary name beside it
    orig_ino INTEGER NOT NULL,   -- join: inode the name held; deunify: the private copy
    obj_ino  INTEGER NOT NULL    -- the store object's inode
);
"""

_SCHEMA = (
    _JOURNAL.format(table="journal")
    + """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per inode whose content was hashed.  A row is valid only while the inode's
-- size, mtime_ns and ctime_ns still match (ctime cannot be set from user space).
CREATE TABLE IF NOT EXISTS inode (
    dev      INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    digest   BLOB NOT NULL,      -- xxh3-128 of the content (groups, names objects)
    strong   BLOB NOT NULL,      -- BLAKE3-256 of the content (confirms every link)
    meta     BLOB NOT NULL,      -- metadata class: mode, owner, xattrs, mtime
    meta_any BLOB NOT NULL,      -- the same without mtime (for --ignore-mtime)
    PRIMARY KEY (dev, ino)
) WITHOUT ROWID;
-- One row per inode whose extents a run shared (FIDEDUPERANGE) with the others of its
-- cluster, so an unchanged re-run does not ask the kernel again.  Valid only while size,
-- mtime_ns and ctime_ns still match (sharing extents changes neither).
CREATE TABLE IF NOT EXISTS extent (
    dev      INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    cluster  INTEGER NOT NULL,   -- inode number of the file the cluster was first shared from
    PRIMARY KEY (dev, ino)
) WITHOUT ROWID;
-- One row per finished run, for reports and trends.
CREATE TABLE IF NOT EXISTS run (
    id            INTEGER PRIMARY KEY,
    started       REAL NOT NULL,
    duration      REAL NOT NULL,
    guests        INTEGER NOT NULL,
    files_scanned INTEGER NOT NULL,
    files_hashed  INTEGER NOT NULL,
    files_linked  INTEGER NOT NULL,
    bytes_saved   INTEGER NOT NULL,
    errors        INTEGER NOT NULL,
    dry_run       INTEGER NOT NULL
);
-- One row per report (the savings trend), and the guests' figures in it.
CREATE TABLE IF NOT EXISTS snapshot (
    id             INTEGER PRIMARY KEY,
    taken          REAL NOT NULL,
    guests         INTEGER NOT NULL,
    files          INTEGER NOT NULL,
    apparent_bytes INTEGER NOT NULL,
    disk_bytes     INTEGER NOT NULL,
    saved_bytes    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot_guest (
    snapshot    INTEGER NOT NULL REFERENCES snapshot(id) ON DELETE CASCADE,
    guest       TEXT NOT NULL,
    disk_bytes  INTEGER NOT NULL,
    saved_bytes INTEGER NOT NULL
);
"""
)

HISTORY_KEEP = 400  # rows of run and snapshot history kept (more than a year of nights)


Row = tuple[int, int, int, int, int, bytes, bytes, bytes, bytes]


# A cached row as load() gives it: (ino, size, mtime_ns, ctime_ns, digest, strong, meta,
# meta_any), the row itself (no object per row: a re-run loads every row of a device).
Cached = tuple[int, int, int, int, bytes, bytes, bytes, bytes]


@dataclass(frozen=True, slots=True)
class ExtentRow:
    size: int
    mtime_ns: int
    ctime_ns: int
    cluster: int


@dataclass(frozen=True, slots=True)
class JournalRow:
    id: int
    kind: str
    root: str
    dir: str
    name: str
    tmp: str
    orig_ino: int
    obj_ino: int


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One finished, real (not dry) run, as the history keeps it."""

    started: float
    duration: float
    guests: int
    files_scanned: int
    files_hashed: int
    files_linked: int
    bytes_saved: int
    errors: int

    def as_dict(self) -> dict[str, float]:
        return {
            "started": self.started,
            "duration": self.duration,
            "guests": self.guests,
            "files_scanned": self.files_scanned,
            "files_hashed": self.files_hashed,
            "files_linked": self.files_linked,
            "bytes_saved": self.bytes_saved,
            "errors": self.errors,
        }


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A report's figures kept for the trend: the total, and per guest (disk, saved)."""

    taken: float
    guests: int
    files: int
    apparent_bytes: int
    disk_bytes: int
    saved_bytes: int
    per_guest: dict[str, tuple[int, int]]  # guest -> (disk_bytes, saved_bytes)

    def as_dict(self) -> dict[str, object]:
        return {
            "taken": self.taken,
            "guests": self.guests,
            "files": self.files,
            "apparent_bytes": self.apparent_bytes,
            "disk_bytes": self.disk_bytes,
            "saved_bytes": self.saved_bytes,
            "per_guest": {
                g: {"disk_bytes": d, "saved_bytes": s} for g, (d, s) in self.per_guest.items()
            },
        }


class _ForeignVersion(sqlite3.DatabaseError):
    """The file is an index of another schema version."""


# Failures that are not the file's: a corrupt or foreign index is moved aside, these not.
_NOT_THE_FILE = (
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_INTERRUPT,
)


class Index:
    """The index database.  Opening a corrupt or foreign file moves it aside and starts
    afresh.  A write the filesystem has no room for raises NoSpaceError (and leaves the
    database as it was before that transaction); so does opening it on a full disk, which
    never moves a good file aside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.warning: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in NOSPACE_ERRNOS:
                raise self._no_space() from None
            raise ConfigError(
                f"cannot create the state directory {path.parent}: {e.strerror}; "
                f"set VSSTORE_STATEDIR to a writable directory"
            ) from None
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            failure = self._failure(e)
            if failure is not e:
                raise failure from e
            code = getattr(e, "sqlite_errorcode", None)
            if code is not None and code & 0xFF in _NOT_THE_FILE:
                raise  # moving the file aside would not help (and would lose its journal)
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(path) + suffix)
                if src.exists():
                    os.replace(src, str(aside) + suffix)
            self.warning = (
                f"index {path} was unreadable ({e}); moved it to {aside} and "
                f"started a new one (it is a cache: this run re-reads files)"
            )
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] == "3":
                _migrate_3(db)
            elif int(row[0]) != SCHEMA_VERSION:
                raise _ForeignVersion(f"schema version {row[0]}, expected {SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM inode").fetchone()
        except Exception:
            db.close()
            raise
        return db

    def close(self) -> None:
        self.db.close()

    # -- failures ----------------------------------------------------------------------

    def _no_space(self) -> NoSpaceError:
        return NoSpaceError.on(
            self.path.parent,
            f"the index {shown(self.path)}",
            "nothing was changed that the index could not record; the "
            "next run tidies up after this one",
        )

    def _failure(self, e: sqlite3.Error) -> Exception:
        """What a failed statement means for the user: no space (NoSpaceError), an index we
        may not open or write (ConfigError), or else ``e`` itself (corruption, a bug)."""
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if code is not None else None
        if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and self._fs_full()):
            return self._no_space()
        if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM):
            return ConfigError(
                f"index {shown(self.path)}: {e}; make it and its directory "
                f"writable, or set VSSTORE_STATEDIR to a writable directory"
            )
        return e

    def _fs_full(self) -> bool:
        """Whether the index's filesystem is (as good as) full: an I/O error on a write
        there is then ENOSPC (SQLite reports a failed write to the -shm file that way)."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
        return free < (1 << 20) or st.f_favail == 0

    # -- inode cache -------------------------------------------------------------------

    def rows(self, dev: int, sizes: tuple[int, int] | None = None) -> Iterator[Cached]:
        """The cached rows of one device in inode order, one query; ``sizes``: only those
        of sizes in [lo, hi] (a run in passes by size reads one pass's rows, and merges
        them with its records without holding them: engine._from_index)."""
        query = (
            "SELECT ino, size, mtime_ns, ctime_ns, digest, strong, meta, meta_any FROM inode "
            "WHERE dev=?"
        )
        args: tuple[int, ...] = (dev,)
        if sizes is not None:
            query += " AND size BETWEEN ? AND ?"
            args += sizes
        return iter(self.db.execute(query + " ORDER BY ino", args))

    def store(self, rows: Iterable[Row]) -> None:
        """Insert or replace rows (dev, ino, size, mtime_ns, ctime_ns, digest, strong, meta,
        meta_any)."""
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO inode VALUES (?,?,?,?,?,?,?,?,?)", rows)

    def forget(self, dev: int, inos: Iterable[int]) -> None:
        """Inodes that are no more (their cache and extent rows)."""
        keys = [(dev, i) for i in inos]
        with self.transaction():
            self.db.executemany("DELETE FROM inode WHERE dev=? AND ino=?", keys)
            self.db.executemany("DELETE FROM extent WHERE dev=? AND ino=?", keys)

    # -- extent sharing ----------------------------------------------------------------

    def load_extents(self, dev: int) -> dict[int, ExtentRow]:
        """Every extent row of one device, by inode number."""
        return {
            r[0]: ExtentRow(*r[1:])
            for r in self.db.execute(
                "SELECT ino, size, mtime_ns, ctime_ns, cluster FROM extent WHERE dev=?", (dev,)
            )
        }

    def store_extents(self, rows: Iterable[tuple[int, int, int, int, int, int]]) -> None:
        """Insert or replace rows (dev, ino, size, mtime_ns, ctime_ns, cluster)."""
        with self.transaction():
            self.db.executemany("INSERT OR REPLACE INTO extent VALUES (?,?,?,?,?,?)", rows)

    # -- journal -----------------------------------------------------------------------

    def journal_add(self, rows: Iterable[tuple[str, str, str, str, str, int, int]]) -> list[int]:
        """Rows (kind, root, dir, name, tmp, orig_ino, obj_ino), committed together; their
        ids.  Paths go in as bytes, whatever they hold.  One statement for all rows: the
        ids follow the largest in the table, which the write lock of the transaction keeps
        from moving meanwhile."""
        fse = os.fsencode
        with self.transaction():
            top = self.db.execute("SELECT coalesce(max(id), 0) FROM journal").fetchone()[0]
            values = [
                (top + n, kind, fse(root), fse(d), fse(name), fse(tmp), orig_ino, obj_ino)
                for n, (kind, root, d, name, tmp, orig_ino, obj_ino) in enumerate(rows, 1)
            ]
            self.db.executemany(
                "INSERT INTO journal (id, kind, root, dir, name, tmp, orig_ino, obj_ino) "
                "VALUES (?,?,?,?,?,?,?,?)",
                values,
            )
        return [v[0] for v in values]

    def journal_done(self, ids: Iterable[int]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM journal WHERE id=?", ((i,) for i in ids))

    def journal(self) -> list[JournalRow]:
        """Every row, oldest first, paths decoded as ``os`` does (surrogate escapes)."""
        fsd = os.fsdecode
        return [
            JournalRow(i, kind, fsd(root), fsd(d), fsd(name), fsd(tmp), orig, obj)
            for i, kind, root, d, name, tmp, orig, obj in self.db.execute(
                "SELECT id, kind, root, dir, name, tmp, orig_ino, obj_ino FROM journal ORDER BY id"
            )
        ]

    # -- runs --------------------------------------------------------------------------

    def record_run(
        self, started: float, duration: float, guests: int, summary: dict[str, int], dry_run: bool
    ) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO run (started, duration, guests, files_scanned, files_hashed, "
                "files_linked, bytes_saved, errors, dry_run) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    started,
                    duration,
                    guests,
                    summary["files_scanned"],
                    summary["files_hashed"],
                    summary["files_linked"],
                    summary["bytes_saved"],
                    summary["errors"],
                    int(dry_run),
                ),
            )

    def runs(self, limit: int = HISTORY_KEEP) -> list[RunRecord]:
        """The last ``limit`` real (not dry) runs, oldest first."""
        rows = self.db.execute(
            "SELECT started, duration, guests, files_scanned, files_hashed, "
            "files_linked, bytes_saved, errors FROM run WHERE dry_run = 0 "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [RunRecord(*r) for r in reversed(rows)]

    def record_snapshot(self, snap: Snapshot) -> None:
        """Keep a report's figures for the trend; the oldest beyond HISTORY_KEEP go, as do
        runs beyond it."""
        with self.transaction():
            cur = self.db.execute(
                "INSERT INTO snapshot (taken, guests, files, apparent_bytes, disk_bytes, "
                "saved_bytes) VALUES (?,?,?,?,?,?)",
                (
                    snap.taken,
                    snap.guests,
                    snap.files,
                    snap.apparent_bytes,
                    snap.disk_bytes,
                    snap.saved_bytes,
                ),
            )
            sid = cur.lastrowid
            self.db.executemany(
                "INSERT INTO snapshot_guest VALUES (?,?,?,?)",
                [(sid, g, d, s) for g, (d, s) in sorted(snap.per_guest.items())],
            )
            for table in ("snapshot", "run"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE id <= (SELECT max(id) FROM {table}) - ?",
                    (HISTORY_KEEP,),
                )
            self.db.execute(
                "DELETE FROM snapshot_guest WHERE snapshot NOT IN (SELECT id FROM snapshot)"
            )

    def snapshots(self, limit: int = HISTORY_KEEP) -> list[Snapshot]:
        """Report snapshots, oldest first, each with its per-guest figures."""
        rows = self.db.execute(
            "SELECT id, taken, guests, files, apparent_bytes, disk_bytes, "
            "saved_bytes FROM snapshot ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        out: list[Snapshot] = []
        for sid, taken, guests, files, apparent, disk, saved in reversed(rows):
            per_guest = {
                g: (d, s)
                for g, d, s in self.db.execute(
                    "SELECT guest, disk_bytes, saved_bytes FROM snapshot_guest WHERE snapshot = ?",
                    (sid,),
                )
            }
            out.append(Snapshot(taken, guests, files, apparent, disk, saved, per_guest))
        return out

    # -- helpers -----------------------------------------------------------------------

    class _Tx:
        """One write transaction: committed whole, or rolled back with the error turned
        into what it means for the user (Index._failure)."""

        def __init__(self, index: Index) -> None:
            self.index = index
            self.db = index.db

        def __enter__(self) -> None:
            try:
                self.db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                failure = self.index._failure(e)
                if failure is e:
                    raise
                raise failure from e

        def __exit__(self, exc_type: object, exc: BaseException | None, _tb: object) -> None:
            if exc is None:
                try:
                    self.db.execute("COMMIT")
                    return
                except sqlite3.Error as e:
                    exc = e
            if self.db.in_transaction:
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the first error says more
            if isinstance(exc, sqlite3.Error):
                failure = self.index._failure(exc)
                if failure is not exc:
                    raise failure from exc
            if exc_type is None:
                raise exc  # the commit failed

    def transaction(self) -> Index._Tx:
        return Index._Tx(self)

    def __iter__(self) -> Iterator[tuple]:  # for tests and debugging
        return iter(self.db.execute("SELECT * FROM inode"))


def _migrate_3(db: sqlite3.Connection) -> None:
    """Version 3 kept journal paths as TEXT (UTF-8 names only).  Its rows (a crashed run's
    links in flight) and the inode cache are kept: the paths become their UTF-8 bytes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_JOURNAL.format(table="journal4"))
        db.execute(
            "INSERT INTO journal4 SELECT id, kind, CAST(root AS BLOB), CAST(dir AS BLOB), "
            "CAST(name AS BLOB), CAST(tmp AS BLOB), orig_ino, obj_ino FROM journal"
        )
        db.execute("DROP TABLE journal")
        db.execute("ALTER TABLE journal4 RENAME TO journal")
        db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
