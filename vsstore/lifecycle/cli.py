"""``vserver NAME build|start|stop|restart|status|running|console|enter|exec|suexec|check|
delete``, ``vserver list`` and ``vserver-stat``: util-vserver's commands over the lifecycle
(``vsstore.lifecycle``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from vsstore import lifecycle
from vsstore.clitools import common_options, require_root, run_cli
from vsstore.config import (
    Guest,
    Paths,
    configured_names,
    deletable_guest,
    resolve_guest,
    valid_name,
)
from vsstore.errors import EXIT_OK, ConfigError, StateError
from vsstore.names import shown
from vsstore.safetree import GuestTree

from . import build as buildmod
from . import compat, console, fleet, guestconf

EXIT_STOPPED = 3  # status: not running (LSB's code for it)


def _cfg(paths: Paths, name: str) -> guestconf.GuestConfig:
    return guestconf.load(resolve_guest(name, paths))


def cmd_build(args: argparse.Namespace, paths: Paths) -> int:
    g = buildmod.build(
        paths,
        buildmod.BuildOptions(
            name=args.name,
            method=args.method,
            hostname=args.hostname,
            context=args.context,
            interfaces=tuple(args.interface or ()),
            net=tuple(
                (k, v)
                for k in ("dev", "prefix", "mask", "bcast")
                if (v := getattr(args, "net" + k))
            ),
            args=tuple(args.method_args),
            progress=args.progress or sys.stderr.isatty(),
        ),
    )
    if args.method == "clone":  # what the source shares is linked; join the rest now
        code = _vsunify(paths, [g])
        if code != EXIT_OK:
            return code
    if args.userns and g.confdir is not None:
        from . import userns

        m = userns.enable(g.confdir.parent, g.name)
        print(f"guest {g.name}: its root is host uid {m.uid} (a user namespace of its own)")
    print(f"guest {g.name} built in {g.root} (configuration {g.confdir})")
    return EXIT_OK


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    cfg = _cfg(paths, args.name)
    ign = compat.ignored(cfg.guest)
    if ign:  # a util-vserver host's entries: never passed over in silence
        print(
            f"vserver: warning: {cfg.name}: ignored (see 'vserver {cfg.name} check'): "
            + ", ".join(shown(e.path) for e in ign),
            file=sys.stderr,
        )
    st = lifecycle.start(paths, cfg)
    print(
        f"guest {cfg.name} started: style {cfg.style}, init pid {st.init_pid} "
        f"({' '.join(cfg.init) or 'our reaper'}); console: vserver {cfg.name} console; "
        f"log: {paths.logdir / f'vserver-{cfg.name}.log'}"
    )
    return EXIT_OK


def cmd_check(args: argparse.Namespace, paths: Paths) -> int:
    """Every entry of the guest's configuration, what is done with it or why not; exit 0
    when the guest can start, the error's code when it cannot."""
    g = resolve_guest(args.name, paths)
    r = compat.check(g)
    if args.json:
        print(
            json.dumps(
                {
                    "guest": g.name,
                    "can_start": r.error is None,
                    "error": r.error.message if r.error else None,
                    "entries": [
                        {"path": e.path, "use": e.use.value, "why": e.why} for e in r.entries
                    ],
                },
                indent=2,
            )
        )
        return r.code
    w = max((len(shown(e.path)) for e in r.entries), default=4)
    for e in r.entries:
        print(f"{e.use.value:<8} {shown(e.path).ljust(w)}  {e.why}")
    if r.error is None:
        print(f"guest {g.name} can start")
    else:
        print(f"guest {g.name} cannot start: {r.error.message}")
    return r.code


def cmd_console(args: argparse.Namespace, paths: Paths) -> int:
    if not valid_name(args.name):
        raise ConfigError(f"guest name {args.name!r} is not valid (letters, digits and '._+-')")
    return console.attach(paths, args.name, args.tty)


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    """From the run state alone: the configuration is not read (it may have changed or
    broken since the guest started)."""
    if not valid_name(args.name):
        raise ConfigError(
            f"guest name {args.name!r} is not valid: stop takes a guest's "
            f"name (letters, digits and '._+-')"
        )
    lifecycle.stop(paths, args.name)
    return EXIT_OK


