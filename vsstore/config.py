"""Host configuration in util-vserver's layout, with every root movable by environment.

``/etc/vservers/NAME/`` holds one guest's configuration (one entry per file; ``vdir`` is the
root tree, usually a symlink), ``/etc/vservers/.defaults/`` the host's defaults, ``/vservers/``
the guest trees and ``/vservers/.hash/`` the store.  Tests and the demo move all of it into a
temporary directory with VSERVERS_CONFDIR, VSERVERS_ROOT, VSSTORE_STATEDIR, VSSTORE_RUNDIR
and VSSTORE_LOGDIR.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True, slots=True)
class Paths:
    """The host's roots."""

    confdir: Path
    vservers_root: Path
    statedir: Path
    rundir: Path
    logdir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ if env is None else env)
        confdir = Path(env.get("VSERVERS_CONFDIR", "/etc/vservers"))
        root = env.get("VSERVERS_ROOT")
        if root is None:
            base = confdir / ".defaults" / "vdirbase"
            root = str(base.resolve()) if base.exists() else "/vservers"
        return cls(
            confdir=confdir,
            vservers_root=Path(root),
            statedir=Path(env.get("VSSTORE_STATEDIR", "/var/lib/vsstore")),
            rundir=Path(env.get("VSSTORE_RUNDIR", "/run/vsstore")),
            logdir=Path(env.get("VSSTORE_LOGDIR", "/var/log/vsstore")),
        )

    @property
    def defaults(self) -> Path:
        return self.confdir / ".defaults"

    @property
    def default_store(self) -> Path:
        return self.vservers_root / ".hash"

    @property
    def index_file(self) -> Path:
        return self.statedir / "index.sqlite"

    @property
    def host_exclude_file(self) -> Path:
        return self.defaults / "apps" / "vunify" / "exclude"


@dataclass(frozen=True, slots=True)
class Guest:
    """A guest: its name, its root tree and (if configured) its configuration directory."""

    name: str
    root: Path
    confdir: Path | None

    @property
    def exclude_file(self) -> Path | None:
        return self.confdir / "apps" / "vunify" / "exclude" if self.confdir else None


def valid_name(name: str) -> bool:
    return bool(_NAME_RE.match(name))


def resolve_guest(arg: str, paths: Paths) -> Guest:
    """A guest named on the command line: a configured name, a tree under the vservers root,
    or a path (anything with a '/')."""
    if "/" in arg:
        root = Path(arg).absolute()
        if not root.is_dir():
            raise ConfigError(f"guest path {arg}: not a directory; pass a guest's root tree")
        name = root.name or "root"
        conf = paths.confdir / name
        return Guest(name=name, root=root, confdir=conf if conf.is_dir() else None)
    if not valid_name(arg):
        raise ConfigError(f"guest name {arg!r} is not valid: use letters, digits and '._+-'")
    conf = paths.confdir / arg
    if conf.is_dir():
        vdir = conf / "vdir"
        if os.path.lexists(vdir):  # a dangling vdir is an error, never a fallback
            root = vdir.resolve()
            if not root.is_dir():
                raise ConfigError(
                    f"guest {arg!r}: its vdir {vdir} leads to {root}, which is "
                    f"not a directory; point {vdir} at the guest's root tree, "
                    f"or remove {conf} if the guest is gone"
                )
            return Guest(name=arg, root=root, confdir=conf)
        root = paths.vservers_root / arg
        if not root.is_dir():
            raise ConfigError(
                f"guest {arg!r}: its root tree {root} does not exist; create "
                f"it, link it as {vdir}, or remove {conf} if the guest is gone"
            )
        return Guest(name=arg, root=root, confdir=conf)
    root = paths.vservers_root / arg
    if root.is_dir():
        return Guest(name=arg, root=root, confdir=None)
    raise ConfigError(
        f"guest {arg!r}: no configuration in {conf} and no tree at {root}; "
        f"name a configured guest or pass a path to its root tree"
    )


