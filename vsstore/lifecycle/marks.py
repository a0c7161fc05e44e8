"""util-vserver's marks: which guests start at boot, and in which order.

``/etc/vservers/NAME/apps/init/mark`` names the guest's mark (one word, e.g. ``default``);
``apps/init/depends`` the guests to start before it, one name per line (``#`` comments).
``vserver-start --mark MARK [-j N]`` starts every guest of the mark and, first, every guest
they depend on (marked or not, as util-vserver's start-vservers does), N at a time: a
guest starts once all it depends on runs; one whose dependency fails to start (or is not
configured) is not started, and says so, while the others go on.  ``vserver-stop --mark
MARK`` stops the same guests in the reverse order: a guest once everything that depends
on it has stopped.  A guest already running (start) or stopped (stop) counts as done.  A
dependency cycle is a configuration error naming it, before anything starts; a guest whose
mark or depends file cannot be read is left out (said), never keeping the others down.

Each guest is started or stopped by its own ``vserver NAME start|stop`` process (the
lifecycle forks its monitor; that is no business for a threaded Python), so hooks, locks
and messages are the same as by hand; their output is shown per guest when it is done.
Exit code: 0 when every guest is where it should be, 6 otherwise (named on stderr).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from vsstore.clitools import common_options, require_root, run_cli
from vsstore.config import Paths, configured_names, valid_name
from vsstore.errors import EXIT_OK, EXIT_PARTIAL, ConfigError
from vsstore.runtime import running

from .guestconf import _lines


def mark_of(paths: Paths, name: str) -> str | None:
    """The guest's mark (``apps/init/mark``), or None."""
    p = paths.confdir / name / "apps" / "init" / "mark"
    lines = _lines(p)
    if not lines:
        return None
    if len(lines) > 1 or not valid_name(lines[0]):
        raise ConfigError(f"{p}: {lines[0]!r}...: write one mark, a word such as 'default'")
    return lines[0]


def depends_of(paths: Paths, name: str) -> list[str]:
    """The guests ``name`` depends on (``apps/init/depends``), in file order."""
    p = paths.confdir / name / "apps" / "init" / "depends"
    out = []
    for dep in _lines(p) or []:
        if not valid_name(dep):
            raise ConfigError(f"{p}: {dep!r} is not a guest name; write one name per line")
        if dep != name and dep not in out:
            out.append(dep)
    return out


