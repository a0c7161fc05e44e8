"""``vserver list [--json]``: every configured guest, running or not (``vserver-stat``
shows the running ones with their usage).

Per guest: its state (running or stopped), context, init style, addresses, mark, whether
it runs through the cow overlay, whose uid its root is on the host (a user namespace, or
the host's root), and how long it has run.  A running guest's context and
overlay come from its run state (what it was started with), a stopped one's from its
configuration; a guest whose configuration cannot be read is listed all the same, with the
error (``error`` in JSON, a note below the table), so one broken guest never hides the
others.  The JSON is stable: ``{"guests": [...]}`` in name order, every key always there.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

from vsstore.clitools import common_options, require_root, run_cli
from vsstore.config import Paths, configured_names, resolve_guest
from vsstore.errors import EXIT_OK, VsError
from vsstore.runtime import running

from . import guestconf, marks, userns


@dataclass(frozen=True, slots=True)
class Listed:
    """A line of the table, an object of --json (the keys, in this order, are stable)."""

    name: str
    state: str  # "running" or "stopped"
    context: int | None
    style: str | None  # apps/init/style (plain when unset); None if unreadable
    ips: list[str]  # ADDRESS/PREFIX of each interface
    mark: str | None
    cow: bool
    uptime_s: float | None  # running: seconds since start
    init_pid: int | None
    root: str | None
    error: str | None  # why (part of) the configuration could not be read
    userns: int | None = None  # the host uid of its root in a user namespace (None: host root)


def describe(paths: Paths, name: str) -> Listed:
    st = running(paths, name)
    errors: list[str] = []
    cfg = None
    root = None
    try:
        g = resolve_guest(name, paths)
        root = str(g.root)
        cfg = guestconf.load(g)
    except VsError as e:
        errors.append(e.message)
    try:
        mark = marks.mark_of(paths, name)
    except VsError as e:
        mark = None
        errors.append(e.message)
    rootuid = None
    if st is not None and st.userns:
        rootuid = st.userns[0]
    elif st is None and cfg is not None and cfg.wants_userns and cfg.guest.confdir is not None:
        r = userns.read(cfg.guest.confdir)  # "auto" not yet resolved: shown as -1
        rootuid = r[0][0] if r is not None and not isinstance(r[0], str) else -1
    if st is not None:
        context, cow, root = st.context, st.cow is not None, st.root
    else:
        context = cfg.context if cfg else None
        cow = cfg.cow if cfg else (paths.confdir / name / "cow").exists()
    return Listed(
        name=name,
        state="running" if st is not None else "stopped",
        context=context,
        style=cfg.style if cfg else None,
        ips=[str(i.ip) for i in cfg.interfaces] if cfg else [],
        mark=mark,
        cow=cow,
        uptime_s=round(time.time() - st.started, 1) if st is not None else None,
        init_pid=st.init_pid if st is not None else None,
        root=root,
        error="; ".join(errors) or None,
        userns=rootuid,
    )


def _uptime(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{d}d{h:02d}h" if d else f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def table(rows: list[Listed]) -> list[str]:
    """The aligned text table (every column as wide as its widest cell)."""
    head = ["NAME", "STATE", "CTX", "STYLE", "MARK", "COW", "ROOT", "UPTIME", "IPS"]
    cells = [
        [
            r.name,
            r.state,
            "-" if r.context is None else str(r.context),
            r.style or "?",
            r.mark or "-",
            "yes" if r.cow else "no",
            "host" if r.userns is None else "auto" if r.userns < 0 else str(r.userns),
            _uptime(r.uptime_s),
            ",".join(r.ips) or "-",
        ]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
    right = {2, 7}  # numbers

    def line(c: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(c, widths, strict=True))
        ).rstrip()

    out = [line(head), *(line(c) for c in cells)]
    out += [f"{r.name}: {r.error}" for r in rows if r.error]
    return out


def main(argv: list[str]) -> int:
    """``vserver list [--json]`` (``argv`` without the word ``list``)."""
    p = argparse.ArgumentParser(
        prog="vserver list",
        parents=[common_options()],
        description="Every configured guest: state, context, init style, addresses, "
        "mark, cow, uptime.",
    )
    p.add_argument("--json", action="store_true", help="as JSON (stable keys)")

    def run(a: argparse.Namespace, paths: Paths) -> int:
        require_root("vserver list", "the run states it reads are root's")
        rows = [describe(paths, n) for n in configured_names(paths)]
        if a.json:
            print(json.dumps({"guests": [asdict(r) for r in rows]}, indent=2))
        else:
            print("\n".join(table(rows)))
        return EXIT_OK

    return run_cli("vserver", p, run, argv)
