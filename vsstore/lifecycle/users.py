"""A guest's users, for ``vserver NAME suexec USER CMD...``: read on the host from the
guest's ``/etc/passwd`` and ``/etc/group`` with bounded pure-Python parsing, never by
running anything of the guest (no NSS, no ``getent`` there).

The files are opened through the guest tree's descriptor (``GuestTree.open_regular``: no
symlink followed, no mount crossed, regular files only); sizes, line lengths and the number
of supplementary groups are bounded, and a malformed line is skipped as the C library
would.  The user, its primary group and supplementary groups become numbers passed to the
static helper, which sets them inside the guest before the command runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vsstore.errors import ConfigError
from vsstore.safetree import GuestTree

MAX_FILE = 8 << 20  # bytes of /etc/passwd or /etc/group read
MAX_LINE = 64 << 10
MAX_GROUPS = 64  # supplementary groups handed to the helper
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel


@dataclass(frozen=True, slots=True)
class GuestUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary
    home: str


def _number(text: str) -> int | None:
    if not text.isdigit() or len(text) > 10:
        return None
    v = int(text)
    return v if v <= MAX_ID else None


def _entries(tree: GuestTree, rel: str, fields: int) -> list[list[str]]:
    """The well-formed lines of a colon-separated file of the guest (at least ``fields``
    fields); [] when it is missing."""
    try:
        fd = tree.open_regular(rel)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(
            f"cannot read {tree.where(rel)} ({e.strerror}); it must be a regular file, "
            f"not a symlink"
        ) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ConfigError(f"{tree.where(rel)}: longer than {MAX_FILE} bytes")
    out = []
    for raw in data.split(b"\n"):
        if len(raw) > MAX_LINE or raw.startswith((b"#", b"+", b"-")):
            continue
        parts = raw.decode("utf-8", errors="replace").split(":")
        if len(parts) >= fields and parts[0]:
            out.append(parts)
    return out


def lookup(root: Path | str, guest: str, spec: str) -> GuestUser:
    """The guest's user ``spec``: a name from its /etc/passwd, or a number (then the
    passwd entry with that uid if there is one, else that uid with the same gid)."""
    if not spec or len(spec) > 256 or any(c in spec for c in ":/\n\0"):
        raise ConfigError(f"suexec: {spec!r} is not a user name or number")
    with GuestTree(root, guest) as tree:
        passwd = _entries(tree, "etc/passwd", 7)
        want = _number(spec)
        entry = None
        for p in passwd:
            uid, gid = _number(p[2]), _number(p[3])
            if uid is None or gid is None:
                continue
            if (want is None and p[0] == spec) or (want is not None and uid == want):
                entry = (p[0], uid, gid, p[5] or "/")
                break
        if entry is None:
            if want is None:
                raise ConfigError(
                    f"guest {guest} has no user {spec!r} in /etc/passwd; name one it has, "
                    f"or give a number"
                )
            return GuestUser(spec, want, want, (), "/")
        name, uid, gid, home = entry
        groups: list[int] = []
        for g in _entries(tree, "etc/group", 4):
            n = _number(g[2])
            if n is None or n == gid or n in groups:
                continue
            if name in g[3].split(","):
                groups.append(n)
                if len(groups) > MAX_GROUPS:
                    raise ConfigError(
                        f"{tree.where('etc/group')}: user {name} is in more than "
                        f"{MAX_GROUPS} groups"
                    )
        return GuestUser(name, uid, gid, tuple(groups), home)
