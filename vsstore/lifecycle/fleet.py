"""Package commands over many guests: ``vapt-get``, ``vrpm`` and ``vserver ... pkg`` with
``--all``, ``--running`` or ``--mark MARK`` instead of a guest's name.

Each guest selected runs the command through the overlay in turn (``exec --cow``), then
ONE vsunify run covers every guest touched together with the other configured guests (so
that what is now the same in two upgraded guests is shared again), instead of a run per
guest.  The follow-up run waits for the vsunify lock (a nightly run may hold it), saying
so, up to ``UNIFY_LOCK_WAIT`` seconds.

A guest's mark is util-vserver's ``apps/init/mark`` (one word, e.g. ``default``), read by
``marks`` as ``vserver-start --mark`` reads it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from unify import api as unify_api
from vsstore.config import Guest, Paths, configured_guests
from vsstore.errors import EXIT_OK, EXIT_PARTIAL, ConfigError, VsError
from vsstore.names import shown
from vsstore.runtime import cow_served, running

from . import guestconf, marks
from .entering import run_cow

UNIFY_LOCK_WAIT = float(os.environ.get("VSSTORE_UNIFY_LOCK_WAIT", "600"))


@dataclass(frozen=True, slots=True)
class Selection:
    """Which guests a fleet command is for (at most one of the three)."""

    all: bool = False
    running: bool = False
    mark: str | None = None

    def __bool__(self) -> bool:
        return self.all or self.running or self.mark is not None

    @property
    def text(self) -> str:
        return "--all" if self.all else "--running" if self.running else f"--mark {self.mark}"


def select(paths: Paths, sel: Selection) -> list[Guest]:
    """The configured guests ``sel`` names, in name order; one whose tree cannot be found is
    left out with a warning (it never stands in the way of the others)."""
    broken: list[ConfigError] = []
    guests = configured_guests(paths, broken)
    for e in broken:
        print(f"vserver: warning: left out: {e.message}", file=sys.stderr)
    if sel.running:
        guests = [g for g in guests if running(paths, g.name) is not None]
    elif sel.mark is not None:
        unreadable: list[ConfigError] = []
        marked = set(marks.guests_with_mark(paths, sel.mark, unreadable))
        for e in unreadable:
            print(f"vserver: warning: left out: {e.message}", file=sys.stderr)
        guests = [g for g in guests if g.name in marked]
    if not guests:
        raise ConfigError(
            f"{sel.text}: no guest "
            + (
                "runs"
                if sel.running
                else f"has the mark {sel.mark!r} (apps/init/mark)"
                if sel.mark is not None
                else f"is configured in {paths.confdir}"
            )
        )
    return guests


def vsunify(
    paths: Paths, guests: list[Guest], quiet: bool = False, wait: float = UNIFY_LOCK_WAIT
) -> int:
    """A vsunify run through its Python API; its exit code (an error is said, not raised:
    what came before it, a build or a package upgrade, has succeeded).  It waits up to
    ``wait`` seconds for the vsunify lock."""
    try:
        r = unify_api.unify(paths, guests, lock_wait=wait)
    except VsError as e:
        print(f"vsunify: error: {e.message}", file=sys.stderr)
        return e.exit_code
    if not quiet:
        print(r.line)
    return r.code


def unify_after(paths: Paths, names: list[str]) -> int:
    """One incremental vsunify run of these guests together with every other configured
    guest they can be compared with (not served by a running overlay), so files that are
    now the same as another guest's are shared again at once."""
    served = cow_served(paths)
    broken: list[ConfigError] = []
    guests = [g for g in configured_guests(paths, broken) if os.path.realpath(g.root) not in served]
    for e in broken:
        print(f"vserver: warning: left out of vsunify: {e.message}", file=sys.stderr)
    ours = {g.name for g in guests}
    for name in names:
        if name not in ours:
            print(
                f"vserver: {name} runs through the cow overlay; its files are unified when "
                f"it is stopped (vsunify run {name})",
                file=sys.stderr,
            )
    if not any(n in ours for n in names):
        return EXIT_OK
    return vsunify(paths, guests, quiet=True)


def run_all(
    paths: Paths,
    guests: list[Guest],
    argv_for: Callable[[Guest], list[str]],
    unify: bool = True,
) -> int:
    """The package command in each guest through the overlay, one after the other (a
    guest that fails does not stop the others), then one vsunify over those that
    succeeded.  Exit 0 when every guest succeeded; when some failed, 6 (partial), or the
    failure's code when all failed; each guest's outcome is said on stderr."""
    done, failed = [], []
    code = EXIT_OK
    for g in guests:
        try:
            argv = argv_for(g)  # pkg: from the guest's package manager, which may be none
            print(f"vserver: {shown(g.name)}: {' '.join(argv)}", file=sys.stderr, flush=True)
            c = run_cow(paths, guestconf.load(g), argv)
        except VsError as e:
            print(f"vserver: {shown(g.name)}: error: {e.message}", file=sys.stderr)
            c = e.exit_code
        if c == EXIT_OK:
            done.append(g.name)
        else:
            failed.append(f"{g.name} (exit {c})")
            code = c
    if failed:
        print(
            f"vserver: the command failed in {len(failed)} of {len(guests)} guests: "
            + ", ".join(failed),
            file=sys.stderr,
        )
    if done and unify:
        ucode = unify_after(paths, done)
        if ucode != EXIT_OK:
            print(
                f"vserver: the package commands succeeded; vsunify afterwards exited {ucode}",
                file=sys.stderr,
            )
    if not failed:
        return EXIT_OK
    return EXIT_PARTIAL if done else code