def cmd_restart(args: argparse.Namespace, paths: Paths) -> int:
    cfg = _cfg(paths, args.name)
    if lifecycle.running(paths, cfg.name):
        lifecycle.stop(paths, cfg.name)
    lifecycle.start(paths, cfg)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    cfg = _cfg(paths, args.name)
    st = lifecycle.running(paths, cfg.name)
    if cfg.wants_userns:  # exec --cow cannot serve a user namespace (lifecycle.userns)
        hint = (
            f"upgrade packages with 'vserver {cfg.name} userns disable', then 'vapt-get "
            f"{cfg.name} -- ARGS', then 'vserver {cfg.name} userns enable --start N' with "
            f"its range (the overlay cannot serve a user namespace)"
        )
    elif not cfg.cow:  # how to change its packages (shared files are immutable here)
        hint = (
            f"upgrade packages with 'vapt-get {cfg.name} -- ARGS' (or 'vserver {cfg.name} "
            f"exec --cow COMMAND'): a package manager run directly fails on shared files"
        )
    else:
        hint = ""
    if st is None:
        print(f"Vserver '{cfg.name}' is stopped")
        if hint:
            print(hint)
        return EXIT_STOPPED
    ctx = f" at context '{st.context}'" if st.context is not None else ""
    mode = f"through the cow overlay at {st.cow}" if st.cow else "directly"
    print(
        f"Vserver '{cfg.name}' is running{ctx}: init pid {st.init_pid}, "
        f"{len(lifecycle.guest_pids(st))} processes, up {_uptime(st.started)}, "
        f"root {st.root} mounted {mode}"
    )
    if st.userns:
        print(
            f"user namespace: its uids 0..{st.userns[1] - 1} are the host's "
            f"{st.userns[0]}..{st.userns[0] + st.userns[1] - 1}"
        )
    if hint and not st.cow:
        print(hint)
    return EXIT_OK


def cmd_running(args: argparse.Namespace, paths: Paths) -> int:
    return EXIT_OK if lifecycle.running(paths, args.name) else 1


def _running_cfg(paths: Paths, name: str) -> tuple[guestconf.GuestConfig, lifecycle.RunState]:
    cfg = _cfg(paths, name)
    st = lifecycle.running(paths, cfg.name)
    if st is None:
        raise StateError(f"guest {cfg.name} is not running; 'vserver {cfg.name} start' first")
    return cfg, st


def _command(rest: list[str]) -> list[str]:
    """The command after exec's own options ('--' may separate them)."""
    return rest[1:] if rest[:1] == ["--"] else rest


def cmd_exec(args: argparse.Namespace, paths: Paths) -> int:
    argv = _command(args.argv)
    if args.cow:
        return lifecycle.run_cow(paths, _cfg(paths, args.name), argv)
    cfg, st = _running_cfg(paths, args.name)
    return lifecycle.run_in(paths, cfg, st, argv)


def cmd_suexec(args: argparse.Namespace, paths: Paths) -> int:
    """util-vserver's ``vserver NAME suexec USER CMD...``: the user looked up in the guest's
    /etc/passwd on the host (lifecycle.users), set by the helper inside."""
    from .users import lookup

    cfg, st = _running_cfg(paths, args.name)
    user = lookup(st.root, cfg.name, args.user)
    return lifecycle.run_in(paths, cfg, st, _command(args.argv), user=user)


def cmd_enter(args: argparse.Namespace, paths: Paths) -> int:
    if args.cow:
        cfg = _cfg(paths, args.name)
        return lifecycle.run_cow(paths, cfg, [cfg.shell, "-l"])
    cfg, st = _running_cfg(paths, args.name)
    return lifecycle.run_in(paths, cfg, st, [cfg.shell, "-l"])


# -- package management ------------------------------------------------------------------


def _vsunify(paths: Paths, guests: list[Guest], quiet: bool = False) -> int:
    return fleet.vsunify(paths, guests, quiet)


def _unify_after(paths: Paths, name: str) -> int:
    return fleet.unify_after(paths, [name])


