"""vsunify's Python API: what ``vsunify run`` does, for its command line and for ``vserver``
(a clone, the re-unification after a package upgrade) alike, and the pieces the other
commands share (excludes, the lock, the index, the overlay check)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vsstore import pkgdb
from vsstore.clitools import raise_open_files_limit
from vsstore.config import Guest, Paths
from vsstore.errors import EXIT_OK, EXIT_PARTIAL, BusyError, ConfigError
from vsstore.excludes import ExcludeList, Rule, build_excludes
from vsstore.index import Index
from vsstore.lock import exclusive
from vsstore.names import shown
from vsstore.runtime import cow_served
from vsstore.safetree import GuestTree
from vsstore.store import Store

from . import engine
from .dedupe import Reflink
from .progress import Progress, human

log = logging.getLogger("vsstore")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """``vsunify run``'s options; the defaults are the command's."""

    min_size: int = 16
    ignore_mtime: bool = False
    immutable: bool = field(default_factory=lambda: os.geteuid() == 0)
    dry_run: bool = False
    jobs: int = 8
    exclude: tuple[str, ...] = ()  # --exclude rules
    default_excludes: bool = True
    pkgdb_excludes: bool = True
    store: Path | None = None  # default: the store below the guests' root
    reflink: Reflink = Reflink.AUTO  # --no-reflink: OFF, --reflink-only: ONLY
    max_inodes: int | None = engine.MAX_INODES  # --max-inodes (0: None, no bound)


@dataclass(slots=True)
class RunResult:
    summary: engine.Summary
    skipped: list[str]  # guests left out, and why

    @property
    def code(self) -> int:
        return EXIT_PARTIAL if self.summary.errors or self.skipped else EXIT_OK

    @property
    def line(self) -> str:
        """The run's one-line summary, as vsunify prints and logs it."""
        s = self.summary
        verb = "would link" if s.dry_run else "linked"
        shared = ""
        if s.reflink == "on":
            shared = (
                f", {s.files_deduped} {'would share' if s.dry_run else 'shared'} extents "
                f"({human(s.bytes_deduped)})"
            )
        return (
            f"vsunify: {s.guests} guests, {s.files_scanned} files scanned, "
            f"{s.files_hashed} hashed ({human(s.bytes_hashed)}), {s.files_linked} {verb}, "
            f"{human(s.bytes_saved)} {'to save' if s.dry_run else 'saved'}{shared}, "
            f"{s.errors} errors, {s.duration:.1f}s"
        )


def unify(
    paths: Paths,
    guests: list[Guest],
    opts: RunOptions | None = None,
    progress: Progress | None = None,
    skipped: list[str] | None = None,
    skip_served: bool = False,
    lock_wait: float = 0.0,
) -> RunResult:
    """Unify ``guests`` (a ``vsunify run``): guests a running overlay serves are refused
    (``skip_served``, as for ``--all``: left out with a warning, the run partial), those
    whose package manager holds its lock left out (said on stderr); one run at a time
    (the lock; ``lock_wait``: seconds to wait for it), the index, the store.  ``skipped``:
    guests the caller left out already (they make the result partial)."""
    opts = opts or RunOptions()
    raise_open_files_limit()
    if opts.min_size < 1:
        raise ConfigError("--min-size must be at least 1")
    served: list[str] = []
    if not opts.dry_run:
        if skip_served:
            guests, served = _skip_served(guests, paths)
        refuse_mounted(guests, paths)
    guests, busy = _skip_package_managers(guests)
    busy = served + busy
    for msg in busy:
        print(f"vsunify: warning: {msg}", file=sys.stderr)
    if busy and not guests:
        if not served:
            raise BusyError("every guest named has a package manager at work; try again later")
        return RunResult(engine.Summary(dry_run=opts.dry_run), (skipped or []) + busy)
    excl = {
        g.name: guest_excludes(g, paths, opts.exclude, opts.default_excludes, opts.pkgdb_excludes)
        for g in guests
    }
    eopts = engine.Options(
        min_size=opts.min_size,
        ignore_mtime=opts.ignore_mtime,
        immutable=opts.immutable,
        dry_run=opts.dry_run,
        jobs=opts.jobs,
        reflink=opts.reflink,
        max_inodes=opts.max_inodes,
    )
    with ExitStack() as stack:
        stack.enter_context(locked(paths, lock_wait))
        index = open_index(stack, paths)
        store = stack.enter_context(
            Store(
                opts.store or paths.default_store, create=not opts.dry_run, missing_ok=opts.dry_run
            )
        )
        s = engine.run(guests, excl, store, index, eopts, progress or Progress(False))
    return RunResult(s, (skipped or []) + busy)


