"""A unification run: walk, exclude, look up, hash, group, link, record.  No argv here."""

from __future__ import annotations

import errno
import gc
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from operator import attrgetter

from vsstore.config import Guest
from vsstore.errors import ConfigError, UnsupportedError
from vsstore.excludes import ExcludeList
from vsstore.hashing import content_digests, meta_class, read_xattrs
from vsstore.index import Index
from vsstore.names import shown
from vsstore.safetree import GuestTree
from vsstore.store import Key, Store, StoreObject

from . import apply, dedupe, scan
from .dedupe import Reflink
from .progress import Progress

log = logging.getLogger("vsstore")


MAX_INODES = 150_000  # the default bound of Options.max_inodes


@dataclass(slots=True)
class Options:
    min_size: int = 16
    ignore_mtime: bool = False
    immutable: bool = True
    dry_run: bool = False
    jobs: int = 8
    reflink: Reflink = Reflink.AUTO
    link_limit: int | None = None  # tests only
    # Inodes one walk may hold; a run over more goes on in passes by size range (each
    # walks the guests again).  About 0.6 KiB each while a pass hashes and links them.
    max_inodes: int | None = MAX_INODES


@dataclass(slots=True)
class Summary:
    """What a run did, and what `--json` prints.  One record for the whole run: the engine
    counts the walk and the hashing, the linker (``Linker.stats``) what it links, saves,
    skips and fails, each message in the order it happened."""

    guests: int = 0
    files_scanned: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    files_linked: int = 0
    bytes_saved: int = 0
    objects_created: int = 0
    errors: int = 0
    skipped_busy: int = 0
    skipped_changed: int = 0
    leftovers: int = 0
    files_deduped: int = 0  # files whose extents this run shared (FIDEDUPERANGE)
    bytes_deduped: int = 0  # ... and their sizes
    reflink: str = "off"  # "on", "off", or "unavailable: WHY"
    duration: float = 0.0
    dry_run: bool = False
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["messages"] = self.messages[:100]
        return d


def open_trees(guests: list[Guest], store: Store) -> list[GuestTree]:
    """Open every guest root; refuse overlapping guests and guests off the store's fs."""
    trees: list[GuestTree] = []
    try:
        seen: dict[str, Guest] = {}
        for g in guests:
            if g.name in seen:
                raise ConfigError(
                    f"guest '{shown(g.name)}' named twice "
                    f"({shown(seen[g.name].root)}, {shown(g.root)})"
                )
            seen[g.name] = g
            t = GuestTree(g.root, g.name)
            trees.append(t)
            store.check_guest(g.name, g.root, t.dev)
        roots = sorted((t.root.resolve(), t.name) for t in trees)
        for (a, an), (b, bn) in zip(roots, roots[1:], strict=False):
            if b.is_relative_to(a):
                raise ConfigError(
                    f"guest '{shown(bn)}' ({shown(b)}) lies inside guest "
                    f"'{shown(an)}' ({shown(a)}); name each guest once"
                )
    except BaseException:
        for t in trees:
            t.close()
        raise
    return trees


Hashed = tuple[bytes, bytes, bytes, bytes]  # xxh3, blake3, meta, meta_any
CHUNK_FILES = 64  # files hashed between two looks at what can be linked
WILLNEED_MAX = 8 << 20  # of a large file, the start is asked for; readahead does the rest
AHEAD_BYTES = 64 << 20  # asked for ahead of the hashing at most (the page cache may be small)
KEEP_FDS = 4096  # hashed files held open for the linker at most (see _Pipeline.keep)