def package_command(
    paths: Paths,
    name: str,
    argv: list[str] | Callable[[Guest], list[str]],
    unify: bool = True,
    sel: fleet.Selection | None = None,
) -> int:
    """Run a package manager through the overlay, then re-unify (vapt-get, vrpm, pkg): in
    guest ``name``, or in every guest ``sel`` selects (then one vsunify for them all)."""
    if sel:
        guests = fleet.select(paths, sel)
        if callable(argv):
            return fleet.run_all(paths, guests, argv, unify)
        fixed: list[str] = argv
        return fleet.run_all(paths, guests, lambda g: fixed, unify)
    if callable(argv):
        argv = argv(resolve_guest(name, paths))
    code = lifecycle.run_cow(paths, _cfg(paths, name), argv)
    if code == EXIT_OK and unify:
        ucode = _unify_after(paths, name)
        if ucode != EXIT_OK:
            print(
                f"vserver: the package command succeeded; vsunify afterwards exited {ucode}",
                file=sys.stderr,
            )
    return code


def _split_no_unify(rest: list[str]) -> tuple[bool, list[str]]:
    """(unify afterwards, the package manager's arguments): ``--no-unify`` before '--'
    is ours (util-vserver's wrappers took it anywhere before the arguments)."""
    unify = True
    out = []
    for i, a in enumerate(rest):
        if a == "--no-unify":
            unify = False
        elif a == "--":
            out.extend(rest[i + 1 :])
            break
        else:
            out.append(a)
    return unify, out


def cmd_apt_get(args: argparse.Namespace, paths: Paths) -> int:
    unify, rest = _split_no_unify(list(args.args))
    return package_command(
        paths, args.name, ["apt-get", *rest], unify and not args.no_unify, args.fleet
    )


def cmd_rpm(args: argparse.Namespace, paths: Paths) -> int:
    unify, rest = _split_no_unify(list(args.args))
    return package_command(
        paths, args.name, ["rpm", *rest], unify and not args.no_unify, args.fleet
    )


def _manager(g: Guest) -> str:
    """apt (dpkg), dnf/yum (rpm): from what the guest's tree holds (nothing is run; the
    names are looked up below its root only, no symlink followed on the way)."""
    with GuestTree(g.root, g.name) as tree:
        for rel, kind in (
            ("var/lib/dpkg/status", "apt"),
            ("usr/bin/dnf", "dnf"),
            ("usr/bin/yum", "yum"),
            ("var/lib/rpm", "rpm"),
        ):
            try:
                dfd, base = tree.open_parent(rel)
            except OSError:
                continue  # no such directory (or one reached only through a symlink)
            try:
                os.stat(base, dir_fd=dfd, follow_symlinks=False)
                return kind
            except OSError:
                continue
            finally:
                os.close(dfd)
    raise ConfigError(
        f"cannot tell the guest's package manager (no dpkg status, dnf, yum "
        f"or rpm database in {shown(g.root)}); use 'vserver NAME exec --cow "
        f"...'"
    )


PKG_ACTIONS = {
    "apt": {
        "install": ["apt-get", "install", "-y"],
        "remove": ["apt-get", "remove", "-y"],
        "update": ["apt-get", "update"],
        "upgrade": ["apt-get", "upgrade", "-y"],
    },
    "dnf": {
        "install": ["dnf", "install", "-y"],
        "remove": ["dnf", "remove", "-y"],
        "update": ["dnf", "makecache"],
        "upgrade": ["dnf", "upgrade", "-y"],
    },
    "yum": {
        "install": ["yum", "install", "-y"],
        "remove": ["yum", "remove", "-y"],
        "update": ["yum", "makecache"],
        "upgrade": ["yum", "update", "-y"],
    },
    "rpm": {"install": ["rpm", "-U"], "remove": ["rpm", "-e"], "upgrade": ["rpm", "-U"]},
}


