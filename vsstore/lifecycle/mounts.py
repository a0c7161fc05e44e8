"""The guest's root in a mount namespace of the process entering it: bound onto itself
(a mount point for pivot_root), its fstab entries mounted on targets resolved inside it
(RESOLVE_IN_ROOT: a symlink never leads a mount out of the guest) through descriptors."""

from __future__ import annotations

import os

from vsstore.errors import (
    ConfigError,
    UnsafeTreeError,
)
from vsstore.safetree import GuestTree

from . import ns
from .guestconf import GuestConfig


def bind_root(cfg: GuestConfig, source: str) -> GuestTree:
    """In a new mount namespace: the guest's root bound onto itself (a mount point for
    pivot_root) and its fstab entries mounted in it."""
    ns.mount(source, source, None, ns.MS_BIND | ns.MS_REC)
    tree = GuestTree(source, cfg.name)
    for e in cfg.fstab:
        mount_in(tree, e.source, e.target, e.fstype, e.flags, e.data, e.where)
    return tree


def mount_in(
    tree: GuestTree,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str,
    where: str,
) -> None:
    """Mount on ``target`` as the guest sees it: symlinks resolved inside its root, never
    out of it; the mount goes through an fd of what was resolved, so nothing can swap the
    path in between."""
    try:
        fd = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise ConfigError(
            f"{where}: mount target {target} in guest {tree.name}: "
            f"{e.strerror}; create it inside the guest"
        ) from None
    try:
        remount = flags & ns.MS_RDONLY and flags & ns.MS_BIND
        ns.mount(
            source,
            f"/proc/self/fd/{fd}",
            fstype,
            flags & ~ns.MS_RDONLY if remount else flags,
            data or None,
        )
        if remount:  # a bind mount takes ro only on a remount, of the new mount itself
            os.close(fd)
            fd = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)
            ns.mount(
                None,
                f"/proc/self/fd/{fd}",
                None,
                ns.MS_BIND
                | ns.MS_REMOUNT
                | ns.MS_RDONLY
                | (flags & (ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)),
                None,
            )
    except OSError as e:
        raise ConfigError(f"{where}: cannot mount {source} on {target}: {e.strerror}") from None
    finally:
        os.close(fd)


def own_mount_ns(tree: GuestTree) -> GuestTree:  # pragma: no cover - child
    """A mount namespace of this process's own (a copy), and the tree opened again in it
    (a descriptor of the old one names mounts we can no longer mount on)."""
    ns.unshare(ns.CLONE_NEWNS)
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
    again = GuestTree(tree.root, tree.name)
    if (os.fstat(again.fd).st_dev, os.fstat(again.fd).st_ino) != (tree.dev, tree.ino):
        raise UnsafeTreeError(f"guest {tree.name}: its root changed while starting")
    tree.close()
    return again