def _open_to_hash(rec: scan.InodeRec) -> int | str | None:
    """``rec`` opened for reading, or what hashing it answers when it cannot be: None if
    it simply went away (a guest deleting or replacing files is no error), else a
    message."""
    tree, rel = rec.names[0]
    try:
        try:  # reading leaves the atime alone too (O_NOATIME: the owner or CAP_FOWNER)
            return tree.open_regular(
                rel, expect=(rec.dev, rec.ino), flags=os.O_RDONLY | os.O_NOATIME
            )
        except PermissionError:
            return tree.open_regular(rel, expect=(rec.dev, rec.ino))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ESTALE:
            return None
        return f"{tree.where(rel)}: skipped: cannot open: {e.strerror}"


Keep = Callable[[scan.InodeRec, int], bool]


def _hash_open(rec: scan.InodeRec, fd: int, keep: Keep | None = None) -> Hashed | str | None:
    """Digest and metadata classes of ``rec``, opened as ``fd`` (closed here unless
    ``keep`` takes it: the file read without a fault); a message if it could not be
    read."""
    tree, rel = rec.names[0]
    kept = False
    try:
        digest, strong = content_digests(fd, rec.size)
        xattrs = read_xattrs(fd)
        # One look, after the read, against the walk's: a change before or during the read
        # moved the ctime (and what it says of the mode, owner and xattrs read with it).
        st = os.fstat(fd)
        if not rec.same_stat(st):
            return f"{tree.where(rel)}: skipped: changed during the run"
        kept = keep is not None and keep(rec, fd)
        return digest, strong, meta_class(st, xattrs, False), meta_class(st, xattrs, True)
    except OSError as e:
        return f"{tree.where(rel)}: skipped: {e.strerror}"
    finally:
        if not kept:
            os.close(fd)


def run(
    guests: list[Guest],
    excludes: dict[str, ExcludeList],
    store: Store,
    index: Index,
    opts: Options,
    progress: Progress | None = None,
) -> Summary:
    """Unify ``guests`` into ``store``.  The caller holds the run lock."""
    t0 = time.monotonic()
    started = time.time()
    prog = progress or Progress(False)
    summ = Summary(guests=len(guests), dry_run=opts.dry_run)
    if not opts.dry_run:  # 0. What a crashed run left in flight: finished or undone.
        summ.messages += apply.recover(index, store, opts.immutable)
    extents_on = _extents_available(store, opts, summ)
    trees = open_trees(guests, store)
    # The records of a run are many small objects (a few per name) without cycles; the
    # cyclic collector would trace them all again and again as they pile up (half the
    # time of a walk).  It waits until the run is over.
    gc_was = gc.isenabled()
    gc.disable()
    spill: scan.Spill | None = None
    try:
        objects = _Objects.scan(store)
        budget = None if extents_on else opts.max_inodes
        if budget is not None:
            spill = scan.Spill(index.path.parent)
        records = objects.records()
        sc = _walk(trees, excludes, opts, records, summ, prog, extents_on, budget, spill)
        ahead = _read_ahead(opts)
        keep = _kept_max(ahead)
        linker = apply.Linker(
            store,
            index,
            immutable=opts.immutable,
            ignore_mtime=opts.ignore_mtime,
            stats=summ,
            link_limit=opts.link_limit,
            fds=apply.fds_free() - ahead - keep - 32,
        )
        linker.trees = trees
        if sc.complete:
            _unify_pass(sc, opts, linker, index, objects, prog, ahead, keep)
        else:
            # 2b. Too many inodes to hold at once: the walk counted them by size and wrote
            # them to the spill, and the run goes on in passes over size ranges, each
            # reading back only its sizes (a group of duplicates has one size: no group is
            # cut).
            assert spill is not None
            ranges = _size_ranges(sc.sizes, budget or 1)
            log.info("%d inodes: unifying in %d passes by size", sc.sizes.total(), len(ranges))
            hashed_point = False
            for lo_hi in ranges:
                part = scan.from_spill(spill, trees, lo_hi, records)
                hashed_point = _unify_pass(
                    part, opts, linker, index, objects, prog, ahead, keep, hashed_point
                )
                # What this pass recorded is in the index: nothing of it is kept.
                linker.known, linker.index_rows, linker.forget = {}, [], []
        if extents_on:
            _share_extents(sc, store, index, opts, summ, prog, set(linker.forget), ahead)
    finally:
        if spill is not None:
            spill.close()
        if gc_was:
            gc.enable()
        prog.done()
        for t in trees:
            t.close()
    summ.duration = time.monotonic() - t0
    index.record_run(started, summ.duration, len(guests), asdict(summ), opts.dry_run)
    return summ


