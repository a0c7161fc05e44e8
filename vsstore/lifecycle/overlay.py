"""The host's one cow overlay as the lifecycle uses it: guests configured with ``cow`` and
the temporary shares of ``exec --cow`` are added to it (mounted on first use), their pid
namespaces attached (the overlay tells the writing guest by nothing else), and removed
afterwards (unmounted once it serves nobody)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from vsstore.config import Paths
from vsstore.errors import (
    ConfigError,
    VsError,
)


def mountpoint(paths: Paths) -> Path:
    """The host's one overlay for guests configured with ``cow``."""
    return paths.rundir / "cow"


def add(paths: Paths, at: str, name: str, root: str) -> None:
    from cow import control

    with control.state_lock(paths, at):
        if control.is_mounted(at):
            control.add(paths, at, name, root)
        else:
            os.makedirs(at, exist_ok=True)
            control.mount(paths, at, {name: root})


def attach(paths: Paths, at: str, name: str, pid: int) -> None:
    """Tell the overlay that the processes of ``pid``'s pid namespace are guest ``name``'s:
    the overlay tells the writing guest by nothing else.  ``pid`` is held at a gate, so it
    is still the process we forked."""
    from cow import control

    fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        control.attach(paths, at, name, fd)
    finally:
        os.close(fd)


def remove(paths: Paths, at: str, name: str) -> None:
    """Stop serving the guest; unmount the overlay once it serves nobody."""
    from cow import control

    with control.state_lock(paths, at):
        if not control.is_mounted(at):
            return
        try:
            left = control.remove(paths, at, name)
        except ConfigError:
            st = control.state(paths, at) or {}
            left = {g: r for g, r in st.get("guests", {}).items() if g != name}
        if not left:
            control.umount(paths, at)


TEMP_SHARE = re.compile(r"^(?P<guest>.+)~(?P<pid>\d+)$")


def sweep_temporary(paths: Paths, cow_at: str) -> None:
    """Remove overlay shares of earlier ``exec --cow`` runs whose vserver process is gone
    (killed before it could clean up)."""
    from cow import control

    st = control.state(paths, cow_at) if control.is_mounted(cow_at) else None
    for name in list((st or {}).get("guests", {})):
        m = TEMP_SHARE.match(name)
        if m and not os.path.exists(f"/proc/{m['pid']}"):
            try:
                remove(paths, cow_at, name)
            except VsError as e:
                print(f"vserver: {e.message}", file=sys.stderr)
