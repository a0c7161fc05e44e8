"""Replace duplicates by links to store objects: every check the project promises, in order.

For one store object O and the guest files J that should become names of O:

1. Each J is opened without following symlinks, a read lease is taken on it (the kernel
   grants one only while nobody has J open for writing, and breaks it as soon as anyone tries
   to), and its stat is compared with what was hashed (dev, ino, size, mtime, ctime): so its
   content is still what was hashed.  Its BLAKE3 digest must equal O's (known from the index
   for a sealed O, whose content cannot change, else computed now).  A crafted xxh3
   collision or a change since hashing stops here.
2. The batch is written to the journal in the index; then, for each name of each J, O is
   linked to a temporary name ``.vsu~XXXXXXXXXXXXXXXX`` beside it and swapped with the name
   by ``renameat2(RENAME_EXCHANGE)``.  What the swap moved out must be J itself; if a guest
   replaced the name in the meantime, the swap is undone.  Nothing is ever unlinked that is
   not a verified duplicate of O: at every instant each guest name holds its own content.
3. If a J's lease was broken (someone opened J for writing meanwhile), J's names are swapped
   back, so the writer's data lands where it expects.
4. O is sealed (iunlink marker, immutable flag).  FS_IMMUTABLE_FL forbids link and rename, so
   O is unsealed for the batch inside a ``vsstore.window``: our read lease on O keeps any
   writer out (one arriving in the window is stopped and meets the seal when it goes on),
   and O's metadata is checked against what its name says (restored if a guest changed it
   meanwhile) before the index records it.  Only where a writer still got O open on a
   filesystem that lets it write despite the seal is the batch undone and O's other names
   moved to a fresh copy (``evacuate``).
5. The temporary names, which now hold the verified duplicates, are removed; the journal
   rows go.  A crash anywhere leaves rows that ``recover`` resolves on the next run.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import resource
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from vsstore import attrs, syscalls
from vsstore.errors import NOSPACE_ERRNOS, NoSpaceError
from vsstore.hashing import content_digests, meta_class, read_xattrs
from vsstore.index import Index, Row
from vsstore.names import shown
from vsstore.private import copy_file, tmp_name
from vsstore.safetree import GuestTree, split_rel
from vsstore.store import Key, Store, StoreObject
from vsstore.window import Meta, unsealed

from .scan import InodeRec

if TYPE_CHECKING:
    from .engine import Summary

log = logging.getLogger("vsstore")

_BAD_FLAGS = syscalls.FS_IMMUTABLE_FL | syscalls.FS_APPEND_FL

# Test seams: named points of the link protocol.  Tests register callables in HOOKS;
# VSSTORE_CRASH_AT=POINT[:N] kills this process with SIGKILL the N-th time (default 1st) it
# passes POINT, so the crash tests can stop a run inside every window.
HOOKS: dict[str, Callable[..., None]] = {}
_crash_at = os.environ.get("VSSTORE_CRASH_AT", "")
_crash_point, _, _n = _crash_at.partition(":")
_crash_left = int(_n or 1)


def point(name: str, **kw: object) -> None:
    global _crash_left
    if name == _crash_point:
        _crash_left -= 1
        if _crash_left <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
    hook = HOOKS.get(name)
    if hook is not None:
        hook(**kw)


WINDOW_NAMES = 256  # guest names linked in one window at most (each joiner holds an fd)
DIR_FDS = 512  # directory fds kept open between windows at most


def fds_free() -> int:
    """How many more files this process may open now: the soft RLIMIT_NOFILE less what is
    open."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft - len(os.listdir("/proc/self/fd"))


class Closer:
    """Closes finished fds in a background thread.  Closing our last fd on a replaced
    duplicate is where the kernel frees its blocks; done here, that work overlaps with the
    next batches instead of stalling them.  The fds go over ``BATCH`` at a time: one
    window's two or three each would wake the thread (and hand the interpreter's lock back
    and forth) once per window.  Bounded by the number of fds waiting (at most ``max_fds``,
    or one batch when a batch is larger), so they never pile up towards the process's
    open-file limit."""

    BATCH = 64

    def __init__(self, max_fds: int = 1024) -> None:
        self.q: queue.SimpleQueue[list[int] | None] = queue.SimpleQueue()
        self.max_fds = max_fds
        self.waiting = 0
        self.pending: list[int] = []  # not handed over yet
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="vsunify-closer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (fds := self.q.get()) is not None:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            with self.cv:
                self.waiting -= len(fds)
                self.cv.notify_all()

    def close_later(self, fds: list[int]) -> None:
        if not fds:
            return
        self.pending += fds
        if (
            len(self.pending) >= min(self.BATCH, self.max_fds)
            or self.waiting + len(self.pending) > self.max_fds  # (read unlocked: only falls)
        ):
            self._hand_over()

    def _hand_over(self) -> None:
        fds, self.pending = self.pending, []
        if not fds:
            return
        with self.cv:
            while self.waiting and self.waiting + len(fds) > self.max_fds:
                self.cv.wait()
            self.waiting += len(fds)
        self.q.put(fds)

    def finish(self) -> None:
        self._hand_over()
        self.q.put(None)
        self.thread.join()


