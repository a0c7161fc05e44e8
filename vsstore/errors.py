"""Errors that reach the user: each carries a one-line message and a documented exit code.

The CLIs print ``message`` without a traceback (``--debug`` shows it) and exit with
``exit_code``.  Codes are stable, because monitoring keys on them.
"""

from __future__ import annotations

import errno
import os

from .names import shown

# Exit codes (documented in README.md; keep both in step).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: unexpected exception
EXIT_USAGE = 2  # bad command line (argparse's own code)
EXIT_CONFIG = 3  # bad configuration or arguments naming things that do not work
EXIT_UNSAFE = 4  # a guest tree is unsafe to work on
EXIT_BUSY = 5  # another run holds the lock
EXIT_PARTIAL = 6  # finished, but some files were skipped (see the errors count)
EXIT_UNSUPPORTED = 7  # this kernel/filesystem/privilege lacks something needed
EXIT_STATE = 8  # the guest is not in the state the command needs (running/stopped)
EXIT_NOSPACE = 9  # a filesystem we must write to is full (the index's, the guests')
EXIT_NOTROOT = 10  # the command needs root and was run by another user
EXIT_HOOK = 11  # an admin's hook script (scripts/pre-start, ...) failed: the guest did not start
EXIT_NOTGUEST = 12  # a path given as a guest is neither a configured guest nor under the root

NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class VsError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(VsError):
    """Bad configuration, argument or input file; the message names it and the fix."""

    exit_code = EXIT_CONFIG


class UnsafeTreeError(VsError):
    """A guest tree contains something we refuse to go through (symlink, other fs, ...)."""

    exit_code = EXIT_UNSAFE


class BusyError(VsError):
    """Another process holds the lock."""

    exit_code = EXIT_BUSY


class UnsupportedError(VsError):
    """The kernel, filesystem or our privileges lack a needed feature."""

    exit_code = EXIT_UNSUPPORTED


class StateError(VsError):
    """The guest is running where it must be stopped, or the other way round."""

    exit_code = EXIT_STATE


class NoSpaceError(VsError):
    """A filesystem we must write to is full (or a quota is reached); the message names it
    and says to free space there."""

    exit_code = EXIT_NOSPACE

    @classmethod
    def on(cls, path: str | os.PathLike[str], what: str, after: str = "") -> NoSpaceError:
        """``no space left on FS for WHAT: free space on FS and run again[; AFTER]``, FS
        being the mount point of ``path``."""
        fs = shown(mount_point(path))
        return cls(
            f"no space left on {fs} for {what}: free space on {fs} and run again"
            + (f"; {after}" if after else "")
        )


class NotRootError(VsError):
    """The command needs root (namespaces, guests' trees, immutable flags, the host's run
    state) and was run by another user."""

    exit_code = EXIT_NOTROOT


def mount_point(path: str | os.PathLike[str]) -> str:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    p = os.path.realpath(path)
    while not os.path.exists(p) and p != "/":
        p = os.path.dirname(p)
    dev = os.stat(p).st_dev
    while p != "/":
        parent = os.path.dirname(p)
        if os.stat(parent).st_dev != dev:
            break
        p = parent
    return p


class HookError(VsError):
    """A hook script of the guest's configuration (``scripts/pre-start``, ...) failed; the
    message names it."""

    exit_code = EXIT_HOOK


class NotAGuestError(VsError):
    """A path named as a guest is no configured guest's tree and not under the guests' root
    (``vsunify run /usr``): refused unless ``--force-path``; the message says why."""

    exit_code = EXIT_NOTGUEST


# -- errors across a fork's pipe ------------------------------------------------------------

ERRORS: dict[str, type[VsError]] = {
    c.__name__: c
    for c in (
        VsError,
        ConfigError,
        UnsafeTreeError,
        BusyError,
        UnsupportedError,
        StateError,
        NoSpaceError,
        NotRootError,
        HookError,
        NotAGuestError,
    )
}


def to_wire(e: BaseException) -> dict[str, str]:
    """What a forked child reports of an error: its class (by name, from ``ERRORS``) and
    its message.  Anything else is a bug: it travels as VsError (exit 1)."""
    cls = type(e).__name__ if isinstance(e, VsError) and type(e).__name__ in ERRORS else "VsError"
    return {"error": getattr(e, "message", None) or str(e), "class": cls}


def from_wire(msg: dict[str, str], prefix: str = "") -> VsError:
    """The error a child reported with ``to_wire``, as its own class again."""
    return ERRORS.get(msg.get("class", ""), VsError)(prefix + msg.get("error", "unknown"))
