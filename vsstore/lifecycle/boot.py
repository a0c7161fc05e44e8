"""What a guest of style ``systemd`` gets to boot: systemd's container interface, as
systemd-nspawn prepares it (systemd's docs/CONTAINER_INTERFACE.md).

- ``container=vserver`` in init's environment (every style has it);
- /run and /tmp as tmpfs (unless the guest's fstab mounts them);
- /sys as sysfs, read-only (the guest's own network namespace's view);
- a cgroup namespace whose root is the guest's cgroup, and that cgroup's cgroup2 tree
  mounted at /sys/fs/cgroup, writable: systemd makes its slices and scopes in it.  On a
  host with v1 controllers and an empty cgroup2 tree beside them (hybrid), the guest gets
  a directory of its own in that cgroup2 tree (``vserver-NAME``, next to the v1 ones):
  systemd 252 runs on cgroup2 without controllers, and the v1 cgroup still limits and
  accounts the guest.  A host without cgroup2 (pure v1) cannot boot systemd guests:
  start says so (systemd would need the host's v1 layout, and systemd 256 refuses v1);
- /dev/console a pty of the guest's own devpts (every style; lifecycle.console);
- /etc/machine-id: written (a new random id) when empty or missing, as
  systemd-machine-id-setup does on a first boot; systemd could only bind a transient one
  over it with CAP_SYS_ADMIN, which guests do not have.

No capability is added: without a user namespace CAP_SYS_ADMIN, CAP_SYS_BOOT and friends
would be escapes.  Units that insist on mounts of their own fail (README: Booting a
guest), and ``systemctl is-system-running`` may say ``degraded``.  systemd's shutdown
ends in reboot(2), which without CAP_SYS_BOOT fails; systemd-shutdown then exits ("Exiting
container"), which ends the guest's pid namespace.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from vsstore.errors import UnsafeTreeError, UnsupportedError
from vsstore.safetree import GuestTree, open_regular_at

from . import cgroups, mounts, ns
from .guestconf import GuestConfig

CLONE_NEWCGROUP = 0x02000000
CGROUP2_KEY = "cgroup2"  # the guest's cgroup2 directory on a hybrid host, in cgroup_dirs
TMPFS = (  # (target, options): nspawn's, and the /run/lock Debian's systemd 252 insists on
    ("/run", "mode=755,size=20%"),
    ("/run/lock", "mode=1777,size=5m"),
    ("/tmp", "mode=1777,size=20%"),
)


def boots(cfg: GuestConfig) -> bool:
    return cfg.style == "systemd"


def cgroup2_dir(cfg: GuestConfig, cg: cgroups.GuestCgroup | None) -> Path:
    """The guest's cgroup2 directory, the root of its cgroup namespace: on a cgroup v2
    host ``guest`` below its cgroup (whose limits stay out of the guest's reach: a
    namespace's root cgroup's own files would be writable from inside unless the host
    mounts cgroup2 with nsdelegate); on a hybrid host ``vserver-NAME`` beside our own
    cgroup in the host's cgroup2 tree.  UnsupportedError on a host without cgroup2."""
    if cg is not None and "unified" in cg.dirs:
        return cg.dirs["unified"] / "guest"
    mine, root = _own_cgroup2()
    if root is None or mine is None:
        raise UnsupportedError(
            f"guest {cfg.name}: style systemd needs cgroup v2, and this host mounts "
            f"cgroup v1 only; mount cgroup2 (e.g. at /sys/fs/cgroup/unified, systemd's "
            f"'hybrid' layout) or write another style to apps/init/style"
        )
    return root / mine.lstrip("/") / f"vserver-{cfg.name}"


def remove_cgroup2(d: Path) -> None:
    """End what is in the guest's cgroup2 directory and remove it (a start undone)."""
    g = cgroups.GuestCgroup({CGROUP2_KEY: d})
    g.kill()
    g.remove()


def _own_cgroup2() -> tuple[str | None, Path | None]:
    """Our cgroup2 path (from /proc/self/cgroup) and the host's cgroup2 mount point."""
    mine = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctls, path = line.split(":", 2)
        if hid == "0" and ctls == "":
            mine = path
    root = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] == ["cgroup2"]:
            root = Path(left.split()[4])
            break
    return mine, root