def _configured_root(paths: Paths, name: str) -> str:
    """Real path of configured guest ``name``'s root tree: its ``vdir`` with every symlink
    resolved (whether or not the tree exists), else the default below the guests' root."""
    vdir = paths.confdir / name / "vdir"
    return os.path.realpath(vdir if os.path.lexists(vdir) else paths.vservers_root / name)


def deletable_guest(arg: str, paths: Paths) -> Guest:
    """The guest ``vserver NAME delete`` may remove: a configured guest's name (never a
    path, never a tree without configuration) whose root tree, every symlink of ``vdir``
    resolved, lies strictly below the real guests' root: not that root itself, not ``/``,
    not outside, not in the store or another dot directory there, and not another
    configured guest's tree (nor above or below one).  Its root may be missing (then only
    the configuration goes)."""
    if "/" in arg or not valid_name(arg):
        raise ConfigError(
            f"delete takes the name of a configured guest, not {arg!r}; a "
            f"tree without configuration is removed by hand"
        )
    conf = paths.confdir / arg
    if conf.is_symlink() or not conf.is_dir():
        why = "is a symlink" if conf.is_symlink() else "does not exist"
        raise ConfigError(
            f"guest {arg!r}: its configuration {conf} {why}; delete removes "
            f"configured guests only (a configuration directory of their own)"
        )
    base = os.path.realpath(paths.vservers_root)
    if base == "/":
        raise ConfigError(
            f"the guests' root {paths.vservers_root} is '/'; set vdirbase "
            f"(or VSERVERS_ROOT) to the directory holding the guest trees"
        )
    vdir = conf / "vdir"
    root = _configured_root(paths, arg)
    rel = os.path.relpath(root, base)
    where = f"{vdir} (leading to {root})" if os.path.lexists(vdir) else root
    if rel == "." or rel == ".." or rel.startswith("../"):
        raise ConfigError(
            f"guest {arg!r}: its root tree {where} is not below the guests' "
            f"root {base}; delete removes only a tree in there: point vdir at "
            f"{base}/{arg} (ln -sfn {base}/{arg} {vdir}), or remove the tree "
            f"by hand"
        )
    if rel.startswith("."):
        raise ConfigError(
            f"guest {arg!r}: its root tree {where} lies in {base}/"
            f"{rel.split('/')[0]} (the store or another directory of ours); "
            f"fix {vdir}"
        )
    for other in sorted(paths.confdir.iterdir()):
        if (
            other.name == arg
            or other.name.startswith(".")
            or not valid_name(other.name)
            or not other.is_dir()
        ):
            continue
        theirs = _configured_root(paths, other.name)
        if theirs == root or theirs.startswith(root + "/") or root.startswith(theirs + "/"):
            raise ConfigError(
                f"guest {arg!r}: its root tree {where} is, holds or lies in "
                f"guest {other.name}'s tree {theirs}; fix {vdir} or "
                f"{other / 'vdir'}"
            )
    return Guest(name=arg, root=Path(root), confdir=conf)


def configured_names(paths: Paths) -> list[str]:
    """The name of every guest with a configuration directory, in order (whether or not
    its root tree is there: what only needs the name, such as run state, asks this)."""
    if not paths.confdir.is_dir():
        return []
    return sorted(
        p.name
        for p in paths.confdir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and valid_name(p.name)
    )


def configured_guests(paths: Paths, broken: list[ConfigError] | None = None) -> list[Guest]:
    """Every configured guest, in name order.  One whose root tree cannot be resolved (a
    dangling ``vdir``) raises ConfigError; with ``broken`` given it is left out and its
    error appended there instead, so that one broken guest does not stop a command about
    the others (the caller says so)."""
    out = []
    for n in configured_names(paths):
        try:
            out.append(resolve_guest(n, paths))
        except ConfigError as e:
            if broken is None:
                raise
            broken.append(e)
    return out
