"""vsunify: the command line over unify.engine, report and maintain.  No logic lives here."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from vsstore.clitools import common_options, require_root, run_cli
from vsstore.config import Guest, Paths, configured_guests, resolve_guest
from vsstore.errors import EXIT_OK, EXIT_PARTIAL, ConfigError, NotAGuestError
from vsstore.excludes import ExcludeList
from vsstore.names import shown
from vsstore.safetree import GuestTree
from vsstore.store import Store

from . import api, engine, htmlreport, maintain, prom, report
from .dedupe import Reflink
from .progress import Progress, human

log = logging.getLogger("vsstore")


def _guests(args: argparse.Namespace, paths: Paths) -> tuple[list[Guest], list[str]]:
    """The guests named (or --all), and a message for each configured guest --all left out
    because its root tree cannot be found (a dangling vdir): one broken guest must not stop
    the others.  A guest named explicitly that cannot be found is an error."""
    names = list(getattr(args, "guests", []) or [])
    if getattr(args, "all", False):
        broken: list[ConfigError] = []
        found = configured_guests(paths, broken)
        if not found and not broken:
            raise ConfigError(
                f"--all: no guests configured in {paths.confdir}; "
                f"name guests or set VSERVERS_CONFDIR"
            )
        left_out = [f"left out: {e.message}" for e in broken]
        if not found:
            raise ConfigError(
                "--all: no configured guest has its root tree: "
                + "; ".join(e.message for e in broken)
            )
        return found + [resolve_guest(n, paths) for n in names], left_out
    if not names:
        raise ConfigError("name at least one guest (a configured name or a path), or use --all")
    return [resolve_guest(n, paths) for n in names], []


def _store_path(args: argparse.Namespace, paths: Paths) -> Path:
    return Path(args.store) if args.store else paths.default_store


def _excludes(args: argparse.Namespace, g: Guest, paths: Paths) -> ExcludeList:
    return api.guest_excludes(
        g,
        paths,
        tuple(args.exclude or ()),
        not args.no_default_excludes,
        not args.no_pkgdb_excludes,
    )


def _refuse_foreign_paths(guests: list[Guest], paths: Paths) -> None:
    """A guest given as a path must be a configured guest's tree or lie under the guests'
    root: ``vsunify run /usr`` would seal the host's own files into the store."""
    base = paths.vservers_root.resolve()
    known = {g.root.resolve() for g in configured_guests(paths, [])}
    for g in guests:
        root = g.root.resolve()
        if root in known or (root != base and root.is_relative_to(base)):
            continue
        raise NotAGuestError(
            f"{shown(str(g.root))}: neither a configured guest's tree nor under the guests' "
            f"root {shown(str(base))}; vsunify would link (and seal immutable) the files there "
            f"as a guest's: name a guest, or add --force-path if this tree is one"
        )


def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    guests, left_out = _guests(args, paths)
    if not args.force_path:
        _refuse_foreign_paths(guests, paths)
    opts = api.RunOptions(
        min_size=args.min_size,
        ignore_mtime=args.ignore_mtime,
        immutable=not args.no_immutable and os.geteuid() == 0,
        dry_run=args.dry_run,
        jobs=args.jobs,
        exclude=tuple(args.exclude or ()),
        default_excludes=not args.no_default_excludes,
        pkgdb_excludes=not args.no_pkgdb_excludes,
        store=Path(args.store) if args.store else None,
        reflink=args.reflink,
        max_inodes=args.max_inodes or None,
    )
    for msg in left_out:
        print(f"vsunify: {msg}", file=sys.stderr)
    prog = Progress((args.progress or sys.stderr.isatty()) and not args.json and not args.quiet)
    r = api.unify(paths, guests, opts, prog, skipped=left_out, skip_served=args.all)
    if args.json:
        print(json.dumps(r.summary.as_dict(), indent=2))
    elif not args.quiet:
        print(r.line)
    _log_summary(args, r.line, r.code)
    if args.prom:
        prom.run_metrics(r.summary.as_dict(), time.time(), r.code).write(args.prom)
    return r.code