def make_cgroup2(d: Path) -> None:
    try:
        d.mkdir()
    except FileExistsError:
        cgroups.GuestCgroup({CGROUP2_KEY: d}).remove()  # a crash's leftover: empty it
        d.mkdir()


def delegate_cgroup2(d: Path, uid: int, gid: int) -> None:
    """The guest's cgroup2 directory handed to its root in a user namespace (host ids
    ``uid``/``gid``): the directory and the files a manager writes to create and fill
    sub-groups (systemd's delegation contract), never the limits set on it from above."""
    os.chown(d, uid, gid)
    for f in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
        try:
            os.chown(d / f, uid, gid)
        except FileNotFoundError:
            pass


def unshare_cgroup() -> None:  # pragma: no cover - in the forked setup
    """The guest's cgroup namespace: made once this process is in the guest's cgroups, so
    its root is theirs and init, forked next, sees itself at "/"."""
    ns.unshare(CLONE_NEWCGROUP)


def prepare(cfg: GuestConfig, tree: GuestTree) -> None:  # pragma: no cover - in init
    """In init's mount namespace, after /proc and /dev: tmpfs on /run and /tmp, /sys
    read-only with the guest's cgroup2 at /sys/fs/cgroup, and a machine-id."""
    own = {e.target.rstrip("/") for e in cfg.fstab}
    for target, opts in TMPFS:
        if target not in own:
            _need_dir(tree, target, cfg.name)
            mounts.mount_in(
                tree, "tmpfs", target, "tmpfs", ns.MS_NOSUID | ns.MS_NODEV, opts, target
            )
    _need_dir(tree, "/sys", cfg.name)
    mounts.mount_in(
        tree,
        "sysfs",
        "/sys",
        "sysfs",
        ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC,
        "",
        "/sys",
    )
    mounts.mount_in(
        tree,
        "cgroup2",
        "/sys/fs/cgroup",
        "cgroup2",
        ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC,
        "",
        "/sys/fs/cgroup",
    )
    machine_id(tree)


def _need_dir(tree: GuestTree, target: str, name: str) -> None:
    """``target`` exists in the tree as a plain directory (made if missing; its parent is
    resolved inside the root, and may be a mount of ours, as /run is for /run/lock)."""
    head, _, last = target.strip("/").rpartition("/")
    pfd = tree.open_in_root(head or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        try:
            os.close(os.open(last, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd))
        except FileNotFoundError:
            dfd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=pfd)
            try:
                os.mkdir(last, 0o755, dir_fd=dfd)
            finally:
                os.close(dfd)
    except OSError as e:
        raise UnsafeTreeError(
            f"{target} in guest {name}: {e.strerror} (a symlink or not a directory?); "
            f"make it a plain directory"
        ) from None
    finally:
        os.close(pfd)


def machine_id(tree: GuestTree) -> None:
    """/etc/machine-id: kept when it holds an id; written (a new random one) when it is
    empty, says "uninitialized" or is missing.  Opened without following a symlink, and
    written only when it is a plain file of its own (one link: never a store object or a
    file the guest linked it to)."""
    try:
        etc = tree.open_beneath("etc", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # no /etc of its own (a symlink, or none): systemd makes do
    try:
        try:
            fd = open_regular_at(etc, "machine-id", None, os.O_RDWR)
        except FileNotFoundError:
            fd = os.open(
                "machine-id",
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o444,
                dir_fd=etc,
            )
        except OSError:
            return  # a symlink, not a file, immutable, read-only: leave it to systemd
        try:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                return
            text = os.read(fd, 64).strip()
            if len(text) == 32 and all(c in b"0123456789abcdef" for c in text):
                return
            if text not in (b"", b"uninitialized"):
                return  # something else: systemd judges it
            os.ftruncate(fd, 0)
            os.pwrite(fd, (uuid.uuid4().hex + "\n").encode(), 0)
        finally:
            os.close(fd)
    finally:
        os.close(etc)