def cmd_pkg(args: argparse.Namespace, paths: Paths) -> int:
    unify, rest = _split_no_unify(list(args.args))
    unify = unify and not args.no_unify
    if not rest or rest[0] not in ("install", "remove", "update", "upgrade"):
        raise ConfigError("pkg: say install, remove, update or upgrade, then the packages")

    def argv(g: Guest) -> list[str]:
        base = PKG_ACTIONS[_manager(g)].get(rest[0])
        if base is None:
            raise ConfigError(
                f"pkg {rest[0]}: not for a plain rpm guest; use 'vserver {g.name} rpm ...'"
            )
        return [*base, *rest[1:]]

    if args.fleet:
        return package_command(paths, "", argv, unify, args.fleet)
    g = resolve_guest(args.name, paths)
    return package_command(paths, g.name, argv(g), unify)


def cmd_userns(args: argparse.Namespace, paths: Paths) -> int:
    """``userns enable [--start N] [--count N] | disable | show``: the guest's user
    namespace (lifecycle.userns), changed only while it is stopped."""
    from . import userns

    g = resolve_guest(args.name, paths)
    if g.confdir is None:
        raise ConfigError(f"guest {g.name} has no configuration; build it first")
    if args.action == "show":
        r = userns.read(g.confdir)
        if r is None:
            print(f"guest {g.name}: no user namespace (its root is the host's, with fewer caps)")
        else:
            uid, gid = (v if isinstance(v, str) else f"{v[0]}..{v[0] + v[1] - 1}" for v in r)
            print(f"guest {g.name}: user namespace: host uids {uid}, gids {gid}")
        return EXIT_OK
    with lifecycle.guest_lock(paths, g.name):
        if lifecycle.running(paths, g.name):
            raise StateError(f"guest {g.name} is running; stop it first")
        if args.action == "disable":
            had = userns.disable(g.confdir)
            print(f"guest {g.name}: " + ("user namespace removed" if had else "had none"))
            return EXIT_OK
        m = userns.enable(g.confdir.parent, g.name, args.start, args.count)
    print(
        f"guest {g.name}: user namespace enabled: its uids and gids 0..{m.uid_count - 1} "
        f"are the host's {m.uid}..{m.uid + m.uid_count - 1} from its next start"
    )
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, paths: Paths) -> int:
    """A configured guest only, whose tree lies strictly below the guests' root
    (``config.deletable_guest`` says why not, before --force is even considered)."""
    g = deletable_guest(args.name, paths)
    if lifecycle.running(paths, g.name):
        raise StateError(f"guest {g.name} is running; stop it first")
    if not args.force:
        raise ConfigError(
            f"this removes guest {g.name}'s tree {g.root} and its "
            f"configuration; repeat with --force to do it"
        )
    buildmod.delete(paths, g.name, args.progress or sys.stderr.isatty())
    print(f"guest {g.name} deleted")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    common = common_options()
    p = argparse.ArgumentParser(
        prog="vserver",
        parents=[common],
        description="Build, start, stop and enter guests "
        "(util-vserver's commands on a mainline kernel); 'vserver list [--json]' lists "
        "every configured guest.",
    )
    p.add_argument(
        "name",
        metavar="NAME",
        help="the guest (configured in /etc/vservers/NAME); for apt-get, rpm and pkg "
        "also --all, --running or --mark MARK (apps/init/mark): every guest selected, "
        "then one vsunify",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(
        name: str, func: Callable[[argparse.Namespace, Paths], int], text: str
    ) -> argparse.ArgumentParser:
        c = sub.add_parser(name, parents=[common], help=text, description=text)
        c.set_defaults(func=func)
        return c

    b = cmd("build", cmd_build, "make a guest: tree and configuration")
    b.formatter_class = argparse.RawDescriptionHelpFormatter
    b.epilog = (
        "methods and their arguments (after --):\n"
        "  -m skeleton                        a minimal tree (the default; no arguments)\n"
        "  -m debootstrap -- -d SUITE [-m MIRROR] [DEBOOTSTRAP OPTIONS...]\n"
        "                                     Debian, e.g. vserver web build -m debootstrap "
        "-- -d bookworm\n"
        "  -m clone -- --source GUEST         a copy of another guest (a name or a path), "
        "its unified\n"
        "                                     files linked, not copied"
    )
    b.add_argument(
        "-m",
        dest="method",
        default="skeleton",
        metavar="|".join(buildmod.METHODS),
        help="how: skeleton (a minimal tree), debootstrap (Debian, -- -d SUITE "
        "[-m MIRROR]) or clone (another guest, -- --source GUEST)",
    )
    b.add_argument(
        "--progress",
        action="store_true",
        help="a progress line (clone) also when not on a terminal",
    )
    b.add_argument(
        "--userns",
        action="store_true",
        help="run it in a user namespace of its own (vserver NAME userns enable)",
    )
    b.add_argument("--hostname")
    b.add_argument("--context", type=int)
    b.add_argument(
        "--interface",
        action="append",
        metavar="[DEV:]IP[/PREFIX][,hostip=IP][,name=IF]",
        help="an address of the guest (repeatable; util-vserver's [LABEL=][DEV:]IP[/PREFIX] too)",
    )
    for opt, text in (
        ("dev", "the guest's interface for --interface addresses without DEV: (util-vserver's)"),
        ("prefix", "their prefix length (util-vserver's)"),
        ("mask", "their netmask (util-vserver's)"),
        ("bcast", "their broadcast address (util-vserver's)"),
    ):
        b.add_argument(f"--net{opt}", dest=f"net{opt}", help=text)
    b.add_argument(
        "method_args",
        nargs="*",
        metavar="-- METHOD ARGS",
        help="the method's own arguments, after --",
    )
    cmd("start", cmd_start, "start the guest in its own namespaces")
    ck = cmd(
        "check",
        cmd_check,
        "every entry of the guest's configuration: what is done with it, what is "
        "ignored and why; exit 0 when the guest can start",
    )
    ck.add_argument("--json", action="store_true")
    cmd("stop", cmd_stop, "stop it: every process ends, no mount is left")
    cmd("restart", cmd_restart, "stop (if it runs), then start")
    cmd("status", cmd_status, "running or stopped (exit 3), and how")
    cmd("running", cmd_running, "exit 0 if it runs, else 1")
    c = cmd(
        "console",
        cmd_console,
        "attach to the running guest's console (init's output and input); "
        "Ctrl-] three times within a second detaches",
    )
    c.add_argument(
        "--tty", type=int, default=0, metavar="N", help="its /dev/ttyN instead (apps/init/ttys)"
    )
    for name, func, text in (
        ("exec", cmd_exec, "run a command inside the running guest"),
        ("enter", cmd_enter, "a login shell inside the running guest"),
    ):
        c = cmd(name, func, text)
        c.add_argument(
            "--cow",
            action="store_true",
            help="with the guest's root through the "
            "cow overlay (shared files become the guest's own when written)",
        )
        if name == "exec":
            c.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    c = cmd("suexec", cmd_suexec, "run a command inside the running guest as one of its users")
    c.add_argument("user", metavar="USER", help="a user of the guest's /etc/passwd, or a uid")
    c.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND [ARGS...]")
    u = cmd(
        "userns",
        cmd_userns,
        "give the stopped guest a user namespace of its own (its root becomes an "
        "unprivileged host uid, its files stay as they are), take it away, or show it",
    )
    u.add_argument("action", choices=("enable", "disable", "show"))
    u.add_argument(
        "--start", type=int, metavar="N", help="enable: the first host id (default: a free one)"
    )
    u.add_argument(
        "--count", type=int, default=65536, metavar="N", help="enable: how many ids (65536)"
    )
    d = cmd("delete", cmd_delete, "remove a stopped guest's tree and configuration")
    d.add_argument("--force", action="store_true", help="do it")
    d.add_argument(
        "--progress", action="store_true", help="a progress line also when not on a terminal"
    )
    for name, func, text in (
        ("apt-get", cmd_apt_get, "apt-get in the guest through the overlay, then vsunify"),
        ("rpm", cmd_rpm, "rpm in the guest through the overlay, then vsunify"),
        (
            "pkg",
            cmd_pkg,
            "install|remove|update|upgrade PACKAGES with the guest's own "
            "package manager, through the overlay, then vsunify",
        ),
    ):
        c = cmd(name, func, text)
        c.add_argument("--no-unify", action="store_true", help="no vsunify afterwards")
        c.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    return p


ROOT_WHY = "guests run in namespaces made by root, from trees and run state only root may change"
NO_ROOT = {"check"}  # reads the configuration only


FLEET_NAME = "@fleet"  # stands for the guests selected; no guest can have this name
FLEET_COMMANDS = {"apt-get", "rpm", "pkg"}


def fleet_selection(argv: list[str]) -> tuple[fleet.Selection, list[str]]:
    """``--all``, ``--running`` or ``--mark MARK`` among the options before the guest's
    name: the selection, and the arguments with ``FLEET_NAME`` where the name goes."""
    sel = fleet.Selection()
    i = 0
    out: list[str] = []
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "--":
        a = argv[i]
        if a == "--all":
            sel = fleet.Selection(all=True)
        elif a == "--running":
            sel = fleet.Selection(running=True)
        elif a == "--mark" and i + 1 < len(argv):
            sel = fleet.Selection(mark=argv[i + 1])
            i += 1
        elif a.startswith("--mark="):
            sel = fleet.Selection(mark=a.partition("=")[2])
        else:
            out.append(a)
        i += 1
    if not sel:
        return sel, argv
    return sel, [*out, FLEET_NAME, *argv[i:]]


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if [a for a in raw if not a.startswith("-")] == ["list"]:  # vserver list [--json]
        from . import listing

        return listing.main([a for a in raw if a != "list"])
    sel, args = fleet_selection(raw)

    def run(a: argparse.Namespace, paths: Paths) -> int:
        if a.command not in NO_ROOT:
            require_root(f"vserver {a.command}", ROOT_WHY)
        a.fleet = sel
        if sel and a.command not in FLEET_COMMANDS:
            raise ConfigError(
                f"vserver {sel.text} {a.command}: {sel.text} is for "
                f"{', '.join(sorted(FLEET_COMMANDS))} only; name one guest"
            )
        return int(a.func(a, paths))

    return run_cli("vserver", parser(), run, args)


def _wrapper_main(prog: str, manager: str, argv: list[str] | None) -> int:
    """vapt-get NAME [--no-unify] -- ARGS... / vrpm NAME [--no-unify] -- ARGS..."""
    p = argparse.ArgumentParser(
        prog=prog,
        parents=[common_options()],
        description=f"{manager} "
        "inside a guest, through the cow overlay, then vsunify "
        "(util-vserver's wrapper).",
    )
    p.add_argument("--no-unify", action="store_true")
    p.add_argument("name", metavar="NAME|--all|--running|--mark MARK")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- ARGS")
    sel, args = fleet_selection(list(sys.argv[1:] if argv is None else argv))

    def run(a: argparse.Namespace, paths: Paths) -> int:
        require_root(prog, ROOT_WHY)
        unify, rest = _split_no_unify(list(a.rest))
        return package_command(paths, a.name, [manager, *rest], unify and not a.no_unify, sel)

    return run_cli(prog, p, run, args)


def vapt_get_main(argv: list[str] | None = None) -> int:
    return _wrapper_main("vapt-get", "apt-get", argv)


def vrpm_main(argv: list[str] | None = None) -> int:
    return _wrapper_main("vrpm", "rpm", argv)


# -- vserver-stat ------------------------------------------------------------------------


def _uptime(started: float) -> str:
    s = int(time.time() - started)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h:02d}h{m:02d}m{s:02d}" if h else f"{m:02d}m{s:02d}s"


