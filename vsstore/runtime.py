"""Runtime state shared between commands: which guest trees the cow overlay serves now.

``vscow mount`` writes ``$VSSTORE_RUNDIR/vscow/<mountpoint>.json`` (pid, mount point, guest
roots); ``vsunify`` reads it, because relinking files under a running overlay would leave
the daemon's view and the kernel's caches stale."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import Paths


def cow_state_file(paths: Paths, mountpoint: str) -> Path:
    return paths.rundir / "vscow" / (mountpoint.strip("/").replace("/", "_") + ".json")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path and " - fuse.vscow " in line for line in f)


def cow_served(paths: Paths) -> dict[str, str]:
    """Real path of every guest root a live overlay serves -> its mount point."""
    out: dict[str, str] = {}
    d = paths.rundir / "vscow"
    if not d.is_dir():
        return out
    for f in d.glob("*.json"):
        try:
            state = json.loads(f.read_text())
            pid, at, guests = int(state["pid"]), str(state["mountpoint"]), state["guests"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not os.path.exists(f"/proc/{pid}") or not _mounted(at):
            continue  # a stale record: the overlay is gone
        for root in guests.values():
            out[os.path.realpath(root)] = at
    return out