def guests_with_mark(paths: Paths, mark: str, broken: list[ConfigError] | None = None) -> list[str]:
    """Every configured guest whose mark is ``mark``, in name order.  A guest whose mark
    file cannot be read raises ConfigError; with ``broken`` given, it is left out and the
    error appended there instead (one broken guest never keeps the others down)."""
    out = []
    for n in configured_names(paths):
        try:
            if mark_of(paths, n) == mark:
                out.append(n)
        except ConfigError as e:
            if broken is None:
                raise
            broken.append(e)
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """The guests of a run and their order: ``depends[n]``, the configured guests ``n``
    needs first; ``missing[n]``, those it names that are not configured."""

    guests: list[str]
    depends: dict[str, list[str]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # unreadable depends: why

    def dependants(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.guests}
        for n, deps in self.depends.items():
            for d in deps:
                out[d].append(n)
        return out


def plan(paths: Paths, roots: list[str]) -> Plan:
    """``roots`` and, transitively, what they depend on; a cycle is a ConfigError."""
    known = set(configured_names(paths))
    depends: dict[str, list[str]] = {}
    missing: dict[str, list[str]] = {}
    broken: dict[str, str] = {}
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in depends:
            continue
        try:
            deps = depends_of(paths, n)
        except ConfigError as e:  # this guest cannot start; the others can
            depends[n], broken[n] = [], e.message
            continue
        depends[n] = [d for d in deps if d in known]
        if len(depends[n]) != len(deps):
            missing[n] = [d for d in deps if d not in known]
        todo.extend(depends[n])
    _check_cycles(paths, depends)
    return Plan(sorted(depends), depends, missing, broken)


def _check_cycles(paths: Paths, depends: dict[str, list[str]]) -> None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(depends, WHITE)
    for start in sorted(depends):
        if colour[start] != WHITE:
            continue
        stack: list[tuple[str, int]] = [(start, 0)]
        colour[start] = GREY
        while stack:
            n, i = stack[-1]
            if i == len(depends[n]):
                colour[n] = BLACK
                stack.pop()
                continue
            stack[-1] = (n, i + 1)
            d = depends[n][i]
            if colour[d] == GREY:
                path = [m for m, _ in stack]
                cycle = [*path[path.index(d) :], d]
                raise ConfigError(
                    f"the guests depend on each other in a circle: {' -> '.join(cycle)}; "
                    f"remove one of these from "
                    f"{paths.confdir}/{{{','.join(cycle[:-1])}}}/apps/init/depends"
                )
            if colour[d] == WHITE:
                colour[d] = GREY
                stack.append((d, 0))


# -- running a plan ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    text: str  # what the command said, or why it was not run


WAIT = "wait"  # _blocked: not yet


def _blocked(
    p: Plan, action: str, n: str, before: list[str], results: dict[str, Outcome]
) -> str | None:
    """Why guest ``n`` will never be started (a text), WAIT while what comes before it is
    not done, None when it can go."""
    if action == "start" and n in p.broken:
        return f"not started: {p.broken[n]}"
    if action == "start" and p.missing.get(n):
        return f"not started: it depends on {', '.join(p.missing[n])}, which is not configured"
    if any(b not in results for b in before):
        return WAIT
    failed = [b for b in before if not results[b].ok]
    if action == "start" and failed:
        return f"not started: it depends on {', '.join(failed)}, which did not start"
    return None


def schedule(
    p: Plan,
    action: str,
    jobs: int,
    do: Callable[[str], Outcome],
    done: Callable[[str, Outcome], None] = lambda n, o: None,
) -> dict[str, Outcome]:
    """Run ``do(name)`` for every guest of the plan, at most ``jobs`` at a time: for
    "start" a guest once all it depends on succeeded (never, if one failed), for "stop"
    once everything depending on it is done (whether that succeeded or not: holding a
    dependency back would not help).  ``done`` is told of each outcome as it comes."""
    before = dict(p.depends) if action == "start" else p.dependants()
    results: dict[str, Outcome] = {}
    busy: dict[Future[Outcome], str] = {}

    def finish(n: str, o: Outcome) -> None:
        results[n] = o
        done(n, o)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while len(results) < len(p.guests):
            settled = True
            while settled:  # again while a pass settles a guest: that may settle others
                settled = False
                for n in p.guests:
                    if n in results or n in busy.values():
                        continue
                    why = _blocked(p, action, n, before[n], results)
                    if why is None and len(busy) < max(1, jobs):
                        busy[pool.submit(do, n)] = n
                    elif why not in (None, WAIT):
                        finish(n, Outcome(False, why))
                        settled = True
            if len(results) == len(p.guests):
                break
            if not busy:  # cannot happen with a plan without cycles
                raise AssertionError("no guest can go on")
            finished, _ = wait(list(busy), return_when=FIRST_COMPLETED)
            for f in finished:
                n = busy.pop(f)
                try:
                    finish(n, f.result())
                except Exception as e:  # noqa: BLE001 - said, the others go on
                    finish(n, Outcome(False, f"{type(e).__name__}: {e}"))
    return results


def _vserver(paths: Paths, action: str, debug: bool) -> Callable[[str], Outcome]:
    """``do`` for ``schedule``: ``vserver NAME start|stop`` in a process of its own."""

    def do(name: str) -> Outcome:
        st = running(paths, name)
        if action == "start" and st is not None:
            return Outcome(True, "already running")
        if action == "stop" and st is None:
            return Outcome(True, "not running")
        argv = [sys.executable, "-m", "vsstore.lifecycle.cli", *(["--debug"] if debug else [])]
        p = subprocess.run(
            [*argv, name, action],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        text = p.stdout.strip()
        if p.returncode != 0 and not text:
            text = f"vserver {name} {action} exited {p.returncode}"
        return Outcome(p.returncode == 0, text or ("started" if action == "start" else "stopped"))

    return do


def _main(prog: str, action: str, argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        parents=[common_options()],
        description=f"{action.capitalize()} every guest of a mark (apps/init/mark), in the "
        f"order of their apps/init/depends (util-vserver's {prog}).",
    )
    p.add_argument("--mark", "-m", required=True, help="the mark, e.g. default")
    p.add_argument(
        "-j",
        dest="jobs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="at most N guests at a time (default: the number of CPUs)",
    )

    def run(a: argparse.Namespace, paths: Paths) -> int:
        require_root(prog, "it starts and stops guests")
        if not valid_name(a.mark):
            raise ConfigError(f"--mark {a.mark!r}: a mark is a word such as 'default'")
        if a.jobs < 1:
            raise ConfigError(f"-j {a.jobs}: give 1 or more")
        broken: list[ConfigError] = []
        roots = guests_with_mark(paths, a.mark, broken)
        for e in broken:
            print(f"{prog}: warning: left out: {e.message}", file=sys.stderr)
        if not roots and broken:
            return EXIT_PARTIAL
        if not roots:
            print(
                f"{prog}: no guest has mark {a.mark} (write it to "
                f"{paths.confdir}/NAME/apps/init/mark)"
            )
            return EXIT_OK
        pl = plan(paths, roots)

        def done(name: str, o: Outcome) -> None:
            for line in o.text.splitlines() or [""]:
                print(f"{name}: {line}", file=sys.stdout if o.ok else sys.stderr, flush=True)

        results = schedule(pl, action, a.jobs, _vserver(paths, action, a.debug), done)
        bad = [n for n in pl.guests if not results[n].ok]
        verb = "started" if action == "start" else "stopped"
        if broken and not bad:
            return EXIT_PARTIAL
        if bad:
            print(
                f"{prog}: mark {a.mark}: {len(pl.guests) - len(bad)} of {len(pl.guests)} "
                f"guests {verb}; not {verb}: {', '.join(bad)}",
                file=sys.stderr,
            )
            return EXIT_PARTIAL
        if not a.quiet:
            print(f"{prog}: mark {a.mark}: {len(pl.guests)} guests {verb}")
        return EXIT_OK

    return run_cli(prog, p, run, argv)


def start_main(argv: list[str] | None = None) -> int:
    """vserver-start --mark MARK [-j N]"""
    return _main("vserver-start", "start", argv)


def stop_main(argv: list[str] | None = None) -> int:
    """vserver-stop --mark MARK [-j N]"""
    return _main("vserver-stop", "stop", argv)