@dataclass(frozen=True, slots=True)
class GuestUsage:
    """A running guest as vserver-stat shows it: a line of the table, an object of --json."""

    name: str
    context: int | None
    processes: int
    vsz: int
    rss: int
    utime_s: float
    stime_s: float
    uptime_s: float
    init_pid: int
    cgroup: dict[str, int | None] | None = None  # its processes, charge and limits
    file_rss: int | None = None  # --memory: the file-backed memory it maps
    shared_file_rss: int | None = None  # of it, in inodes other running guests map too

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "context": self.context,
            "processes": self.processes,
            "vsz": self.vsz,
            "rss": self.rss,
            "utime_s": self.utime_s,
            "stime_s": self.stime_s,
            "uptime_s": self.uptime_s,
            "init_pid": self.init_pid,
        }
        if self.cgroup is not None:
            d["cgroup"] = self.cgroup
        if self.file_rss is not None:
            d["file_rss"] = self.file_rss
        if self.shared_file_rss is not None:
            d["shared_file_rss"] = self.shared_file_rss
        return d


def guest_usage(st: lifecycle.RunState) -> GuestUsage:
    """Processes, memory and CPU of a running guest, summed over its pid namespace."""
    tick = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    pids = lifecycle.guest_pids(st)
    vsz = rss = utime = stime = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        utime += int(fields[11])
        stime += int(fields[12])
        vsz += int(fields[20])
        rss += int(fields[21]) * page
    uptime = time.time() - st.started
    cg = lifecycle.guest_cgroup(st.cgroup)
    charged = None
    if cg is not None:  # what the kernel charges the guest, and its limits
        u = cg.usage()
        charged = {"processes": len(cg.pids()), **u}
    return GuestUsage(
        st.name,
        st.context,
        len(pids),
        vsz,
        rss,
        utime / tick,
        stime / tick,
        uptime,
        st.init_pid,
        charged,
    )


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def _cg_cols(cg: dict[str, int | None] | None) -> str:
    def h(v: int | None) -> str:
        return "-" if v is None else _human(v)

    if cg is None:
        return f"{'-':>8} {'-':>7} {'-':>7} {'-':>8} {'-':>8}"
    pm = cg.get("pids_max")
    return (
        f"{h(cg.get('memory')):>8} {h(cg.get('memory_file')):>7} "
        f"{h(cg.get('memory_anon')):>7} {h(cg.get('memory_max')):>8} "
        f"{'-' if pm is None else pm:>8}"
    )


