"""vscow: mount the copy-on-write overlay for guests, unmount it, show what is mounted."""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from vsstore.clitools import run_cli
from vsstore.config import Paths, resolve_guest
from vsstore.errors import EXIT_OK, ConfigError
from vsstore.runtime import cow_state_file


def _mounts() -> list[tuple[str, str]]:
    """(mountpoint, source) of every vscow mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            if fstype == "fuse.vscow":
                out.append((left.split()[4], source))
    return out


def cmd_mount(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    guests = {}
    for arg in args.guests:
        g = resolve_guest(arg, paths)
        guests[g.name] = str(g.root)
    at = os.path.abspath(args.at)
    if not os.path.isdir(at):
        raise ConfigError(f"--at {at}: not a directory; create the mount point first")
    if any(m == at for m, _ in _mounts()):
        raise ConfigError(f"{at}: a vscow overlay is mounted there already")
    immutable = os.geteuid() == 0
    if args.foreground:
        from .mount import serve
        serve(at, guests, immutable)
        return EXIT_OK
    r, w = os.pipe()
    state = cow_state_file(paths, at)
    state.parent.mkdir(parents=True, exist_ok=True)
    control = str(state.with_suffix(".sock"))
    cmd = [sys.executable, "-c", "import sys, json; from cow.mount import serve; "
           "serve(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4]), "
           "sys.argv[5])", at, json.dumps(guests), "1" if immutable else "0", str(w), control]
    log = open(args.log, "ab") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=log,
                            stderr=log, start_new_session=True)
    os.close(w)
    ready = os.read(r, 16)
    os.close(r)
    if ready != b"ok\n":
        proc.wait(timeout=10)
        raise ConfigError(f"the overlay did not come up at {at} (exit {proc.returncode}); "
                          f"see --log")
    state.write_text(json.dumps({"pid": proc.pid, "mountpoint": at, "guests": guests,
                                 "control": control}))
    return EXIT_OK


def _ask(at: str, request: dict[str, str]) -> dict[str, object]:
    """Send one request to the daemon serving ``at``; its state file says where."""
    paths = Paths.from_env()
    state_file = cow_state_file(paths, os.path.abspath(at))
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{at}: no vscow overlay of ours is mounted there") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(state["control"])
            s.sendall(json.dumps(request).encode() + b"\n")
            answer = json.loads(s.makefile("rb").readline())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{at}: the overlay's daemon does not answer ({e})") from None
    if not answer.get("ok"):
        raise ConfigError(f"{at}: {answer.get('error')}")
    return state


def cmd_add(args: argparse.Namespace) -> int:
    g = resolve_guest(args.guest, Paths.from_env())
    state = _ask(args.at, {"op": "add", "name": g.name, "root": str(g.root)})
    state["guests"][g.name] = str(g.root)  # type: ignore[index]
    cow_state_file(Paths.from_env(), os.path.abspath(args.at)).write_text(json.dumps(state))
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    state = _ask(args.at, {"op": "remove", "name": args.name})
    state["guests"].pop(args.name, None)  # type: ignore[union-attr]
    cow_state_file(Paths.from_env(), os.path.abspath(args.at)).write_text(json.dumps(state))
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    at = os.path.abspath(args.at)
    if not any(m == at for m, _ in _mounts()):
        raise ConfigError(f"{at}: no vscow overlay is mounted there")
    subprocess.run(["fusermount3", "-u", at], check=True)
    pidfile = cow_state_file(Paths.from_env(), at)
    try:
        with open(pidfile) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        pid = 0
    for _ in range(200):  # the daemon ends once the kernel has let go of the mount
        gone = not any(m == at for m, _ in _mounts()) and \
            (not pid or not os.path.exists(f"/proc/{pid}"))
        if gone:
            if pid:
                os.unlink(pidfile)
            return EXIT_OK
        time.sleep(0.05)
    raise ConfigError(f"{at}: still mounted or its daemon (pid {pid}) still running; "
                      f"is something using it?")


def cmd_status(args: argparse.Namespace) -> int:
    for m, src in _mounts():
        print(f"{m}\t{src}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vscow", description="The copy-on-write overlay: guests "
                                "see a writable tree; writes to shared files give the guest its "
                                "own copy; memory stays shared for what is not written.")
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mount", help="mount one overlay serving the guests")
    m.add_argument("--at", required=True, metavar="DIR")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--log", metavar="FILE", help="the daemon's log")
    m.add_argument("guests", nargs="+", metavar="GUEST")
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="unmount an overlay")
    u.add_argument("at", metavar="DIR")
    u.set_defaults(func=cmd_umount)
    a = sub.add_parser("add", help="serve one more guest in a running overlay")
    a.add_argument("at", metavar="DIR")
    a.add_argument("guest", metavar="GUEST")
    a.set_defaults(func=cmd_add)
    r = sub.add_parser("remove", help="stop serving a guest")
    r.add_argument("at", metavar="DIR")
    r.add_argument("name", metavar="NAME")
    r.set_defaults(func=cmd_remove)
    s = sub.add_parser("status", help="what is mounted")
    s.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli("vscow", parser(), lambda a: a.func(a), argv)


if __name__ == "__main__":
    sys.exit(main())
