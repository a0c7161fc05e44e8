"""vsunify: the command line over unify.engine, report and maintain.  No logic lives here."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vsstore import pkgdb
from vsstore.clitools import raise_open_files_limit, run_cli
from vsstore.config import Guest, Paths, configured_guests, resolve_guest
from vsstore.errors import EXIT_OK, EXIT_PARTIAL, BusyError, ConfigError
from vsstore.excludes import ExcludeList, build_excludes
from vsstore.index import Index
from vsstore.lock import exclusive
from vsstore.names import shown
from vsstore.runtime import cow_served
from vsstore.safetree import GuestTree
from vsstore.store import Store

from . import engine, htmlreport, maintain, prom, report
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
            raise ConfigError(f"--all: no guests configured in {paths.confdir}; "
                              f"name guests or set VSERVERS_CONFDIR")
        left_out = [f"left out: {e.message}" for e in broken]
        if not found:
            raise ConfigError("--all: no configured guest has its root tree: "
                              + "; ".join(e.message for e in broken))
        return found + [resolve_guest(n, paths) for n in names], left_out
    if not names:
        raise ConfigError("name at least one guest (a configured name or a path), or use --all")
    return [resolve_guest(n, paths) for n in names], []


def _refuse_mounted(guests: list[Guest], paths: Paths) -> None:
    """Relinking under a running cow overlay would leave its view stale: refuse."""
    served = cow_served(paths)
    for g in guests:
        at = served.get(os.path.realpath(g.root))
        if at is not None:
            raise BusyError(f"guest '{shown(g.name)}' ({shown(g.root)}) is mounted through the "
                            f"cow overlay at {shown(at)}; unify it while it is not (`vserver "
                            f"{shown(g.name)} stop`, or `vscow umount {shown(at)}`), or leave "
                            f"it out")


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
            skipped.append(f"guest '{shown(g.name)}' skipped: a package manager (pid {pid}) "
                           f"holds /{shown(rel)}; it is unified on the next run")
        else:
            keep.append(g)
    return keep, skipped


def _store_path(args: argparse.Namespace, paths: Paths) -> Path:
    return Path(args.store) if args.store else paths.default_store


def _excludes(args: argparse.Namespace, g: Guest, paths: Paths) -> ExcludeList:
    provided = []
    if not args.no_pkgdb_excludes:
        with GuestTree(g.root, g.name) as tree:
            provided, warnings = pkgdb.config_rules(tree)
        for w in warnings:
            log.warning("%s", w)
    return build_excludes(cli=args.exclude or [], guest_file=g.exclude_file,
                          host_file=paths.host_exclude_file, provided=provided,
                          use_default=not args.no_default_excludes)


@contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    with exclusive(paths.rundir / "vsunify.lock", "vsunify run"):
        yield


def _index(stack: ExitStack, paths: Paths) -> Index:
    idx = Index(paths.index_file)
    stack.callback(idx.close)
    if idx.warning:
        print(f"vsunify: warning: {idx.warning}", file=sys.stderr)
    return idx


def cmd_run(args: argparse.Namespace) -> int:
    raise_open_files_limit()
    paths = Paths.from_env()
    if args.min_size < 1:
        raise ConfigError("--min-size must be at least 1")
    guests, left_out = _guests(args, paths)
    if not args.dry_run:
        _refuse_mounted(guests, paths)
    guests, skipped = _skip_package_managers(guests)
    skipped = left_out + skipped
    for msg in skipped:
        print(f"vsunify: {msg}", file=sys.stderr)
    if skipped and not guests:
        raise BusyError("every guest named has a package manager at work; try again later")
    excl = {g.name: _excludes(args, g, paths) for g in guests}
    opts = engine.Options(min_size=args.min_size, ignore_mtime=args.ignore_mtime,
                          immutable=not args.no_immutable and os.geteuid() == 0,
                          dry_run=args.dry_run, jobs=args.jobs)
    with ExitStack() as stack:
        stack.enter_context(_locked(paths))
        index = _index(stack, paths)
        store = stack.enter_context(Store(_store_path(args, paths), create=not args.dry_run,
                                          missing_ok=args.dry_run))
        prog = Progress(sys.stderr.isatty() and not args.json and not args.quiet)
        s = engine.run(guests, excl, store, index, opts, prog)
    verb = "would link" if s.dry_run else "linked"
    line = (f"vsunify: {s.guests} guests, {s.files_scanned} files scanned, {s.files_hashed} "
            f"hashed ({human(s.bytes_hashed)}), {s.files_linked} {verb}, "
            f"{human(s.bytes_saved)} {'to save' if s.dry_run else 'saved'}, "
            f"{s.errors} errors, {s.duration:.1f}s")
    code = EXIT_PARTIAL if s.errors or skipped else EXIT_OK
    if args.json:
        print(json.dumps(s.as_dict(), indent=2))
    elif not args.quiet:
        print(line)
    _log_summary(args, line, code)
    if args.prom:
        prom.run_metrics(s.as_dict(), time.time(), code).write(args.prom)
    return code


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


def cmd_report(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    guests, left_out = _guests(args, paths)
    for msg in left_out:
        print(f"vsunify: {msg}", file=sys.stderr)
    with ExitStack() as stack:
        sp = _store_path(args, paths)
        store = stack.enter_context(Store(sp, create=False)) if sp.is_dir() else None
        trees = [stack.enter_context(GuestTree(g.root, g.name)) for g in guests]
        rep = report.build(trees, store)
        index = _index(stack, paths)
        if not args.no_record:
            d = rep.as_dict()
            index.record_snapshot(rep.taken, d["total"],  # type: ignore[arg-type]
                                  {n: (g.disk_bytes, g.saved_bytes) for n, g in rep.guests.items()})
        rep.history = {"runs": index.runs(), "snapshots": index.snapshots()}
    if args.memory:
        from vsstore.memory import measure_running
        rep.memory = measure_running(paths)
    d = rep.as_dict()
    if args.html:
        _write_text(args.html, htmlreport.render(d), "--html")
    if args.prom:
        prom.report_metrics(d).write(args.prom)
    if args.json:
        print(json.dumps(d, indent=2))
    elif not args.quiet:
        print(report.format_table(rep))
        if rep.memory:
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


def cmd_deunify(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    g = resolve_guest(args.guest, paths)
    _refuse_mounted([g], paths)
    with ExitStack() as stack:
        stack.enter_context(_locked(paths))
        index = _index(stack, paths)
        tree = stack.enter_context(GuestTree(g.root, g.name))
        t = maintain.deunify(tree, args.paths, index, immutable=os.geteuid() == 0)
    if args.json:
        print(json.dumps({"files": t.files, "bytes": t.bytes, "errors": t.errors}))
    else:
        print(f"vsunify: {shown(g.name)}: {t.files} files made private ({human(t.bytes)}), "
              f"{t.errors} errors")
    return EXIT_PARTIAL if t.errors else EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    with ExitStack() as stack:
        stack.enter_context(_locked(paths))
        store = stack.enter_context(Store(_store_path(args, paths), create=False))
        t = maintain.gc(store, immutable=os.geteuid() == 0, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"objects_removed": t.files, "bytes_freed": t.bytes,
                          "errors": t.errors}))
    else:
        print(f"vsunify: gc: {t.files} unused objects {'would be ' if args.dry_run else ''}"
              f"removed ({human(t.bytes)}), {t.errors} errors")
    return EXIT_PARTIAL if t.errors else EXIT_OK


def cmd_excludes(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
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
    p = argparse.ArgumentParser(prog="vsunify", description="Unify identical files across "
                                "guests into a content-addressed store of shared, immutable "
                                "inodes.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", metavar="DIR", help="store directory (default: "
                        "$VSERVERS_ROOT/.hash); must be on the guests' filesystem")
    common.add_argument("--json", action="store_true", help="print one JSON object")
    common.add_argument("--debug", action="store_true", help="tracebacks on errors")
    common.add_argument("-v", "--verbose", action="store_true")
    common.add_argument("-q", "--quiet", action="store_true", help="no summary, errors only")
    exc = argparse.ArgumentParser(add_help=False)
    exc.add_argument("--exclude", action="append", metavar="PATTERN",
                     help="exclude rule (repeatable; '+PATTERN' includes); see README")
    exc.add_argument("--no-default-excludes", action="store_true",
                     help="drop the built-in list (/etc, /var, /home, ...)")
    exc.add_argument("--no-pkgdb-excludes", action="store_true",
                     help="do not exclude the config files named by the guest's package "
                     "database (dpkg conffiles, rpm %%config, apk, pacman backup)")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", parents=[common, exc], help="unify guests")
    r.add_argument("guests", nargs="*", metavar="GUEST", help="guest name or root path")
    r.add_argument("--all", action="store_true", help="every configured guest")
    r.add_argument("--dry-run", "-n", action="store_true", help="change nothing; report")
    r.add_argument("--ignore-mtime", action="store_true",
                   help="link files that differ only in mtime (they take the object's)")
    r.add_argument("--min-size", type=int, default=16, metavar="BYTES",
                   help="leave smaller files alone (default 16)")
    r.add_argument("--no-immutable", action="store_true",
                   help="do not set FS_IMMUTABLE_FL on shared inodes (marker only)")
    r.add_argument("--jobs", "-j", type=int, default=8,
                   help="reading/hashing threads (default 8: more reads in flight)")
    r.add_argument("--prom", metavar="FILE", help="write the run's figures in the "
                   "Prometheus text format (node_exporter's textfile collector)")
    r.add_argument("--log", metavar="FILE", help="append the summary line to FILE")
    r.add_argument("--syslog", action="store_true", help="send the summary line to syslog "
                   "(the journal on systemd hosts)")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", parents=[common], help="savings per guest and in total, "
                        "the store, the most saving files, the trend")
    rp.add_argument("guests", nargs="*", metavar="GUEST")
    rp.add_argument("--all", action="store_true")
    rp.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    rp.add_argument("--prom", metavar="FILE", help="also write the figures for Prometheus")
    rp.add_argument("--memory", action="store_true", help="also measure the file-backed "
                    "memory running guests share")
    rp.add_argument("--no-record", action="store_true", help="do not add this report to the "
                    "history (the trend)")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("deunify", parents=[common], help="give a guest private copies again")
    d.add_argument("guest", metavar="GUEST")
    d.add_argument("paths", nargs="*", metavar="PATH", help="paths inside the guest")
    d.set_defaults(func=cmd_deunify)

    g = sub.add_parser("gc", parents=[common], help="remove store objects no guest links")
    g.add_argument("--dry-run", "-n", action="store_true")
    g.set_defaults(func=cmd_gc)

    e = sub.add_parser("excludes", parents=[common, exc], help="the effective exclude list "
                       "of a guest, with the reason for each rule")
    e.add_argument("guest", metavar="GUEST")
    e.set_defaults(func=cmd_excludes)

    dm = sub.add_parser("demo", parents=[common], help="build demo guests in a temporary "
                        "directory, unify them and print the savings")
    dm.add_argument("--dir", metavar="DIR", help="where (default: a new directory in /var/tmp)")
    dm.add_argument("--guests", type=int, default=4)
    dm.add_argument("--keep", action="store_true", help="keep the demo tree afterwards")
    dm.set_defaults(func=lambda a: __import__("unify.demo", fromlist=["main"]).main(a))
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli("vsunify", parser(), lambda a: a.func(a), argv)


if __name__ == "__main__":
    sys.exit(main())