def _log_summary(args: argparse.Namespace, line: str, code: int) -> None:
    """The run's summary line for the operator's logs: a file and/or syslog (journal)."""
    text = f"{line} (exit {code})"
    if args.log:
        try:
            Path(args.log).parent.mkdir(parents=True, exist_ok=True)
            with open(args.log, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError as e:
            raise ConfigError(f"--log {args.log}: {e.strerror}; give a writable file") from None
    if args.syslog:
        import syslog

        syslog.openlog("vsunify", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING if code else syslog.LOG_INFO, text)
        syslog.closelog()


def cmd_report(args: argparse.Namespace, paths: Paths) -> int:
    guests, left_out = _guests(args, paths)
    for msg in left_out:
        print(f"vsunify: {msg}", file=sys.stderr)
    with ExitStack() as stack:
        sp = _store_path(args, paths)
        store = stack.enter_context(Store(sp, create=False)) if sp.is_dir() else None
        trees = [stack.enter_context(GuestTree(g.root, g.name)) for g in guests]
        rep = report.build(trees, store)
        index = api.open_index(stack, paths)
        if not args.no_record:
            index.record_snapshot(rep.snapshot())
        rep.history = report.History(index.runs(), index.snapshots())
    if args.memory:
        from vsstore.memory import measure_running

        rep.memory = measure_running(paths)
    if args.html:
        _write_text(args.html, htmlreport.render(rep), "--html")
    if args.prom:
        prom.report_metrics(rep).write(args.prom)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    elif not args.quiet:
        print(report.format_table(rep))
        if rep.memory is not None:
            print(report.format_memory(rep.memory))
    return EXIT_OK


def _write_text(path: str, text: str, option: str) -> None:
    """Write a file whole: a temporary name beside it, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"{option} {path}: {e.strerror}; give a writable file") from None


def cmd_deunify(args: argparse.Namespace, paths: Paths) -> int:
    g = resolve_guest(args.guest, paths)
    api.refuse_mounted([g], paths)
    with ExitStack() as stack:
        stack.enter_context(api.locked(paths))
        index = api.open_index(stack, paths)
        tree = stack.enter_context(GuestTree(g.root, g.name))
        prog = Progress((args.progress or sys.stderr.isatty()) and not args.json and not args.quiet)
        t = maintain.deunify(tree, args.paths, index, immutable=os.geteuid() == 0, progress=prog)
    if args.json:
        print(json.dumps({"files": t.files, "bytes": t.bytes, "errors": t.errors}))
    else:
        print(
            f"vsunify: {shown(g.name)}: {t.files} files made private ({human(t.bytes)}), "
            f"{t.errors} errors"
        )
    return EXIT_PARTIAL if t.errors else EXIT_OK


def cmd_gc(args: argparse.Namespace, paths: Paths) -> int:
    with ExitStack() as stack:
        stack.enter_context(api.locked(paths))
        store = stack.enter_context(Store(_store_path(args, paths), create=False))
        t = maintain.gc(store, immutable=os.geteuid() == 0, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"objects_removed": t.files, "bytes_freed": t.bytes, "errors": t.errors}))
    else:
        print(
            f"vsunify: gc: {t.files} unused objects {'would be ' if args.dry_run else ''}"
            f"removed ({human(t.bytes)}), {t.errors} errors"
        )
    return EXIT_PARTIAL if t.errors else EXIT_OK


def cmd_excludes(args: argparse.Namespace, paths: Paths) -> int:
    g = resolve_guest(args.guest, paths)
    ex = _excludes(args, g, paths)
    # Rules and reasons may come from a guest's package database: shown, never raw.
    rows = [(shown(r.text), shown(r.reason)) for r in ex.rules]
    if args.json:
        print(json.dumps([{"rule": t, "reason": why} for t, why in rows], indent=2))
    else:
        w = max((len(t) for t, _ in rows), default=4)
        for t, why in rows:
            print(f"{t.ljust(w)}  {why}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vsunify",
        description="Unify identical files across "
        "guests into a content-addressed store of shared, immutable "
        "inodes.",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[common_options()])
    common.add_argument(
        "--store",
        metavar="DIR",
        help="store directory (default: $VSERVERS_ROOT/.hash); must be on the guests' filesystem",
    )
    common.add_argument("--json", action="store_true", help="print one JSON object")
    exc = argparse.ArgumentParser(add_help=False)
    exc.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="exclude rule (repeatable; '+PATTERN' includes); see README",
    )
    exc.add_argument(
        "--no-default-excludes",
        action="store_true",
        help="drop the built-in list (/etc, /var, /home, ...)",
    )
    exc.add_argument(
        "--no-pkgdb-excludes",
        action="store_true",
        help="do not exclude the config files named by the guest's package "
        "database (dpkg conffiles, rpm %%config, apk, pacman backup)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", parents=[common, exc], help="unify guests")
    r.add_argument("guests", nargs="*", metavar="GUEST", help="guest name or root path")
    r.add_argument("--all", action="store_true", help="every configured guest")
    r.add_argument("--dry-run", "-n", action="store_true", help="change nothing; report")
    r.add_argument(
        "--force-path",
        action="store_true",
        help="accept a GUEST path that is neither a configured guest's tree nor under the "
        "guests' root (exit 12 without)",
    )
    r.add_argument(
        "--ignore-mtime",
        action="store_true",
        help="link files that differ only in mtime (they take the object's)",
    )
    r.add_argument(
        "--min-size",
        type=int,
        default=16,
        metavar="BYTES",
        help="leave smaller files alone (default 16)",
    )
    r.add_argument(
        "--no-immutable",
        action="store_true",
        help="do not set FS_IMMUTABLE_FL on shared inodes (marker only)",
    )
    rf = r.add_mutually_exclusive_group()
    rf.add_argument(
        "--no-reflink",
        action="store_const",
        dest="reflink",
        const=Reflink.OFF,
        default=Reflink.AUTO,
        help="share no extents, only hardlinks (default: where the filesystem can, "
        "XFS with reflink or btrfs, excluded files and duplicates whose metadata differ "
        "share their blocks)",
    )
    rf.add_argument(
        "--reflink-only",
        action="store_const",
        dest="reflink",
        const=Reflink.ONLY,
        help="share extents only, link nothing (exit 7 where the filesystem cannot)",
    )
    r.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=8,
        help="how far reading runs ahead of hashing: the data of 32 x N files is asked "
        "for at once (default 8)",
    )
    r.add_argument(
        "--max-inodes",
        type=int,
        metavar="N",
        default=engine.MAX_INODES,
        help="inodes one walk holds in memory, about 1 KiB each (default %(default)s; "
        "0: no bound); over more, the run goes on in passes by size range, read back "
        "from a temporary list of the walk's files beside the index",
    )
    r.add_argument(
        "--prom",
        metavar="FILE",
        help="write the run's figures in the "
        "Prometheus text format (node_exporter's textfile collector)",
    )
    r.add_argument("--log", metavar="FILE", help="append the summary line to FILE")
    r.add_argument(
        "--progress", action="store_true", help="a progress line also when not on a terminal"
    )
    r.add_argument(
        "--syslog",
        action="store_true",
        help="send the summary line to syslog (the journal on systemd hosts)",
    )
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser(
        "report",
        parents=[common],
        help="savings per guest and in total, the store, the most saving files, the trend",
        description="Savings per guest and in total, from the guest trees themselves.",
        epilog="columns (bytes; on-disk figures count files, directories and symlinks, "
        "each inode once, as du does):\n" + report.legend(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument("guests", nargs="*", metavar="GUEST")
    rp.add_argument("--all", action="store_true")
    rp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    rp.add_argument("--prom", metavar="FILE", help="also write the figures for Prometheus")
    rp.add_argument(
        "--memory",
        action="store_true",
        help="also measure the file-backed memory running guests share",
    )
    rp.add_argument(
        "--no-record", action="store_true", help="do not add this report to the history (the trend)"
    )
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("deunify", parents=[common], help="give a guest private copies again")
    d.add_argument("guest", metavar="GUEST")
    d.add_argument("paths", nargs="*", metavar="PATH", help="paths inside the guest")
    d.add_argument(
        "--progress", action="store_true", help="a progress line also when not on a terminal"
    )
    d.set_defaults(func=cmd_deunify)

    g = sub.add_parser("gc", parents=[common], help="remove store objects no guest links")
    g.add_argument("--dry-run", "-n", action="store_true")
    g.set_defaults(func=cmd_gc)

    e = sub.add_parser(
        "excludes",
        parents=[common, exc],
        help="the effective exclude list of a guest, with the reason for each rule",
    )
    e.add_argument("guest", metavar="GUEST")
    e.set_defaults(func=cmd_excludes)

    dm = sub.add_parser(
        "demo",
        parents=[common],
        help="build demo guests in a temporary directory, unify them and print the savings",
    )
    dm.add_argument("--dir", metavar="DIR", help="where (default: a new directory in /var/tmp)")
    dm.add_argument("--guests", type=int, default=4)
    dm.add_argument("--keep", action="store_true", help="keep the demo tree afterwards")
    dm.set_defaults(func=lambda a, paths: __import__("unify.demo", fromlist=["main"]).main(a))
    return p


def main(argv: list[str] | None = None) -> int:
    def run(a: argparse.Namespace, paths: Paths) -> int:
        if a.cmd in ("run", "report", "deunify", "gc", "demo"):
            require_root(
                f"vsunify {a.cmd}",
                "it reads and changes root's guest trees, the store and the index, sets "
                "immutable flags and takes the host's lock",
            )
        return int(a.func(a, paths))

    return run_cli("vsunify", parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
