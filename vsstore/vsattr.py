"""vsattr: show and set the iunlink marker and the immutable flag (util-vserver's
setattr/showattr).  Paths are host paths; symlinks are never followed."""

from __future__ import annotations

import argparse
import os
import stat
import sys

from . import attrs
from .clitools import common_options, require_root, run_cli
from .errors import EXIT_OK, EXIT_PARTIAL, ConfigError
from .names import shown
from .window import unsealed


def _open(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 40:  # ELOOP
            raise ConfigError(f"{path}: is a symlink; vsattr never follows symlinks") from None
        raise ConfigError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode) and not stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: not a regular file or directory")
    return fd


def _cmd(args: argparse.Namespace) -> int:
    rc = EXIT_OK
    if args.cmd in ("set", "clear") and not (args.iunlink or args.immutable):
        args.iunlink = args.immutable = True
    if args.cmd in ("set", "clear") and args.immutable:
        require_root(
            f"vsattr {args.cmd} --immutable", "the immutable flag needs CAP_LINUX_IMMUTABLE"
        )
    for path in args.paths:
        try:
            fd = _open(path)
        except ConfigError as e:
            print(f"vsattr: {e.message}", file=sys.stderr)
            rc = EXIT_PARTIAL
            continue
        try:
            if args.cmd == "set":
                if args.iunlink and stat.S_ISREG(os.fstat(fd).st_mode):
                    # xattrs cannot change on an immutable inode: a guarded moment without it
                    with unsealed(fd, what=shown(path)):
                        attrs.set_marker(fd)
                elif args.iunlink:  # a directory: no hardlinks, nobody shares it
                    was = attrs.set_immutable(fd, False)
                    attrs.set_marker(fd)
                    attrs.set_immutable(fd, was)
                if args.immutable:
                    attrs.set_immutable(fd, True)
            elif args.cmd == "clear":
                if args.immutable or attrs.is_immutable(fd):
                    was = attrs.set_immutable(fd, False)
                    if args.iunlink:
                        attrs.clear_marker(fd)
                    if was and not args.immutable:
                        attrs.set_immutable(fd, True)
                elif args.iunlink:
                    attrs.clear_marker(fd)
            a = attrs.read_attrs(fd)
            if args.cmd == "show" or getattr(args, "verbose", False):
                print(f"{a.letters()} {os.fstat(fd).st_nlink:>5} {path}")
        except OSError as e:
            print(
                f"vsattr: {path}: {e.strerror}"
                + (" (needs root: CAP_LINUX_IMMUTABLE)" if e.errno == 1 else ""),
                file=sys.stderr,
            )
            rc = EXIT_PARTIAL
        finally:
            os.close(fd)
    return rc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vsattr",
        description="Show or set the iunlink marker (U) and the immutable (I) "
        "and append-only (A) flags; upper case = set.  Columns: flags, link count, path.",
    )
    common = common_options()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (
        ("show", "show the flags"),
        ("set", "set flags (default: both)"),
        ("clear", "clear flags (default: both)"),
    ):
        s = sub.add_parser(name, parents=[common], help=text)
        if name != "show":
            s.add_argument("--iunlink", action="store_true", help="the iunlink marker xattr")
            s.add_argument("--immutable", action="store_true", help="FS_IMMUTABLE_FL")
        s.add_argument("paths", nargs="+", metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli("vsattr", parser(), lambda a, paths: _cmd(a), argv)


if __name__ == "__main__":
    sys.exit(main())