def stat_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vserver-stat",
        parents=[common_options()],
        description="Running guests: processes, memory, CPU, uptime.",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--memory",
        action="store_true",
        help="also the file-backed memory each "
        "guest maps and how much of it other guests share (unified inodes)",
    )

    def run(args: argparse.Namespace, paths: Paths) -> int:
        require_root("vserver-stat", "it reads the processes and cgroups of root's guests")
        rows = []
        pids = {}
        for name in configured_names(paths):  # the run state needs no root tree
            st = lifecycle.running(paths, name)
            if st is not None:
                rows.append(guest_usage(st))
                pids[name] = lifecycle.guest_pids(st, own=False)
        mem = None
        if args.memory:
            from vsstore.memory import measure

            mem = measure(pids)
            for i, r in enumerate(rows):
                m = mem.guests[r.name]
                rows[i] = replace(r, file_rss=m.file_rss, shared_file_rss=m.shared_rss)
        if args.json:
            out = [r.as_dict() for r in rows]
            print(json.dumps({"guests": out, "memory": mem.as_dict()} if mem else out, indent=2))
            return EXIT_OK
        print(
            f"{'CTX':>5} {'PROC':>5} {'VSZ':>7} {'RSS':>7} {'userTIME':>9} "
            f"{'sysTIME':>9} {'UPTIME':>9} {'CHARGED':>8} {'FILE':>7} {'ANON':>7} "
            f"{'MEM.MAX':>8} {'PIDS.MAX':>8} NAME"
        )
        for r in rows:
            print(
                f"{r.context if r.context is not None else '-':>5} "
                f"{r.processes:>5} {_human(r.vsz):>7} "
                f"{_human(r.rss):>7} {r.utime_s:>8.2f}s {r.stime_s:>8.2f}s "
                f"{_uptime(time.time() - r.uptime_s):>9} "
                f"{_cg_cols(r.cgroup)} {r.name}"
            )
        if mem:
            t, per_guest = mem.total, mem.guests
            print(
                f"file-backed memory: {_human(t.with_unification)} with unification, "
                f"{_human(t.without_unification)} without; per guest (mapped/shared): "
                + ", ".join(
                    f"{r.name} {_human(per_guest[r.name].file_rss)}/"
                    f"{_human(per_guest[r.name].shared_rss)}"
                    for r in rows
                )
            )
        return EXIT_OK

    return run_cli("vserver-stat", p, run, argv)


if __name__ == "__main__":
    if os.path.basename(sys.argv[0]) == "vserver-stat":
        sys.exit(stat_main())
    sys.exit(main())
