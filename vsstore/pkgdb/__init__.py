"""Package databases of a guest, read on the host: which files are config files (never to
be unified) and which files packages own.  One reader per package manager; see base.py for
the rules every reader follows."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from ..excludes import Rule, literal_rule
from ..names import shown
from ..safetree import GuestTree
from .base import Budget, Limits, PackageFiles, PkgDbError

__all__ = ["Limits", "PackageFiles", "PkgDbError", "config_rules", "read_all"]

log = logging.getLogger("vsstore")

MANAGERS = ("dpkg", "rpm", "apk", "pacman")
REASON = {
    "dpkg": "dpkg conffile",
    "rpm": "rpm %config",
    "apk": "apk protected path",
    "pacman": "pacman backup file",
}
# Where distributions keep configuration.  A guest whose database cannot be read gets
# these excluded whatever else is configured (the conservative fallback).
CONFIG_DIRS = (
    "/etc",
    "/usr/etc",
    "/usr/local/etc",
    "/var/lib/dpkg",
    "/var/lib/rpm",
    "/usr/lib/sysimage/rpm",
    "/lib/apk/db",
    "/var/lib/pacman",
)


def _reader(manager: str) -> Callable[[Budget], PackageFiles | None]:
    read: Callable[[Budget], PackageFiles | None] = importlib.import_module(
        f"{__name__}.{manager}"
    ).read
    return read


def read_all(
    tree: GuestTree,
    limits: Limits | None = None,
    want_owned: bool = True,
) -> tuple[list[PackageFiles], list[tuple[str, str]]]:
    """Every database the guest has, read; and (manager, message) for each that failed.
    ``want_owned=False``: only config files are needed, owned-file lists may be skipped."""
    budget = Budget(tree, limits or Limits(), want_owned)
    found: list[PackageFiles] = []
    failed: list[tuple[str, str]] = []
    for manager in MANAGERS:
        try:
            res = _reader(manager)(budget)
        except PkgDbError as e:
            failed.append((manager, e.message))
            continue
        except (
            RecursionError,
            MemoryError,
            ValueError,
            KeyError,
            IndexError,
            TypeError,
            OverflowError,
            UnicodeError,
        ) as e:  # a reader bug must not sink the run
            failed.append(
                (
                    manager,
                    f"guest '{shown(tree.name)}': {manager} database: "
                    f"unreadable ({type(e).__name__}: {shown(str(e))})",
                )
            )
            continue
        if res is not None:
            found.append(res)
    return found, failed


def config_rules(tree: GuestTree, limits: Limits | None = None) -> tuple[list[Rule], list[str]]:
    """Exclude rules for the guest's config files, and warnings.  A database that cannot
    be read yields the conservative fallback (CONFIG_DIRS) and a warning naming it."""
    found, failed = read_all(tree, limits, want_owned=False)
    rules: list[Rule] = []
    warnings: list[str] = []
    for manager, message in failed:
        warnings.append(f"{message}; excluding {', '.join(CONFIG_DIRS)} of this guest instead")
        rules += [literal_rule(d, f"fallback: unreadable {manager} database") for d in CONFIG_DIRS]
    for res in found:
        reason = REASON[res.manager]
        rules += [
            literal_rule(path, f"{reason} ({pkg})") for path, pkg in sorted(res.config.items())
        ]
    return rules, warnings