def refuse_mounted(guests: list[Guest], paths: Paths) -> None:
    """Relinking under a running cow overlay would leave its view stale: refuse."""
    served = cow_served(paths)
    for g in guests:
        at = served.get(os.path.realpath(g.root))
        if at is not None:
            raise BusyError(
                f"guest '{shown(g.name)}' ({shown(g.root)}) is mounted through the "
                f"cow overlay at {shown(at)}; unify it while it is not (`vserver "
                f"{shown(g.name)} stop`, or `vscow umount {shown(at)}`), or leave "
                f"it out"
            )


def _skip_served(guests: list[Guest], paths: Paths) -> tuple[list[Guest], list[str]]:
    """Leave out the guests a running overlay serves (a cow guest that runs); returns the
    others and a message per guest left out."""
    served = cow_served(paths)
    keep, skipped = [], []
    for g in guests:
        at = served.get(os.path.realpath(g.root))
        if at is None:
            keep.append(g)
        else:
            skipped.append(
                f"guest '{shown(g.name)}' skipped: the cow overlay at {shown(at)} serves "
                f"it (it runs through the overlay); it is unified when it is not "
                f"(`vserver {shown(g.name)} stop`)"
            )
    return keep, skipped


def _skip_package_managers(guests: list[Guest]) -> tuple[list[Guest], list[str]]:
    """Leave out guests in which a package manager holds its lock now (their files are
    changing); returns the others and a message per guest left out."""
    from vsstore.pkgdb.locks import held

    keep, skipped = [], []
    for g in guests:
        with GuestTree(g.root, g.name) as t:
            locks = held(t)
        if locks:
            rel, pid = locks[0]
            skipped.append(
                f"guest '{shown(g.name)}' skipped: a package manager (pid {pid}) "
                f"holds /{shown(rel)}; it is unified on the next run"
            )
        else:
            keep.append(g)
    return keep, skipped


def guest_excludes(
    g: Guest, paths: Paths, cli: tuple[str, ...] = (), default: bool = True, from_pkgdb: bool = True
) -> ExcludeList:
    """The guest's exclude list: ``cli`` rules, its own file, the host's, its package
    databases' config files (``from_pkgdb``), the built-in list (``default``)."""
    provided: list[Rule] = []
    if from_pkgdb:
        with GuestTree(g.root, g.name) as tree:
            provided, warnings = pkgdb.config_rules(tree)
        for w in warnings:
            log.warning("%s", w)
    return build_excludes(
        cli=list(cli),
        guest_file=g.exclude_file,
        host_file=paths.host_exclude_file,
        provided=provided,
        use_default=default,
    )


@contextmanager
def locked(paths: Paths, wait: float = 0.0) -> Iterator[None]:
    """One vsunify run (or deunify, gc) at a time; ``wait``: how long to wait for another
    to finish (saying so once on stderr) before giving up with BusyError."""

    def waiting(holder: str) -> None:
        print(
            f"vsunify: waiting up to {wait:.0f} s for the vsunify lock (held by pid {holder})",
            file=sys.stderr,
        )

    with exclusive(paths.rundir / "vsunify.lock", "vsunify run", wait, waiting):
        yield


def open_index(stack: ExitStack, paths: Paths) -> Index:
    idx = Index(paths.index_file)
    stack.callback(idx.close)
    if idx.warning:
        print(f"vsunify: warning: {idx.warning}", file=sys.stderr)
    return idx