def _unify_pass(
    sc: scan.Scan,
    opts: Options,
    linker: apply.Linker,
    index: Index,
    objects: _Objects,
    prog: Progress,
    ahead: int,
    keep: int,
    hashed_point: bool = False,
) -> bool:
    """3-6 for the inodes of one walk: look up, hash, link, record.  Returns whether the
    'hashed' point (tests) has passed."""
    by_size, to_hash = _look_up(sc, objects, index)
    linker.known = sc.inodes
    pipe = _Pipeline(
        opts,
        linker,
        index,
        objects,
        by_size,
        sc,
        tick=prog.refresh,  # linking moves no counter of the line: redraw it
        keep_max=keep,
    )
    pipe.hashed_point_passed = hashed_point
    _hash_and_link(pipe, to_hash, prog, ahead)
    if not opts.dry_run:
        _record(index, linker)
    return pipe.hashed_point_passed


def _size_ranges(sizes: Counter[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive size ranges [lo, hi) covering every size, each holding about
    ``budget`` inodes (one size never split)."""
    ranges: list[tuple[int, int]] = []
    lo, held = 0, 0
    for size in sorted(sizes):
        if held and held + sizes[size] > budget:
            ranges.append((lo, size))
            lo, held = size, 0
        held += sizes[size]
    ranges.append((lo, 1 << 63))
    return ranges


def _extents_available(store: Store, opts: Options, summ: Summary) -> bool:
    """0b. Whether this run shares extents: asked for, and the store's filesystem can."""
    if opts.reflink is Reflink.OFF:
        return False
    why = dedupe.unavailable(store)
    if why is None:
        summ.reflink = "on"
        return True
    if opts.reflink is Reflink.ONLY:
        raise UnsupportedError(
            f"--reflink-only: {shown(store.path)}: {why}; put the guests on XFS "
            f"(mkfs.xfs -m reflink=1) or btrfs, or leave --reflink-only out"
        )
    summ.reflink = f"unavailable: {why}"
    return False


@dataclass(slots=True)
class _Objects:
    """1. The store's objects, as the later phases ask for them."""

    by_key: dict[Key, list[StoreObject]]
    by_ino: dict[int, StoreObject]
    inos: set[tuple[int, int]]  # (dev, ino): a guest inode that is an object already
    sizes: set[int]  # a size held by an object is worth reading even if one guest has it
    dev: int  # the store's filesystem

    def records(self) -> dict[int, scan.InodeRec]:
        """A fresh record per object, by inode number: a guest name that holds one needs
        no stat in the walk (a sealed object cannot change) and no record of its own."""
        return {
            o.ino: scan.InodeRec(self.dev, o.ino, o.size, *o.stamp, o.nlink)
            for o in self.by_ino.values()
            if o.stamp is not None
        }

    @classmethod
    def scan(cls, store: Store) -> _Objects:
        by_key = store.scan()
        objs = [o for group in by_key.values() for o in group]
        return cls(
            by_key,
            {o.ino: o for o in objs},
            {(store.dev, o.ino) for o in objs},
            {o.size for o in objs},
            store.dev,
        )


def _walk(
    trees: list[GuestTree],
    excludes: dict[str, ExcludeList],
    opts: Options,
    records: dict[int, scan.InodeRec],
    summ: Summary,
    prog: Progress,
    extents_on: bool = False,
    budget: int | None = None,
    spill: scan.Spill | None = None,
) -> scan.Scan:
    """2. Walk the guests: an InodeRec per candidate inode, with every name seen (and,
    when extents are shared, the private ones too); ``records``: the store objects' (a
    name of one gets its record).  Counts and messages go to ``summ``.  Over ``budget``
    inodes, the candidates are in ``spill`` (see run)."""
    prog.phase("scan")
    sc = scan.scan(
        trees,
        excludes,
        opts.min_size,
        tick=lambda n, b: prog.update(n, b),
        jobs=2,
        link=opts.reflink is not Reflink.ONLY,
        extents=extents_on,
        objects=records,
        budget=budget,
        spill=spill,
    )
    summ.files_scanned = sc.files_scanned
    summ.errors += sc.errors
    summ.leftovers = len(sc.leftovers)
    for name in sc.leftovers[:20]:
        log.warning(
            "%s: temporary name left by an interrupted run (no journal entry); "
            "its content equals the file it was meant to replace or a store "
            "object: check and remove it",
            name,
        )
    return sc


def _look_up(
    sc: scan.Scan,
    objects: _Objects,
    index: Index,
) -> tuple[dict[int, list[scan.InodeRec]], list[scan.InodeRec]]:
    """3. What needs reading: only sizes shared with another inode or an object.  Of
    those inodes (returned by size), the ones the index knows unchanged take their
    digests from it; the others (returned second) are to be hashed.  Store objects the
    walk met are looked up too, but grouped by nobody (a group finds its objects by
    key): one whose row is stale is only read again, and resealed (_Pipeline.hashed)."""
    new: list[scan.InodeRec] = []
    seen: list[scan.InodeRec] = []
    for r in sc.inodes.values():
        (seen if (r.dev, r.ino) in objects.inos else new).append(r)
    size_count = Counter(r.size for r in new)
    by_size: dict[int, list[scan.InodeRec]] = {}
    for rec in new:
        if size_count[rec.size] < 2 and rec.size not in objects.sizes:
            continue
        by_size.setdefault(rec.size, []).append(rec)
    return by_size, _from_index([r for rs in by_size.values() for r in rs] + seen, index)


def _from_index(recs: list[scan.InodeRec], index: Index) -> list[scan.InodeRec]:
    """Digests of ``recs`` (none has any yet) the index knows for their unchanged inodes;
    the others are returned, in their order, to be hashed.  Each device's rows of the
    sizes ``recs`` span are read in one query, in inode order, and merged with the
    records sorted the same way: no row is held beyond its record (a dict of a million
    rows was most of a re-run's memory)."""
    if not recs:
        return []
    sizes = [r.size for r in recs]
    span = (min(sizes), max(sizes))
    by_dev: dict[int, list[scan.InodeRec]] = {}
    for rec in recs:
        by_dev.setdefault(rec.dev, []).append(rec)
    same = _interned()
    for dev, mine in by_dev.items():
        mine.sort(key=attrgetter("ino"))
        i, n = 0, len(mine)
        for c in index.rows(dev, span):
            ino = c[0]
            while i < n and mine[i].ino < ino:
                i += 1
            if i == n:
                break
            while i < n and mine[i].ino == ino:
                rec = mine[i]
                if c[1] == rec.size and c[2] == rec.mtime_ns and c[3] == rec.ctime_ns:
                    rec.digest, rec.strong = c[4], c[5]
                    rec.meta, rec.meta_any = same(c[6]), same(c[7])
                i += 1
    return [r for r in recs if r.digest is None]


def _interned() -> Callable[[bytes], bytes]:
    """One bytes object for equal values: metadata classes are few, inodes many."""
    seen: dict[bytes, bytes] = {}
    return lambda b: seen.setdefault(b, b)


def _share_extents(
    sc: scan.Scan,
    store: Store,
    index: Index,
    opts: Options,
    summ: Summary,
    prog: Progress,
    gone: set[tuple[int, int]],
    ahead: int,
) -> None:
    """7. Extents: the private inodes and those the hardlinks left (their metadata
    differ), grouped with the store's objects (the ones this run made too) by size and
    digest, share their blocks (unify/dedupe.py).  Only sizes held twice are read."""
    prog.phase("extents")
    objs = [o for group in store.scan().values() for o in group]
    obj_inos = {(store.dev, o.ino) for o in objs}
    cands = [
        r
        for r in (*sc.private.values(), *sc.inodes.values())
        if (r.dev, r.ino) not in obj_inos and (r.dev, r.ino) not in gone
    ]
    size_count = Counter(r.size for r in cands) + Counter(o.size for o in objs)
    cands = [r for r in cands if size_count[r.size] >= 2]
    to_hash = _from_index([r for r in cands if r.digest is None], index)
    rows = []
    for chunk, results in _hashed(to_hash, ahead):
        for rec, res in zip(chunk, results, strict=True):
            if isinstance(res, str):
                summ.errors += 1
                summ.messages.append(res)
                log.warning("%s", res)
            elif res is not None:
                rec.digest, rec.strong, rec.meta, rec.meta_any = res
                summ.files_hashed += 1
                summ.bytes_hashed += rec.size
                rows.append((rec.dev, rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns, *res))
    if rows and not opts.dry_run:
        index.store(rows)
    groups: dict[tuple[int, bytes], list[scan.InodeRec]] = {}
    for r in cands:
        if r.digest is not None:
            groups.setdefault((r.size, r.digest), []).append(r)
    by_digest: dict[tuple[int, bytes], list[StoreObject]] = {}
    for o in objs:
        by_digest.setdefault((o.size, o.key[0]), []).append(o)
    sharer = dedupe.Sharer(store, index, summ, opts.dry_run)
    for key, recs in groups.items():
        sharer.share(recs, by_digest.get(key, []))
    sharer.finish()


def _hash_and_link(
    pipe: _Pipeline, to_hash: list[scan.InodeRec], prog: Progress, ahead: int
) -> None:
    """4+5. Hash (the kernel reading ahead, see _hashed) and, as soon as every inode of
    one size has its digests, group that size and link it."""
    remaining = Counter(r.size for r in to_hash)
    for size in list(pipe.by_size):
        if not remaining[size]:
            pipe.size_ready(size)
    prog.phase("hash+link", len(to_hash), sum(r.size for r in to_hash))
    done_bytes = 0
    try:
        for chunk, results in _hashed(to_hash, ahead, pipe.keep):
            for rec, res in zip(chunk, results, strict=True):
                done_bytes += rec.size
                pipe.hashed(rec, res)
                remaining[rec.size] -= 1
                if not remaining[rec.size]:
                    pipe.size_ready(rec.size)
            prog.update(pipe.summ.files_hashed, done_bytes)
            pipe.flush()
        pipe.flush(force=True)
    finally:
        pipe.release()


def _read_ahead(opts: Options) -> int:
    """How many files ``_hashed`` holds open ahead: 32 per ``--jobs`` (default 8: 256
    reads the kernel may do at once), a quarter of the free descriptors at most."""
    return max(1, min(32 * max(1, opts.jobs), (apply.fds_free() - 32) // 4))


def _kept_max(ahead: int) -> int:
    """How many hashed files the linker may find still open (KEEP_FDS, a quarter of the
    descriptors left free by the read-ahead at most)."""
    return max(0, min(KEEP_FDS, (apply.fds_free() - ahead - 32) // 4))


def _hashed(
    recs: list[scan.InodeRec], ahead: int, keep: Keep | None = None
) -> Iterator[tuple[list[scan.InodeRec], list[Hashed | str | None]]]:
    """The inodes with their digests, in order, in chunks, read in this thread.  The next
    ``ahead`` files (AHEAD_BYTES at most) are opened beforehand and their data asked for
    (POSIX_FADV_WILLNEED: the kernel reads them in the background, many at once), so that
    reading from disk overlaps the hashing and linking here without threads: reader
    threads spent more CPU handing the interpreter's lock back and forth (one or two futex
    calls per system call, 60 per file) than reading small files.  ``keep`` may take a
    file's descriptor once it is hashed (see _Pipeline.keep)."""
    opened: deque[tuple[scan.InodeRec, int | str | None, int]] = deque()  # ..., bytes asked
    todo = iter(recs)
    asked = 0  # bytes asked for and not hashed yet: at most AHEAD_BYTES (and one file)

    def fill() -> None:
        nonlocal asked
        while len(opened) < ahead and asked < AHEAD_BYTES:
            rec = next(todo, None)
            if rec is None:
                return
            fd = _open_to_hash(rec)
            want = 0
            if isinstance(fd, int):
                want = min(rec.size, WILLNEED_MAX)
                try:
                    os.posix_fadvise(fd, 0, want, os.POSIX_FADV_WILLNEED)
                except OSError:
                    pass  # advice only: the read below still reads it
            asked += want
            opened.append((rec, fd, want))

    try:
        fill()
        while opened:
            chunk: list[scan.InodeRec] = []
            results: list[Hashed | str | None] = []
            while opened and len(chunk) < CHUNK_FILES:
                rec, fd, want = opened.popleft()
                asked -= want
                chunk.append(rec)
                results.append(_hash_open(rec, fd, keep) if isinstance(fd, int) else fd)
                fill()
            yield chunk, results
    finally:  # the run stopped early: what was opened ahead is closed
        for _, fd, _ in opened:
            if isinstance(fd, int):
                os.close(fd)


def _record(index: Index, linker: apply.Linker) -> None:
    """6. The index follows what the run did: objects' rows (their ctime moved), and no
    row for a guest inode that is no more."""
    index.store(linker.index_rows)
    for dev in {d for d, _ in linker.forget}:
        index.forget(dev, [i for d, i in linker.forget if d == dev])


class _Pipeline:
    """Groups one size class at a time, as soon as all its inodes are hashed, and hands
    the groups to the linker in chunks (see Linker.unify_all).  A file hashed is kept
    open for the linker (``keep``), up to ``keep_max`` at once: the linker then leases
    the inode that was read instead of opening its name again (four system calls less
    per file, the safe open being two opens).  What no plan takes is closed as soon as
    its size is grouped, what a plan left over after the linker ran."""

    FLUSH = 128

    def __init__(
        self,
        opts: Options,
        linker: apply.Linker,
        index: Index,
        objects: _Objects,
        by_size: dict[int, list[scan.InodeRec]],
        sc: scan.Scan,
        tick: Callable[[], None],
        keep_max: int = 0,
    ) -> None:
        self.opts, self.linker, self.index = opts, linker, index
        self.kept = linker.kept  # (dev, ino) -> the descriptor the hashing read it by
        self.keep_max = 0 if opts.dry_run else keep_max
        self.objects, self.by_size, self.sc = objects, by_size, sc
        self.summ = linker.stats  # the run's Summary
        self.tick = tick
        self.plans: list[tuple[Key, list[scan.InodeRec], list]] = []
        self.new_rows: list = []
        self.hashed_point_passed = False
        self.same = _interned()

    def hashed(self, rec: scan.InodeRec, res: Hashed | str | None) -> None:
        """One inode's digests (or why not): counted, and its index row kept for the next
        flush.  An object that changed since it was indexed lost its seal: resealed."""
        if isinstance(res, str):
            self.summ.errors += 1
            self.summ.messages.append(res)
            log.warning("%s", res)
            return
        if res is None:
            return
        rec.digest, rec.strong = res[0], res[1]
        rec.meta, rec.meta_any = self.same(res[2]), self.same(res[3])
        self.summ.files_hashed += 1
        self.summ.bytes_hashed += rec.size
        self.new_rows.append(
            (
                rec.dev,
                rec.ino,
                rec.size,
                rec.mtime_ns,
                rec.ctime_ns,
                rec.digest,
                rec.strong,
                rec.meta,
                rec.meta_any,
            )
        )
        obj = self.objects.by_ino.get(rec.ino) if rec.dev == self.linker.store.dev else None
        if obj is not None and not self.opts.dry_run:
            self.linker.reseal(obj, rec)

    def keep(self, rec: scan.InodeRec, fd: int) -> bool:
        """Take the descriptor of a file just hashed, if there is room (not a store
        object's: no plan links one)."""
        if len(self.kept) >= self.keep_max or (rec.dev, rec.ino) in self.objects.inos:
            return False
        self.kept[(rec.dev, rec.ino)] = fd
        return True

    def _drop(self, recs: list[scan.InodeRec]) -> None:
        """Close what is kept of ``recs``."""
        if self.kept:
            for rec in recs:
                fd = self.kept.pop((rec.dev, rec.ino), None)
                if fd is not None:
                    os.close(fd)

    def release(self) -> None:
        """Close everything still kept (the end of the pass, or an error)."""
        fds = list(self.kept.values())
        self.kept.clear()
        for fd in fds:
            os.close(fd)

    def size_ready(self, size: int) -> None:
        groups: dict[Key, list[scan.InodeRec]] = {}
        recs = self.by_size.pop(size, [])
        for rec in recs:
            meta = rec.meta_any if self.opts.ignore_mtime else rec.meta
            if rec.digest is not None and meta is not None:
                groups.setdefault((rec.digest, meta), []).append(rec)
        planned: set[int] = set()
        for key, members in groups.items():
            objs = self.objects.by_key.get(key, [])
            todo = [m for m in members if (m.dev, m.ino) not in self.objects.inos]
            if not todo or (not objs and len(todo) < 2):
                continue
            if self.opts.dry_run:
                _dry(todo, objs, self.linker.stats, self.linker.forget)
            else:
                self.plans.append((key, todo, objs))
                planned.update(id(m) for m in todo)
        self._drop([r for r in recs if id(r) not in planned])

    def flush(self, force: bool = False) -> None:
        if not self.plans or (not force and len(self.plans) < self.FLUSH):
            if force and not self.opts.dry_run and self.new_rows:
                self.index.store(self.new_rows)
                self.new_rows = []
            return
        if not self.hashed_point_passed:
            apply.point("hashed", inodes=self.sc.inodes)
            self.hashed_point_passed = True
        plans, self.plans = self.plans, []
        gone = len(self.linker.forget)
        try:
            self.linker.unify_all(plans, tick=self.tick)
        finally:
            for _, members, _ in plans:  # what the linker did not take (skipped, EMLINK)
                self._drop(members)
        # The rows of what was hashed, after the linking: not those of the inodes it
        # replaced (most of a first run's), which would only be written to be deleted.
        # A crash in between loses hashes only (the next run reads those files again).
        if self.new_rows and not self.opts.dry_run:
            replaced = set(self.linker.forget[gone:])
            rows = [r for r in self.new_rows if (r[0], r[1]) not in replaced]
            self.new_rows = []
            self.index.store(rows)


def _dry(
    todo: list[scan.InodeRec], objs: list, stats: Summary, gone: list[tuple[int, int]]
) -> None:
    """What a real run would do with this group, without touching anything; ``gone``
    hears the inodes it would replace (the extent phase leaves them out)."""
    if not objs:
        seeds = [m for m in todo if m.all_names_seen]
        if not seeds:
            return
        seed = max(seeds, key=lambda m: len(m.names))
        todo = [m for m in todo if m is not seed]
        stats.objects_created += 1
    for m in todo:
        stats.files_linked += len(m.names)
        if m.all_names_seen:
            stats.bytes_saved += m.size
            gone.append((m.dev, m.ino))