class _Dirs:
    """Directory fds keyed by (guest, directory); ``trim`` closes the least recently used
    beyond ``limit``.  Only between windows: an fd handed out stays open (and keeps meaning
    the same directory, even if a guest renames it) until the window using it is over.
    Every swap is verified by inode anyway."""

    def __init__(self, limit: int = DIR_FDS) -> None:
        self.fds: dict[tuple[int, str], int] = {}
        self.limit = limit

    def get(self, tree: GuestTree, d: str) -> int:
        k = (id(tree), d)
        fd = self.fds.pop(k, None)
        if fd is None:
            fd = tree.open_beneath(d, os.O_RDONLY | os.O_DIRECTORY)
        self.fds[k] = fd  # most recently used last
        return fd

    def trim(self) -> None:
        while len(self.fds) > self.limit:
            os.close(self.fds.pop(next(iter(self.fds))))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _State(Enum):
    """Where one guest name of a window stands: NEW -> LINKED -> SWAPPED | REVERTED -> DONE
    (LINKED -> NEW when its joiner cannot go whole).  What the name and the temporary name
    beside it hold in each state is what the window has to finish or undo."""

    NEW = "new"  # nothing of ours beside the name: journaled, or our link taken back
    LINKED = "linked"  # the temporary name is a link to O; the name is the guest's own
    SWAPPED = "swapped"  # the name is O; the temporary name the verified duplicate J
    REVERTED = "reverted"  # swap refused or undone: the name is the guest's, temporary is O
    DONE = "done"  # the temporary name is gone


@dataclass(slots=True)
class _Name:
    rec: InodeRec
    tree: GuestTree
    rel: str
    dfd: int
    base: str
    tmp: str
    state: _State = _State.NEW


@dataclass(slots=True)
class _Window:
    """One object's window: O (its open fd; ``new``: seeded in this window), the joiners
    verified and held open, their names, and what became of them."""

    obj: StoreObject
    ofd: int
    new: bool
    ready: list[tuple[InodeRec, int]]
    names: list[_Name] = field(default_factory=list)
    overflow: list[InodeRec] = field(default_factory=list)  # EMLINK: for the next generation
    failed: set[int] = field(default_factory=set)  # joiners (inodes) that keep their own inode
    nospace: _Name | None = None  # where the filesystem filled up: the run stops after
    breached: bool = False  # a writer got O open: the batch was undone

    def shown(self) -> list[tuple[GuestTree, str]]:
        """The names, as the test seams get them."""
        return [(n.tree, n.rel) for n in self.names]


