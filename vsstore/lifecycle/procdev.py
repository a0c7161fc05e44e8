"""/proc and /dev of a starting guest: /proc with the kernel's sensitive files masked and
its system parts read-only, a minimal /dev on tmpfs (null, zero, full, random, urandom, tty,
ptmx, a devpts instance of its own, shm), mounted through descriptors resolved in the
guest's tree."""

from __future__ import annotations

import os
import stat

from vsstore.errors import (
    UnsafeTreeError,
)
from vsstore.safetree import GuestTree

from . import mounts, ns
from .guestconf import GuestConfig

DEVICES = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
]


DEV_LINKS = [
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
]


PROC_MASKED = [
    "kcore",
    "keys",
    "sysrq-trigger",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "kallsyms",
    "kmsg",
]


PROC_READONLY = ["sys", "irq", "bus", "fs"]


def mount_proc_and_dev(cfg: GuestConfig, tree: GuestTree) -> None:  # pragma: no cover
    """For a process in the guest's pid namespace and a mount namespace of its own: /proc
    (masked) and a minimal /dev in the tree, through descriptors resolved inside it."""
    for d in ("proc", "dev"):
        try:
            fd = tree.open_beneath(d, os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
        except FileNotFoundError:
            os.mkdir(d, 0o755, dir_fd=tree.fd)
        except OSError as e:
            raise UnsafeTreeError(
                f"/{d} in guest {cfg.name}: {e.strerror} (a symlink or "
                f"not a directory?); make it a plain directory"
            ) from None
    mounts.mount_in(
        tree, "proc", "/proc", "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC, "", "/proc"
    )
    proc = tree.open_in_root("proc", os.O_PATH | os.O_DIRECTORY)
    for name in PROC_MASKED:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=proc)
        except OSError:
            continue
        ns.mount("/dev/null", f"/proc/self/fd/{fd}", None, ns.MS_BIND)
        os.close(fd)
    for name in PROC_READONLY:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=proc)
        except OSError:
            continue
        ns.mount(f"/proc/self/fd/{fd}", f"/proc/self/fd/{fd}", None, ns.MS_BIND | ns.MS_REC)
        os.close(fd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=proc)  # the bind
        ns.mount(
            None,
            f"/proc/self/fd/{fd}",
            None,
            ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC,
        )
        os.close(fd)
    os.close(proc)
    mounts.mount_in(
        tree, "tmpfs", "/dev", "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "mode=755,size=64k", "/dev"
    )
    dev = tree.open_in_root("dev", os.O_RDONLY | os.O_DIRECTORY)
    for name, major, minor in DEVICES:
        if cfg.userns is None:
            os.mknod(name, 0o666 | 0o020000, os.makedev(major, minor), dir_fd=dev)
            os.chmod(name, 0o666, dir_fd=dev)
        else:  # no mknod in a user namespace: the host's node bound onto an empty file
            _bind_host_node(dev, name, major, minor)
    for name, target in DEV_LINKS:
        os.symlink(target, name, dir_fd=dev)
    for d in ("pts", "shm"):
        os.mkdir(d, 0o755, dir_fd=dev)
    os.close(dev)
    mounts.mount_in(
        tree,
        "devpts",
        "/dev/pts",
        "devpts",
        ns.MS_NOSUID | ns.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620,gid=5",
        "/dev/pts",
    )
    mounts.mount_in(
        tree, "shm", "/dev/shm", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, "mode=1777", "/dev/shm"
    )


def _bind_host_node(dev: int, name: str, major: int, minor: int) -> None:  # pragma: no cover
    """The host's /dev/NAME bound over a new empty file NAME in ``dev``, once it is checked
    to be the character device it should be (the host's /dev, not the guest's)."""
    src = os.open(f"/dev/{name}", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(src)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(major, minor):
            raise UnsafeTreeError(f"the host's /dev/{name} is not the device {major}:{minor}")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666, dir_fd=dev)
        try:
            ns.mount(f"/proc/self/fd/{src}", f"/proc/self/fd/{fd}", None, ns.MS_BIND)
        finally:
            os.close(fd)
    finally:
        os.close(src)
