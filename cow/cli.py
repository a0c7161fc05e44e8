"""vscow: mount the copy-on-write overlay for guests, unmount it, show what is mounted."""

from __future__ import annotations

import argparse
import os
import sys

from vsstore.clitools import common_options, require_root, run_cli
from vsstore.config import Paths, resolve_guest
from vsstore.errors import EXIT_OK, ConfigError

from . import control


def cmd_mount(args: argparse.Namespace, paths: Paths) -> int:
    guests = {}
    for arg in args.guests:
        g = resolve_guest(arg, paths)
        guests[g.name] = str(g.root)
    if args.foreground:
        from .mount import serve

        serve(os.path.abspath(args.at), guests, os.geteuid() == 0)
        return EXIT_OK
    control.mount(paths, args.at, guests, args.log)
    return EXIT_OK


def cmd_add(args: argparse.Namespace, paths: Paths) -> int:
    g = resolve_guest(args.guest, paths)
    control.add(paths, args.at, g.name, str(g.root))
    return EXIT_OK


def cmd_remove(args: argparse.Namespace, paths: Paths) -> int:
    control.remove(paths, args.at, args.name)
    return EXIT_OK


def cmd_attach(args: argparse.Namespace, paths: Paths) -> int:
    try:
        fd = os.open(f"/proc/{args.pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(
            f"--pid {args.pid}: {e.strerror}; give a running process of the guest"
        ) from None
    try:
        control.attach(paths, args.at, args.name, fd)
    finally:
        os.close(fd)
    return EXIT_OK


def cmd_umount(args: argparse.Namespace, paths: Paths) -> int:
    control.umount(paths, args.at)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    for m, _src in control.mounts():
        st = control.state(paths, m) or {}
        guests = " ".join(sorted(st.get("guests", {}))) or "-"
        print(f"{m}\tpid {st.get('pid', '?')}\tguests: {guests}\tlog: {st.get('log', '-')}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vscow",
        description="The copy-on-write overlay: guests "
        "see a writable tree; writes to shared files give the guest its "
        "own copy; memory stays shared for what is not written.",
    )
    common = common_options()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", parents=[common], help="mount one overlay serving the guests")
    m.add_argument("--at", required=True, metavar="DIR")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground")
    m.add_argument(
        "--log",
        metavar="FILE",
        help="the daemon's log (default: vscow.log in $VSSTORE_LOGDIR, /var/log/vsstore)",
    )
    m.add_argument("guests", nargs="+", metavar="GUEST")
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", parents=[common], help="unmount an overlay")
    u.add_argument("at", metavar="DIR")
    u.set_defaults(func=cmd_umount)
    a = sub.add_parser("add", parents=[common], help="serve one more guest in a running overlay")
    a.add_argument("at", metavar="DIR")
    a.add_argument("guest", metavar="GUEST")
    a.set_defaults(func=cmd_add)
    r = sub.add_parser("remove", parents=[common], help="stop serving a guest")
    r.add_argument("at", metavar="DIR")
    r.add_argument("name", metavar="NAME")
    r.set_defaults(func=cmd_remove)
    t = sub.add_parser(
        "attach",
        parents=[common],
        help="writes from the pid namespace of process PID (and "
        "namespaces nested in it) are guest NAME's (vserver does this for the "
        "guests it starts; any other process of a guest is refused writes to "
        "shared files)",
    )
    t.add_argument("at", metavar="DIR")
    t.add_argument("name", metavar="NAME")
    t.add_argument("--pid", type=int, required=True)
    t.set_defaults(func=cmd_attach)
    s = sub.add_parser("status", parents=[common], help="what is mounted")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    def run(a: argparse.Namespace, paths: Paths) -> int:
        if a.func is not cmd_status:
            require_root(
                "vscow", "it mounts FUSE for root's guest trees and joins their namespaces"
            )
        return int(a.func(a, paths))

    return run_cli("vscow", parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
