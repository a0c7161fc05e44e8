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

from . import ns, userns
from .guestconf import GuestConfig


def bind_root(cfg: GuestConfig, source: str, userns_fd: int | None = None) -> GuestTree:
    """In a new mount namespace: the guest's root bound onto itself (a mount point for
    pivot_root) and its fstab entries mounted in it; with ``userns_fd``, each idmapped into
    the guest's user namespace (an fstab mount whose filesystem takes no idmap stays as it
    is)."""
    if userns_fd is None:
        ns.mount(source, source, None, ns.MS_BIND | ns.MS_REC)
    else:
        userns.bind_idmapped(source, userns_fd)
    tree = GuestTree(source, cfg.name)
    for e in cfg.fstab:
        mount_in(tree, e.source, e.target, e.fstype, e.flags, e.data, e.where, userns_fd)
    return tree


def mount_in(
    tree: GuestTree,
    source: str | None,
    target: str,
    fstype: str | None,
    flags: int,
    data: str,
    where: str,
    userns_fd: int | None = None,
) -> None:
    """Mount on ``target`` as the guest sees it: symlinks resolved inside its root, never
    out of it; the mount goes through an fd of what was resolved, so nothing can swap the
    path in between.  ``userns_fd``: the new mount idmapped into that user namespace
    (where its filesystem allows)."""
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
            new = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)
            try:
                ns.mount(
                    None,
                    f"/proc/self/fd/{new}",
                    None,
                    ns.MS_BIND
                    | ns.MS_REMOUNT
                    | ns.MS_RDONLY
                    | (flags & (ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)),
                    None,
                )
            finally:
                os.close(new)
        if userns_fd is not None:
            root = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)  # the new mount
            try:
                userns.idmap_mount(fd, root, userns_fd)
            finally:
                os.close(root)
    except OSError as e:
        raise ConfigError(f"{where}: cannot mount {source} on {target}: {e.strerror}") from None
    finally:
        os.close(fd)


def own_mount_ns(tree: GuestTree, in_userns: bool = False) -> GuestTree:  # pragma: no cover
    """A mount namespace of this process's own (a copy), and the tree opened again in it
    (a descriptor of the old one names mounts we can no longer mount on): through our
    working directory, which the copy carries over, never a walk of the host's path (a
    guest root in a user namespace may have no right to pass the host's directories).
    ``in_userns``: the tree mounted again on itself (userns.remount_cwd)."""
    os.fchdir(tree.fd)
    ns.unshare(ns.CLONE_NEWNS)
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
    if in_userns:
        userns.remount_cwd()
    again = GuestTree(".", tree.name)
    again.root = tree.root
    if (os.fstat(again.fd).st_dev, os.fstat(again.fd).st_ino) != (tree.dev, tree.ino):
        raise UnsafeTreeError(f"guest {tree.name}: its root changed while starting")
    tree.close()
    return again
