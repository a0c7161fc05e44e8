"""``vserver NAME build|start|stop|restart|status|running|enter|exec|delete`` and
``vserver-stat``: util-vserver's commands over ``vsstore.lifecycle``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import build as buildmod
from . import guestconf, lifecycle
from .clitools import run_cli
from .config import Paths, configured_guests, resolve_guest
from .errors import EXIT_OK, ConfigError, StateError

EXIT_STOPPED = 3  # status: not running (LSB's code for it)


def _cfg(paths: Paths, name: str) -> guestconf.GuestConfig:
    return guestconf.load(resolve_guest(name, paths))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vserver NAME build")
    p.add_argument("-m", dest="method", default="skeleton",
                   help="skeleton, debootstrap or clone")
    p.add_argument("--hostname")
    p.add_argument("--context", type=int)
    p.add_argument("--interface", action="append", metavar="IP/PREFIX[,hostip=IP][,name=IF]")
    return p


def cmd_build(args: argparse.Namespace, paths: Paths) -> int:
    own, method_args = args.rest, []
    if "--" in own:
        i = own.index("--")
        own, method_args = own[:i], own[i + 1:]
    b = _build_parser().parse_args(own)
    g = buildmod.build(paths, buildmod.BuildOptions(
        name=args.name, method=b.method, hostname=b.hostname, context=b.context,
        interfaces=tuple(b.interface or ()), args=tuple(method_args)))
    if b.method == "clone":  # what the source shares is linked; join the rest now
        from unify.cli import main as vsunify
        code = vsunify(["run", g.name])
        if code != EXIT_OK:
            return code
    print(f"guest {g.name} built in {g.root} (configuration {g.confdir})")
    return EXIT_OK


def cmd_start(args: argparse.Namespace, paths: Paths) -> int:
    lifecycle.start(paths, _cfg(paths, args.name))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace, paths: Paths) -> int:
    lifecycle.stop(paths, _cfg(paths, args.name))
    return EXIT_OK


def cmd_restart(args: argparse.Namespace, paths: Paths) -> int:
    cfg = _cfg(paths, args.name)
    if lifecycle.running(paths, cfg.name):
        lifecycle.stop(paths, cfg)
    lifecycle.start(paths, cfg)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, paths: Paths) -> int:
    cfg = _cfg(paths, args.name)
    st = lifecycle.running(paths, cfg.name)
    if st is None:
        print(f"Vserver '{cfg.name}' is stopped")
        return EXIT_STOPPED
    ctx = f" at context '{st.context}'" if st.context is not None else ""
    mode = f"through the cow overlay at {st.cow}" if st.cow else "directly"
    print(f"Vserver '{cfg.name}' is running{ctx}: init pid {st.init_pid}, "
          f"{len(lifecycle.guest_pids(st))} processes, up {_uptime(st.started)}, "
          f"root {st.root} mounted {mode}")
    return EXIT_OK


def cmd_running(args: argparse.Namespace, paths: Paths) -> int:
    return EXIT_OK if lifecycle.running(paths, args.name) else 1


def _running_cfg(paths: Paths, name: str) -> tuple[guestconf.GuestConfig, lifecycle.RunState]:
    cfg = _cfg(paths, name)
    st = lifecycle.running(paths, cfg.name)
    if st is None:
        raise StateError(f"guest {cfg.name} is not running; 'vserver {cfg.name} start' first")
    return cfg, st


def cmd_exec(args: argparse.Namespace, paths: Paths) -> int:
    argv = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    cfg, st = _running_cfg(paths, args.name)
    return lifecycle.run_in(paths, cfg, st, argv)


def cmd_enter(args: argparse.Namespace, paths: Paths) -> int:
    cfg, st = _running_cfg(paths, args.name)
    return lifecycle.run_in(paths, cfg, st, ["/bin/sh", "-l"], tty=True)


def cmd_delete(args: argparse.Namespace, paths: Paths) -> int:
    g = resolve_guest(args.name, paths)
    if lifecycle.running(paths, g.name):
        raise StateError(f"guest {g.name} is running; stop it first")
    if args.rest not in ([], ["--force"]):
        raise ConfigError(f"delete: unknown arguments {' '.join(args.rest)}; only --force")
    if not args.rest:
        raise ConfigError(f"this removes guest {g.name}'s tree {g.root} and its "
                          f"configuration; repeat with --force to do it")
    if g.root.exists():
        buildmod.remove_guest_tree(g.root)
    if g.confdir is not None and g.confdir.exists():
        import shutil
        shutil.rmtree(g.confdir)
    print(f"guest {g.name} deleted")
    return EXIT_OK


COMMANDS = {"build": cmd_build, "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart,
            "status": cmd_status, "running": cmd_running, "exec": cmd_exec,
            "enter": cmd_enter, "delete": cmd_delete}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vserver", description="Build, start, stop and enter guests (util-vserver's "
        "commands on a mainline kernel).",
        epilog="build: -m skeleton|debootstrap|clone [--hostname H] [--context N] "
               "[--interface IP/PREFIX[,hostip=IP][,name=IF]] [-- METHOD ARGS]; "
               "debootstrap: -- -d SUITE [-m MIRROR]; clone: -- --source GUEST")
    p.add_argument("--debug", action="store_true")
    p.add_argument("name", metavar="NAME")
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's own arguments (exec: the command; delete: --force)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli("vserver", parser(),
                   lambda a: COMMANDS[a.command](a, Paths.from_env()), argv)


# -- vserver-stat ------------------------------------------------------------------------

def _uptime(started: float) -> str:
    s = int(time.time() - started)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h:02d}h{m:02d}m{s:02d}" if h else f"{m:02d}m{s:02d}s"


def guest_usage(st: lifecycle.RunState) -> dict[str, object]:
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
        fields = data[data.rindex(b")") + 2:].split()
        utime += int(fields[11])
        stime += int(fields[12])
        vsz += int(fields[20])
        rss += int(fields[21]) * page
    return {"name": st.name, "context": st.context, "processes": len(pids), "vsz": vsz,
            "rss": rss, "utime_s": utime / tick, "stime_s": stime / tick,
            "uptime_s": time.time() - st.started, "init_pid": st.init_pid}


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"


def stat_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vserver-stat",
                                description="Running guests: processes, memory, CPU, uptime.")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--memory", action="store_true", help="also the file-backed memory each "
                   "guest maps and how much of it other guests share (unified inodes)")

    def run(args: argparse.Namespace) -> int:
        paths = Paths.from_env()
        rows = []
        pids = {}
        for g in configured_guests(paths):
            st = lifecycle.running(paths, g.name)
            if st is not None:
                rows.append(guest_usage(st))
                pids[g.name] = lifecycle.guest_pids(st, own=False)
        mem = None
        if args.memory:
            from .memory import measure
            mem = measure(pids)
            for r in rows:
                m = mem["guests"][r["name"]]  # type: ignore[index]
                r["file_rss"], r["shared_file_rss"] = m["file_rss"], m["shared_rss"]
        if args.json:
            print(json.dumps({"guests": rows, "memory": mem} if mem else rows, indent=2))
            return EXIT_OK
        print(f"{'CTX':>5} {'PROC':>5} {'VSZ':>7} {'RSS':>7} {'userTIME':>9} "
              f"{'sysTIME':>9} {'UPTIME':>9} NAME")
        for r in rows:
            print(f"{r['context'] if r['context'] is not None else '-':>5} "
                  f"{r['processes']:>5} {_human(r['vsz']):>7} "  # type: ignore[arg-type]
                  f"{_human(r['rss']):>7} {r['utime_s']:>8.2f}s {r['stime_s']:>8.2f}s "  # type: ignore[arg-type]
                  f"{_uptime(time.time() - r['uptime_s']):>9} {r['name']}")  # type: ignore[operator]
        if mem:
            t = mem["total"]
            print(f"file-backed memory: {_human(t['with_unification'])} with unification, "  # type: ignore[index]
                  f"{_human(t['without_unification'])} without; per guest (mapped/shared): "  # type: ignore[index]
                  + ", ".join(f"{r['name']} {_human(r['file_rss'])}/"  # type: ignore[arg-type]
                              f"{_human(r['shared_file_rss'])}" for r in rows))  # type: ignore[arg-type]
        return EXIT_OK
    return run_cli("vserver-stat", p, run, argv)


if __name__ == "__main__":
    if os.path.basename(sys.argv[0]) == "vserver-stat":
        sys.exit(stat_main())
    sys.exit(main())
