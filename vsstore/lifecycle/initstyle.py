"""Which init a guest's tree has, for ``build`` to write ``apps/init/style``.

The guest's ``/sbin/init`` is resolved the way the guest itself would resolve it (symlinks
followed inside its root, never out: RESOLVE_IN_ROOT), opened as a path first and read
only if it is a regular file, so a hostile tree can neither lead us out of it nor make us
open a FIFO or a device.  Nothing of the guest is executed.

- a name ending in ``systemd`` (Debian's ``/sbin/init -> /lib/systemd/systemd``), or a
  binary that is systemd: ``systemd``
- sysvinit's binary: ``sysv`` (its ``/etc/init.d/rc 3`` runs under a pid 1 of ours, as
  util-vserver did)
- busybox: ``plain`` (busybox init runs ``/etc/inittab``, or ``/etc/init.d/rcS`` without
  one, and stops on SIGTERM)
- any other program: ``plain``; no ``/sbin/init`` at all: ``none``
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from vsstore.safetree import GuestTree

SCAN = 8 << 20  # bytes of the binary searched for a marker (systemd's is about 100 KiB)
MARKERS = (  # (style, what in the binary says so), first match wins
    ("plain", b"BusyBox v"),
    ("systemd", b"systemd.unit="),
    ("sysv", b"INIT_VERSION"),
)


@dataclass(frozen=True, slots=True)
class Detected:
    style: str
    why: str  # for build's one line: "/sbin/init -> /lib/systemd/systemd"


def detect(tree: GuestTree) -> Detected:
    """The init style of the guest ``tree`` (see the module's docstring)."""
    try:
        ref = tree.open_in_root("sbin/init", os.O_PATH)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return Detected("none", "no /sbin/init")
        raise
    try:
        target = _inside(tree, os.readlink(f"/proc/self/fd/{ref}"))
        st = os.fstat(ref)
        if not stat.S_ISREG(st.st_mode):
            return Detected("none", f"/sbin/init -> {target} is not a regular file")
        if os.path.basename(target) == "systemd":
            return Detected("systemd", f"/sbin/init -> {target}")
        fd = os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            head = os.read(fd, SCAN)
        finally:
            os.close(fd)
    finally:
        os.close(ref)
    for style, marker in MARKERS:
        if marker in head:
            return Detected(style, f"/sbin/init -> {target} ({marker.decode().strip()})")
    return Detected("plain", f"/sbin/init -> {target}")


def _inside(tree: GuestTree, host_path: str) -> str:
    """The guest's view of a path the host's /proc shows for a descriptor in the tree."""
    root = os.readlink(f"/proc/self/fd/{tree.fd}")
    if host_path == root:
        return "/"
    if host_path.startswith(root.rstrip("/") + "/"):
        return host_path[len(root.rstrip("/")) :]
    return host_path