class Linker:
    """Applies link plans; one per run."""

    def __init__(
        self,
        store: Store,
        index: Index | None,
        *,
        immutable: bool,
        ignore_mtime: bool,
        stats: Summary,
        link_limit: int | None = None,
        fds: int | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.immutable = immutable
        self.ignore_mtime = ignore_mtime
        self.stats = stats  # the run's summary: what is linked, saved, skipped, failed
        self.link_limit = link_limit  # tests: pretend the filesystem's limit is this
        # Files this linker may hold open at once (default: what the open-file limit leaves
        # free now).  A window holds one fd per joiner plus its directories, the closer up
        # to a window's worth more, the directory cache the rest: a group of any size is
        # linked in windows that fit.
        room = max(fds if fds is not None else fds_free() - 32, 20)
        self.window = min(WINDOW_NAMES, room // 5)
        self.closer_fds = self.window
        self.dir_fds = min(DIR_FDS, room // 5)
        # The walk's records by inode (of a store object: one name, not all).
        self.known: dict[tuple[int, int], InodeRec] = {}
        # Files the hashing read, still open (engine._Pipeline.keep): taken, not reopened.
        self.kept: dict[tuple[int, int], int] = {}
        self.trees: list[GuestTree] = []  # the run's guests: a breach walks them (evacuate)
        self.closer: Closer | None = None  # set by unify_all
        self.dirs = _Dirs(self.dir_fds)
        # Journal planning of the current chunk (see unify_all).
        self._planned: dict[tuple[int, str], tuple[str, int]] = {}
        self._planned_objects: set[str] = set()
        self._extra_ids: list[int] = []
        self.index_rows: list[Row] = []
        self.forget: list[tuple[int, int]] = []

    # -- messages ------------------------------------------------------------------------

    def _error(self, msg: str) -> None:
        self.stats.errors += 1
        self.stats.messages.append(msg)
        log.warning("%s", msg)

    def _where(self, rec: InodeRec) -> str:
        tree, rel = rec.names[0]
        return tree.where(rel)

    # -- opening -------------------------------------------------------------------------

    def _open_verified(self, rec: InodeRec) -> int | None:
        """Open ``rec`` (the descriptor the hashing read it by, if kept, else by its first
        name), leased and unchanged since the walk, or None.  A kept descriptor is the
        inode that was hashed whatever its names became since; the fstat below (a rename
        or link moves the ctime too) and the swap's check of every name see the rest."""
        tree, rel = rec.names[0]
        fd = self.kept.pop((rec.dev, rec.ino), None)
        kept = fd is not None
        if fd is None:
            try:
                fd = tree.open_regular(rel, expect=(rec.dev, rec.ino))
            except (FileNotFoundError, NotADirectoryError):
                return None  # gone since the walk: nothing to do
            except OSError as e:
                if e.errno == errno.ESTALE:
                    self.stats.skipped_changed += 1
                self._error(f"{self._where(rec)}: skipped: {e.strerror}")
                return None
        ok = False
        try:
            if not syscalls.take_read_lease(fd):
                self.stats.skipped_busy += 1
                self._error(f"{self._where(rec)}: skipped: open for writing by another process")
                return None
            if not rec.same_stat(os.fstat(fd)):
                if kept:  # changed or gone since it was read: its name tells which
                    os.close(fd)
                    fd = -1
                    return self._open_verified(rec)
                self.stats.skipped_changed += 1
                self._error(f"{self._where(rec)}: skipped: changed since it was hashed")
                return None
            if syscalls.get_inode_flags(fd) & _BAD_FLAGS:
                if not attrs.has_marker(fd) or not rec.all_names_seen:
                    self._error(
                        f"{self._where(rec)}: skipped: immutable or append-only "
                        f"(flag set by someone else)"
                    )
                    return None
                # Our seal on an inode that lost its store link (crash between seal and
                # link, or gc); the inode is private, so the flag may go.
                attrs.set_immutable(fd, False)
                rec.ctime_ns = os.fstat(fd).st_ctime_ns
            ok = True
            return fd
        finally:
            if not ok and fd >= 0:
                os.close(fd)

    def _open_object(self, obj: StoreObject) -> int | None:
        """Open and lease an existing object, and check that it is what its name says."""
        try:
            fd = self.store.open_object(obj)
        except OSError as e:
            self._error(f"store object {obj.name}: cannot open: {e.strerror}")
            obj.full = True
            return None
        ok = False
        try:
            st = os.fstat(fd)
            if not syscalls.take_read_lease(fd):
                self._error(
                    f"store object {obj.name}: open for writing by another process; "
                    f"not linking to it this run"
                )
                obj.full = True
                return None
            xattrs = read_xattrs(fd)
            st = os.fstat(fd)  # after the xattrs: a change to them moves the ctime
            meta = meta_class(st, xattrs, self.ignore_mtime)
            if meta != obj.key[1]:
                self._error(
                    f"store object {obj.name}: its metadata no longer matches its name; "
                    f"not linking to it (`vsunify gc` removes it once unused)"
                )
                obj.full = True
                return None
            if not self._object_strong(obj, fd, st):
                # Content that no longer matches its name (an object left unsealed and
                # written to): not an object.  An unsealed one that still matches is used,
                # and sealed at the end of the window.
                self._error(
                    f"store object {obj.name}: its content does not match its name; "
                    f"removed from the store"
                )
                with unsealed(fd, self.immutable, what=f"store object {obj.name}"):
                    self.store.unlink(obj)
                obj.full = True
                return None
            obj.ino, obj.nlink = st.st_ino, st.st_nlink
            # What the window must leave on it: the metadata its name says it has.
            obj.expect = Meta.parts(st, xattrs, syscalls.get_inode_flags(fd))
            ok = True
            return fd
        finally:
            if not ok:
                os.close(fd)

    def _object_strong(self, obj: StoreObject, fd: int, st: os.stat_result) -> bool:
        """Make sure ``obj.strong`` holds the BLAKE3 digest of the object's content: from the
        run's records when the inode is unchanged since it was hashed, else by reading it
        (and checking it against the name).  False if the content does not match the name."""
        if obj.strong is not None:
            return True
        rec = self.known.get((st.st_dev, st.st_ino))
        if (
            rec is not None
            and rec.strong is not None
            and rec.digest == obj.key[0]
            and rec.size == st.st_size
            and rec.mtime_ns == st.st_mtime_ns
            and rec.ctime_ns == st.st_ctime_ns
        ):
            obj.strong = rec.strong
            return True
        digest, strong = content_digests(fd, st.st_size)
        if digest != obj.key[0]:
            return False
        obj.strong = strong
        return True

    def reseal(self, obj: StoreObject, rec: InodeRec) -> None:
        """An object whose inode changed since the last run (its flag was lifted by hand, or
        it was touched while unsealed): seal it again if its content still matches its name;
        otherwise say loudly that guests share changed content."""
        try:
            fd = self.store.open_object(obj)
        except OSError as e:
            self._error(f"store object {obj.name}: {e.strerror}")
            return
        try:
            if rec.digest != obj.key[0]:
                # The store's name must not lie: drop it (guests keep their names).
                with unsealed(fd, self.immutable, what=f"store object {obj.name}"):
                    self.store.unlink(obj)
                obj.full = True
                self._error(
                    f"store object {obj.name}: its content changed although guests "
                    f"share it; removed from the store; run `vsunify deunify` on the "
                    f"guests that link it"
                )
                return
            flags_ok = attrs.has_marker(fd) and (not self.immutable or attrs.is_immutable(fd))
            if not flags_ok:
                attrs.seal(fd, self.immutable)
                log.info("store object %s: sealed again", obj.name)
        finally:
            os.close(fd)

    # -- the batch -----------------------------------------------------------------------

    def unify_all(
        self,
        plans: list[tuple[Key, list[InodeRec], list[StoreObject]]],
        chunk: int = 128,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Unify many groups.  The journal rows of a chunk of groups are written in one
        transaction before any of them is touched, and removed in one after the chunk (two
        commits per chunk instead of two per object).  A row whose temporary name never
        appeared is simply dropped by recovery, so planning ahead costs nothing."""
        self.closer = Closer(self.closer_fds)
        try:
            for i in range(0, len(plans), chunk):
                part = plans[i : i + chunk]
                ids = self._plan(part)
                clean = True
                for key, members, objs in part:
                    try:
                        self._unify(key, members, objs)
                    except OSError as e:
                        clean = False  # leave this chunk's rows for recovery
                        if e.errno in NOSPACE_ERRNOS:  # no use going on: stop, as a crash would
                            raise self._no_space(self._where(members[0])) from None
                        self._error(
                            f"{self._where(members[0])}: group not linked: {e.strerror or e}"
                        )
                    if tick is not None:
                        tick()
                ids += self._extra_ids
                self._extra_ids = []
                self._planned.clear()
                self._planned_objects.clear()
                if clean and self.index is not None:
                    self.index.journal_done(ids)
        finally:
            self.dirs.close()
            self.closer.finish()
            self.closer = None

    def _no_space(self, where: str) -> NoSpaceError:
        """The guests' (and the store's) filesystem is full."""
        return NoSpaceError.on(
            self.store.path,
            f"linking {where}",
            "what is linked stays linked; the next run tidies up what "
            "this one left in flight and goes on",
        )

    def _plan(self, part: list[tuple[Key, list[InodeRec], list[StoreObject]]]) -> list[int]:
        """Journal what the chunk will most likely do: each group's object (the first with
        room, or the next generation seeded by the member with most names) and a temporary
        name for every member's every name."""
        rows: list[tuple[str, str, str, str, str, int, int]] = []
        for key, members, objs in part:
            obj = next((o for o in objs if not o.full), None)
            if obj is not None:
                name, oino = obj.name, obj.ino
            else:
                seeds = [m for m in members if m.all_names_seen]
                if not seeds:
                    continue
                oino = max(seeds, key=lambda m: len(m.names)).ino
                name = self.store.reserve(key, objs, oino).name
            prefix, base = name.split("/")
            rows.append(("object", str(self.store.path), prefix, base, "", oino, oino))
            self._planned_objects.add(name)
            for m in members:
                if m.ino == oino:
                    continue
                for tree, rel in m.names:
                    tmp = tmp_name()
                    self._planned[(id(tree), rel)] = (tmp, oino)
                    rows.append(
                        (
                            "join",
                            str(tree.root),
                            split_rel(rel)[0],
                            split_rel(rel)[1],
                            tmp,
                            m.ino,
                            oino,
                        )
                    )
        return self.index.journal_add(rows) if self.index is not None and rows else []

    def _unify(self, key: Key, members: list[InodeRec], objs: list[StoreObject]) -> None:
        """Make every member a name of one object of ``key`` (creating it if needed), a
        window of at most ``self.window`` names at a time, so that a group of any size needs
        a bounded number of open files."""
        pending = list(members)
        while pending:
            obj = next((o for o in objs if not o.full), None)
            seed = None
            if obj is None:
                seeds = [m for m in pending if m.all_names_seen]
                if not seeds:
                    return  # every inode also has names we did not scan: cannot seal one
                seed = max(seeds, key=lambda m: len(m.names))
                pending.remove(seed)
            n, names = 0, 0
            while n < len(pending) and (n == 0 or names + len(pending[n].names) <= self.window):
                names += len(pending[n].names)
                n += 1
            # What the window leaves (EMLINK: for the next generation) goes first again.
            pending = self._batch(key, obj, seed, pending[:n], objs) + pending[n:]

    def _batch(
        self,
        key: Key,
        obj: StoreObject | None,
        seed: InodeRec | None,
        joiners: list[InodeRec],
        objs: list[StoreObject],
    ) -> list[InodeRec]:
        """One object, one window.  Returns joiners left over (EMLINK)."""
        new = obj is None
        held: list[int] = []
        dirs = self.dirs
        try:
            if new:
                assert seed is not None
                ofd = self._open_verified(seed)
                if ofd is None:
                    return joiners
            else:
                assert obj is not None
                ofd = self._open_object(obj)
                if ofd is None:
                    return joiners
            held.append(ofd)
            o_strong = seed.strong if seed is not None else obj.strong if obj else None
            other = f"that of {self._where(seed)}" if seed else obj.name if obj else "the object"
            ready: list[tuple[InodeRec, int]] = []
            for j in joiners:
                jfd = self._open_verified(j)
                if jfd is None:
                    continue
                held.append(jfd)
                if j.strong is None or j.strong != o_strong:
                    self._error(
                        f"{self._where(j)}: not linked: content differs from "
                        f"{other} "
                        f"although the hashes match (hash collision?)"
                    )
                    continue
                ready.append((j, jfd))
            if not ready and not (new and objs):
                return []  # a new object is worth it alone only as the next generation
            if new:
                assert seed is not None
                expect = self._seed_meta(seed, ofd)
                if expect is None:
                    return joiners
                obj = self.store.reserve(key, objs, seed.ino)
                obj.strong = seed.strong
                obj.expect = expect
            assert obj is not None
            return self._window(obj, ofd, new, objs, ready, dirs)
        finally:
            if self.closer is not None:
                # The window is over: its leases go now, not when the closer gets to the
                # descriptors (a guest's writer of a joiner left unlinked waits for no batch).
                for fd in held:
                    syscalls.release_lease(fd)
                self.closer.close_later(held)
            else:
                for fd in held:
                    os.close(fd)
            dirs.trim()

    def _seed_meta(self, seed: InodeRec, fd: int) -> Meta | None:
        """The metadata a new object must keep: the seed's as it was hashed (its ctime has
        not moved since, so neither have its mode, owner or xattrs)."""
        xattrs = read_xattrs(fd)
        st = os.fstat(fd)  # after the xattrs: a change to them moves the ctime
        if not seed.same_stat(st):
            self.stats.skipped_changed += 1
            self._error(f"{self._where(seed)}: skipped: changed since it was hashed")
            return None
        return Meta.parts(st, xattrs, syscalls.get_inode_flags(fd))

    def _window(
        self,
        obj: StoreObject,
        ofd: int,
        new: bool,
        objs: list[StoreObject],
        ready: list[tuple[InodeRec, int]],
        dirs: _Dirs,
    ) -> list[InodeRec]:
        """One object's window over the verified joiners ``ready`` (steps 2 to 8 of the
        protocol).  Returns the joiners left for O's next generation (EMLINK)."""
        w = _Window(obj, ofd, new, ready)
        rows = self._names(w, dirs)
        point("verified", obj=obj, names=w.shown())
        if rows and self.index is not None:
            self._extra_ids += self.index.journal_add(rows)
        point("journaled")
        if new:
            self._link_seed(w, objs)
        self._link_unsealed(w)
        point("sealed", obj=obj)
        if w.breached:
            return []
        swapped = self._remove_duplicates(w)
        point("unlinked")
        self._account(w, swapped)
        if w.nospace is not None:
            raise self._no_space(w.nospace.tree.where(w.nospace.rel))
        return w.overflow

    def _names(self, w: _Window, dirs: _Dirs) -> list[tuple[str, str, str, str, str, int, int]]:
        """Every name of every joiner, with its directory's fd and its temporary name: the
        one the plan journaled, else a fresh one.  Returns the journal rows the plan did not
        foresee (another seed, another generation; a new object not planned)."""
        obj = w.obj
        rows: list[tuple[str, str, str, str, str, int, int]] = []
        if obj.name not in self._planned_objects:  # recovery seals (or drops) it
            prefix, base = obj.name.split("/")
            rows.append(("object", str(self.store.path), prefix, base, "", obj.ino, obj.ino))
        for j, _ in w.ready:
            for tree, rel in j.names:
                d, base = split_rel(rel)
                try:
                    dfd = dirs.get(tree, d)
                except OSError as e:
                    self._error(
                        f"{tree.where(rel)}: skipped: cannot open its directory: {e.strerror}"
                    )
                    continue
                planned = self._planned.get((id(tree), rel))
                if planned is not None and planned[1] == obj.ino:
                    tmp = planned[0]
                else:  # not what the plan foresaw (another seed, another generation)
                    tmp = tmp_name()
                    rows.append(("join", str(tree.root), d, base, tmp, j.ino, obj.ino))
                w.names.append(_Name(j, tree, rel, dfd, base, tmp))
        return rows

    def _link_seed(self, w: _Window, objs: list[StoreObject]) -> None:
        """A new object: the seed's verified inode gets its name in the store."""
        self.store.link(w.ofd, w.obj)
        objs.append(w.obj)
        self.stats.objects_created += 1

    def _link_unsealed(self, w: _Window) -> None:
        """Link and rename need O's seal off: the window keeps our lease on O (a writer is
        refused), puts back its verified metadata and seals it (marker, immutable).  Inside:
        O linked beside each name, each name swapped with its link, then joiners that broke
        put back as they were."""

        def on_writer(fd: int) -> None:  # a writer got through on a lax filesystem
            w.breached = True
            self._breach(w.obj, fd, w.new, w.names)

        with unsealed(
            w.ofd,
            self.immutable,
            what=f"store object {w.obj.name}",
            seal=True,
            expect=w.obj.expect,
            on_writer=on_writer,
        ):
            self._link_names(w)
            point("linked", obj=w.obj, names=w.shown())
            self._swap_names(w)
            point("swapped", obj=w.obj, names=w.shown())
            self._revert_broken(w)

    def _link_names(self, w: _Window) -> None:
        """Link O beside each name.  EMLINK: this joiner and all after it wait for the next
        generation of the object.  ENOSPC: no name after it is linked; the window finishes
        what it linked (which frees the duplicates' space), then the run stops: the name
        where space ran out is kept in ``w.nospace``."""
        odir, obase = self.store.dir_and_name(w.obj)
        nlink = w.obj.nlink
        for n in w.names:
            if w.nospace is not None:
                w.failed.add(n.rec.ino)
                continue
            if n.rec.ino in w.failed or w.overflow:
                if w.overflow and n.rec not in w.overflow:
                    w.overflow.append(n.rec)
                continue
            try:
                if self.link_limit is not None and nlink >= self.link_limit:
                    raise OSError(errno.EMLINK, os.strerror(errno.EMLINK))
                os.link(obase, n.tmp, src_dir_fd=odir, dst_dir_fd=n.dfd, follow_symlinks=False)
                nlink += 1
                n.state = _State.LINKED
            except OSError as e:
                if e.errno == errno.EMLINK:
                    w.obj.full = True
                    w.overflow.append(n.rec)
                elif e.errno in NOSPACE_ERRNOS:
                    w.nospace = n
                    w.failed.add(n.rec.ino)
                else:
                    self._error(f"{n.tree.where(n.rel)}: not linked: {e.strerror}")
                    w.failed.add(n.rec.ino)

    def _swap_names(self, w: _Window) -> None:
        """Swap each linked name with its link to O and check that what came out is the
        joiner, else swap back.  A joiner goes whole or not at all: the links of one that
        cannot are taken back first."""
        over = {r.ino for r in w.overflow}
        for n in w.names:
            if n.state is _State.LINKED and (n.rec.ino in over or n.rec.ino in w.failed):
                os.unlink(n.tmp, dir_fd=n.dfd)
                n.state = _State.NEW
        for n in w.names:
            if n.state is not _State.LINKED:
                continue
            try:
                syscalls.renameat2(n.dfd, n.tmp, n.dfd, n.base, syscalls.RENAME_EXCHANGE)
            except OSError as e:
                self._error(f"{n.tree.where(n.rel)}: not linked: {e.strerror}")
                n.state = _State.REVERTED
                w.failed.add(n.rec.ino)
                continue
            out = os.stat(n.tmp, dir_fd=n.dfd, follow_symlinks=False)
            if out.st_ino != n.rec.ino or out.st_dev != n.rec.dev:
                syscalls.renameat2(n.dfd, n.tmp, n.dfd, n.base, syscalls.RENAME_EXCHANGE)
                self._error(
                    f"{n.tree.where(n.rel)}: not linked: replaced by another "
                    f"file while we linked it"
                )
                n.state = _State.REVERTED
                w.failed.add(n.rec.ino)
            else:
                n.state = _State.SWAPPED

    def _revert_broken(self, w: _Window) -> None:
        """A joiner someone opened for writing meanwhile (its lease broke) keeps its own
        inode: its names are swapped back.  Then every link to O that is no guest's name
        (swapped back, or never swapped) goes."""
        for j, jfd in w.ready:
            if not syscalls.lease_held(jfd):
                self.stats.skipped_busy += 1
                self._error(
                    f"{self._where(j)}: not linked: opened for writing while we "
                    f"linked it; left as it was"
                )
                w.failed.add(j.ino)
        for n in w.names:
            if n.state is _State.SWAPPED and n.rec.ino in w.failed:
                syscalls.renameat2(n.dfd, n.tmp, n.dfd, n.base, syscalls.RENAME_EXCHANGE)
                n.state = _State.REVERTED
            if n.state in (_State.REVERTED, _State.LINKED):
                os.unlink(n.tmp, dir_fd=n.dfd)  # an O link
                n.state = _State.DONE

    def _remove_duplicates(self, w: _Window) -> dict[int, int]:
        """Remove the verified duplicates that the swaps moved to the temporary names.
        Returns how many names each joiner (by inode) gave to O."""
        swapped: dict[int, int] = {}
        for n in w.names:
            if n.state is _State.SWAPPED:
                os.unlink(n.tmp, dir_fd=n.dfd)
                n.state = _State.DONE
                swapped[n.rec.ino] = swapped.get(n.rec.ino, 0) + 1
        return swapped

    def _account(self, w: _Window, swapped: dict[int, int]) -> None:
        """Count what the window linked and saved; a joiner that gave O all its names is
        gone (its index row with it); O's index row follows its new ctime."""
        for j, _ in w.ready:
            done = swapped.get(j.ino, 0)
            self.stats.files_linked += done
            if done and done == j.nlink and j.ino not in w.failed:
                self.stats.bytes_saved += j.size
                self.forget.append((j.dev, j.ino))
        st = os.fstat(w.ofd)
        w.obj.nlink = st.st_nlink
        rec = self.known.get((st.st_dev, st.st_ino))
        if (
            w.obj.strong is not None
            and rec is not None
            and rec.meta is not None
            and rec.meta_any is not None
        ):
            # Linking and sealing changed the ctime, not the metadata class.
            self.index_rows.append(
                (
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime_ns,
                    st.st_ctime_ns,
                    w.obj.key[0],
                    w.obj.strong,
                    rec.meta,
                    rec.meta_any,
                )
            )

    def _breach(self, obj: StoreObject, ofd: int, new: bool, names: list[_Name]) -> None:
        """A writer got O open for writing during its window, on a filesystem that lets it
        write despite the seal (the window keeps every other writer out).  Undo the batch,
        and give O's other names a fresh copy, so that whatever the writer writes reaches
        only what it already owned.  The seal is lifted without a lease here: a lease is
        impossible while the writer holds O, and it can write anyway."""
        self._error(
            f"store object {obj.name}: opened for writing while it was being linked; batch undone"
        )
        attrs.set_immutable(ofd, False)
        for n in names:
            if n.state is _State.SWAPPED:
                syscalls.renameat2(n.dfd, n.tmp, n.dfd, n.base, syscalls.RENAME_EXCHANGE)
                os.unlink(n.tmp, dir_fd=n.dfd)
                n.state = _State.DONE
        if new:
            self.store.unlink(obj)
            attrs.clear_marker(ofd)
            obj.full = True
            return
        try:
            self.evacuate(obj, ofd)
        except OSError:
            # No fresh copy (a full disk): sealed again, the writer's fd cannot write either.
            attrs.seal(ofd, self.immutable)
            raise

    def names_of(self, st: os.stat_result) -> list[tuple[GuestTree, str]]:
        """Every name of inode ``st`` in the run's guests, by a walk of them all (the run
        keeps one name per store object, not all: a breach is rare, a million names are
        not).  Entries are matched by their directory entry's inode number, no stat."""
        return [
            (tree, prefix + e.name)
            for tree in self.trees
            if tree.dev == st.st_dev
            for prefix, entries in tree.listings()
            for e in entries
            if e.inode() == st.st_ino
        ]

    def evacuate(self, obj: StoreObject, ofd: int) -> None:
        """Move every name of ``obj`` in the run's guests (and the store's) to a fresh
        sealed copy.  Called with ``obj`` unsealed.  The old inode keeps only names outside
        the run's guests, and the pending writer's open file."""
        odir, obase = self.store.dir_and_name(obj)
        st = os.fstat(ofd)
        tmp = tmp_name()
        cfd = copy_file(ofd, odir, tmp)
        moved = 0
        dirs = _Dirs(self.dir_fds)
        try:
            for tree, rel in self.names_of(st):
                d, base = split_rel(rel)
                t = tmp_name()
                try:
                    dfd = dirs.get(tree, d)
                    os.link(tmp, t, src_dir_fd=odir, dst_dir_fd=dfd, follow_symlinks=False)
                    syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    if os.stat(t, dir_fd=dfd, follow_symlinks=False).st_ino != st.st_ino:
                        syscalls.renameat2(dfd, t, dfd, base, syscalls.RENAME_EXCHANGE)
                    else:
                        moved += 1
                    os.unlink(t, dir_fd=dfd)
                    dirs.trim()
                except OSError as e:
                    log.warning(
                        "%s: could not move to a fresh copy: %s", tree.where(rel), e.strerror
                    )
            os.rename(tmp, obase, src_dir_fd=odir, dst_dir_fd=odir)
            attrs.seal(cfd, self.immutable)
            attrs.seal(ofd, self.immutable)
        finally:
            dirs.close()
            os.close(cfd)
        obj.full = True
        remaining = os.fstat(ofd).st_nlink
        self._error(
            f"store object {obj.name}: moved {moved} guest names to a fresh copy; "
            f"{remaining} other names still share the old inode"
            + (
                ": run `vsunify run --all` then `vsunify deunify` on those guests"
                if remaining
                else ""
            )
        )


def recover(index: Index, store: Store, immutable: bool) -> list[str]:
    """Resolve journal rows a crashed run left behind.  Never removes a name unless the
    content it held is still at the guest's own name (or was only our extra link); then
    seal every object that was in flight, or drop it from the store if it no longer holds
    what its name says."""
    notes: list[str] = []
    rows = index.journal()
    for row in rows:
        if row.kind == "object":
            continue
        where = shown(os.path.join(row.root, row.dir, row.name))
        try:
            tree = GuestTree(row.root)
        except Exception:
            index.journal_done([row.id])  # the guest is gone, and its names with it
            continue
        try:
            dfd = tree.open_beneath(row.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            tree.close()
            index.journal_done([row.id])
            continue
        try:
            try:
                t = os.stat(row.tmp, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                index.journal_done([row.id])
                continue
            try:
                n_ino = os.stat(row.name, dir_fd=dfd, follow_symlinks=False).st_ino
            except FileNotFoundError:
                n_ino = -1
            tfd = os.open(row.tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                if row.kind == "join":
                    copy_ino = None  # the name's original
                    keep_ino = row.orig_ino
                else:  # deunify: orig_ino is the private copy
                    copy_ino = row.orig_ino
                    keep_ino = row.orig_ino
                if t.st_ino == row.obj_ino:
                    # Only our extra link to the object: the name is whatever it is.
                    with unsealed(tfd, immutable, what=where):
                        os.unlink(row.tmp, dir_fd=dfd)
                elif row.kind == "join" and t.st_ino == keep_ino and n_ino == row.obj_ino:
                    os.unlink(row.tmp, dir_fd=dfd)  # swapped: a verified duplicate of O
                elif row.kind == "deunify" and t.st_ino == copy_ino:
                    os.unlink(row.tmp, dir_fd=dfd)  # copy made, never swapped in
                elif n_ino == row.obj_ino or (row.kind == "deunify" and n_ino == copy_ino):
                    # A guest's own file was swapped out in the last instant: swap it back.
                    ofd = os.open(row.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                    try:
                        with unsealed(ofd, immutable, what=where):
                            syscalls.renameat2(
                                dfd, row.tmp, dfd, row.name, syscalls.RENAME_EXCHANGE
                            )
                            os.unlink(row.tmp, dir_fd=dfd)
                    finally:
                        os.close(ofd)
                else:
                    notes.append(
                        f"{where}: left the temporary name {row.tmp} beside it: "
                        f"its content may differ; compare and remove it by hand"
                    )
                    log.warning("%s", notes[-1])
            finally:
                os.close(tfd)
            index.journal_done([row.id])
        except OSError as e:
            notes.append(f"{where}: could not tidy {row.tmp}: {e.strerror}")
            log.warning("%s", notes[-1])
        finally:
            os.close(dfd)
            tree.close()
    for row in rows:
        if row.kind == "object":
            _recover_object(store, row.dir + "/" + row.name, immutable, notes)
            index.journal_done([row.id])
    return notes


def _recover_object(store: Store, name: str, immutable: bool, notes: list[str]) -> None:
    key = Store.parse_name(name)
    prefix, base = name.split("/")
    try:
        fd = os.open(
            base,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=store.subdir(prefix),
        )
    except OSError:
        return  # never linked, or gone
    try:
        if attrs.has_marker(fd) and (not immutable or attrs.is_immutable(fd)):
            return
        st = os.fstat(fd)
        xattrs = read_xattrs(fd)
        ok = (
            key is not None
            and content_digests(fd, st.st_size)[0] == key[0]
            and key[1] in (meta_class(st, xattrs, False), meta_class(st, xattrs, True))
        )
        if ok and syscalls.take_read_lease(fd):
            attrs.seal(fd, immutable)
            if syscalls.lease_held(fd):
                return
            attrs.set_immutable(fd, False)
        with unsealed(fd, immutable, what=f"store object {name}"):
            os.unlink(base, dir_fd=store.subdir(prefix))
        notes.append(
            f"store object {name}: interrupted before it was sealed and no longer "
            f"matches its name (or is in use for writing); removed from the store"
        )
        log.warning("%s", notes[-1])
    finally:
        os.close(fd)
