"""Guest root that is not host root: a user namespace per guest over an idmapped root.

``/etc/vservers/NAME/userns/uid`` and ``userns/gid``: ``START COUNT`` (the guest's ids
0..COUNT-1 are the host's START..START+COUNT-1) or ``auto`` (a free 65536-range, picked at
the next start or ``userns enable`` and written back, under a host-wide lock).  Both
present: the guest runs in a user namespace of its own; neither: as before (host root with
fewer capabilities); one alone is an error.

The files on disk stay as they are (uid 0 stays 0, so every guest shares the same store
inode): the guest's root is mounted idmapped (``mount_setattr(MOUNT_ATTR_IDMAP)``) into
its user namespace, so guest root sees its files as its own and what it creates is stored
with the ids mapped back.  Guest root's capabilities hold only inside its namespace: it
cannot lift the immutable flag, set ``trusted.*`` attributes, load modules or reach host
files as root.  FUSE mounts take an idmap only when the server asks for it
(FUSE_ALLOW_IDMAP), which pyfuse3 cannot: a cow guest cannot have a user namespace.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from vsstore.errors import ConfigError, UnsupportedError
from vsstore.lock import exclusive
from vsstore.syscalls import AT_EMPTY_PATH, AT_FDCWD, _check, _libc

from . import ns

CLONE_NEWUSER = 0x10000000
AUTO_BASE = 0x100000  # the first automatic range: above every distribution's own users
AUTO_SIZE = 0x10000
MIN_START = 0x10000  # a guest id never is one of the host's own users (0..65535)
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 is no id

# The new mount API (the same numbers on x86_64 and aarch64).
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_IDMAP = 0x00100000


@dataclass(frozen=True)
class IdMap:
    """The guest's ids 0..count-1 are the host's start..start+count-1 (uids and gids)."""

    uid: int
    uid_count: int
    gid: int
    gid_count: int

    def uid_map(self) -> str:
        return f"0 {self.uid} {self.uid_count}\n"

    def gid_map(self) -> str:
        return f"0 {self.gid} {self.gid_count}\n"

    def to_list(self) -> list[int]:
        return [self.uid, self.uid_count, self.gid, self.gid_count]

    @classmethod
    def from_list(cls, v: list[int] | None) -> IdMap | None:
        return cls(*v) if v else None


AUTO = "auto"


def _parse(p: Path, text: str) -> tuple[int, int] | str:
    words = text.split()
    if words == [AUTO]:
        return AUTO
    try:
        if len(words) != 2:
            raise ValueError
        start, count = int(words[0]), int(words[1])
    except ValueError:
        raise ConfigError(
            f"{p}: {text.strip()[:40]!r} is not 'START COUNT' or 'auto'; write e.g. "
            f"'auto' (a free range of 65536 ids is picked and written here)"
        ) from None
    _check_range(p, start, count)
    return start, count


def _check_range(p: Path, start: int, count: int) -> None:
    if start < MIN_START or count < 1 or start + count - 1 > MAX_ID:
        raise ConfigError(
            f"{p}: {start} {count} is not a range of host ids for a guest: START must "
            f"be at least {MIN_START} (the host's own users are below) and COUNT at least 1 "
            f"(65536 for a whole distribution); write 'auto' to have one picked"
        )


def read(confdir: Path) -> tuple[tuple[int, int] | str, tuple[int, int] | str] | None:
    """The guest's ``userns/{uid,gid}`` as (start, count) or "auto" each; None when the
    guest has none (runs as before)."""
    d = confdir / "userns"
    got: list[tuple[int, int] | str | None] = []
    for kind in ("uid", "gid"):
        p = d / kind
        try:
            with open(p, "rb") as f:
                raw = f.read(257)
        except FileNotFoundError:
            got.append(None)
            continue
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
        try:
            text = raw[:256].decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not text; write 'START COUNT' or 'auto'") from None
        got.append(_parse(p, text))
    uid, gid = got
    if uid is None and gid is None:
        return None
    if uid is None or gid is None:
        missing = "uid" if uid is None else "gid"
        raise ConfigError(
            f"{d / missing}: missing while {d} has the other; write 'auto' or "
            f"'START COUNT' to both, or remove {d} (vserver NAME userns disable)"
        )
    return uid, gid


def _ranges_of(text: str) -> list[tuple[int, int]]:
    """(start, count) of every ``name:start:count`` line (/etc/subuid, /etc/subgid)."""
    out = []
    for ln in text.splitlines()[:100_000]:
        parts = ln.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            out.append((int(parts[1]), int(parts[2])))
    return out


def taken(confroot: Path, but: str | None = None) -> list[tuple[int, int]]:
    """Host ids already given out: every other guest's ranges (uid and gid alike, so one
    start serves both) and the host's /etc/subuid and /etc/subgid."""
    out: list[tuple[int, int]] = []
    try:
        names = sorted(os.listdir(confroot))
    except FileNotFoundError:
        names = []
    for name in names:
        if name == but or name.startswith("."):
            continue
        try:
            r = read(confroot / name)
        except ConfigError:
            continue  # its own start will say so; its files are not a range to avoid
        for v in r or ():
            if not isinstance(v, str):
                out.append(v)
    for f in ("/etc/subuid", "/etc/subgid"):
        try:
            out += _ranges_of(Path(f).read_text(errors="replace"))
        except OSError:
            pass
    for f in ("/etc/passwd", "/etc/group"):  # the host's own users above 65535 (LDAP...)
        try:
            text = Path(f).read_text(errors="replace")
        except OSError:
            continue
        for ln in text.splitlines()[:1_000_000]:
            parts = ln.split(":")
            if len(parts) > 2 and parts[2].isdigit() and int(parts[2]) >= MIN_START:
                out.append((int(parts[2]), 1))
    return out


def _overlap(start: int, count: int, used: list[tuple[int, int]]) -> tuple[int, int] | None:
    for s, c in used:
        if s < start + count and start < s + c:
            return s, c
    return None


def pick(used: list[tuple[int, int]], size: int = AUTO_SIZE) -> int:
    """The lowest start (a multiple of 65536, from AUTO_BASE) whose ``size`` ids overlap
    nothing in ``used``."""
    start = AUTO_BASE
    while start + size - 1 <= MAX_ID:
        clash = [s + c for s, c in used if s < start + size and start < s + c]
        if not clash:
            return start
        end = max(clash)
        start = -(-end // AUTO_SIZE) * AUTO_SIZE
    raise ConfigError("no free range of host ids is left for another guest's user namespace")


def write_range(confdir: Path, uid: tuple[int, int], gid: tuple[int, int]) -> None:
    """Record the guest's ranges (each file replaced whole)."""
    d = confdir / "userns"
    d.mkdir(mode=0o755, exist_ok=True)
    for kind, (start, count) in (("uid", uid), ("gid", gid)):
        tmp = d / f".{kind}.tmp"
        tmp.write_text(f"{start} {count}\n")
        os.replace(tmp, d / kind)


def resolve(confroot: Path, name: str) -> IdMap | None:
    """The guest's map, an ``auto`` range picked and recorded first (under a host-wide lock,
    so two guests starting at once never get the same ids)."""
    confdir = confroot / name
    r = read(confdir)
    if r is None:
        return None
    with exclusive(confroot / ".userns.lock", "picking a range of host ids", wait=30):
        r = read(confdir)
        assert r is not None
        uid, gid = r
        used = taken(confroot, but=name)
        for kind, v in (("uid", uid), ("gid", gid)):
            if isinstance(v, str):
                continue
            other = _overlap(v[0], v[1], used)
            if other is not None:  # two guests' roots would be one host user
                raise ConfigError(
                    f"{confdir / 'userns' / kind}: host ids {v[0]}..{v[0] + v[1] - 1} "
                    f"overlap {other[0]}..{other[0] + other[1] - 1}, given to another guest, "
                    f"a host user or /etc/subuid or /etc/subgid; write 'auto' to have a "
                    f"free range picked"
                )
        if isinstance(uid, str) or isinstance(gid, str):
            start = pick(used)
            uid = (start, AUTO_SIZE) if isinstance(uid, str) else uid
            gid = (start, AUTO_SIZE) if isinstance(gid, str) else gid
            write_range(confdir, uid, gid)
    return IdMap(uid[0], uid[1], gid[0], gid[1])


def disable(confdir: Path) -> bool:
    """Remove the guest's ``userns/`` (it runs as before); whether there was one."""
    d = confdir / "userns"
    if not d.is_dir():
        return False
    for f in d.iterdir():
        f.unlink()
    d.rmdir()
    return True


# -- in the starting guest's set-up (forked, single-threaded) ---------------------------


def create(idmap: IdMap) -> int:  # pragma: no cover - in the forked setup
    """A new user namespace with ``idmap`` written, as a descriptor: a child unshares it
    and waits while we write its maps; the descriptor keeps it once the child is gone."""
    r, w = os.pipe2(os.O_CLOEXEC)
    back_r, back_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.close(back_r)
        try:
            ns.unshare(CLONE_NEWUSER)
            os.write(back_w, b"1")
        except OSError:
            os._exit(1)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    os.close(back_w)
    try:
        if os.read(back_r, 1) != b"1":
            raise UnsupportedError("cannot create a user namespace: this kernel lacks them")
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(idmap.uid_map())
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(idmap.gid_map())
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(back_r)
        os.close(w)
        os.waitpid(pid, 0)


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _clone(dirfd: int, path: str) -> int:
    """A detached, recursive copy of the mount at ``path`` (relative to ``dirfd``; "" for
    ``dirfd`` itself)."""
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE | (AT_EMPTY_PATH if not path else 0)
    return _check(
        _libc.syscall(SYS_open_tree, ctypes.c_int(dirfd), os.fsencode(path), ctypes.c_uint(flags)),
        "open_tree",
    )


def _clone_idmapped(dirfd: int, path: str, userns_fd: int) -> int:
    """``_clone`` with every mount in the copy idmapped into ``userns_fd``."""
    fd = _clone(dirfd, path)
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
        _check(
            _libc.syscall(
                SYS_mount_setattr,
                ctypes.c_int(fd),
                b"",
                ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            ),
            "mount_setattr",
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def _move(fd: int, target_dirfd: int, target: str) -> None:
    """Attach the detached mount ``fd`` at ``target`` (relative to ``target_dirfd``; ""
    for ``target_dirfd`` itself)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (MOVE_MOUNT_T_EMPTY_PATH if not target else 0)
    _check(
        _libc.syscall(
            SYS_move_mount,
            ctypes.c_int(fd),
            b"",
            ctypes.c_int(target_dirfd),
            os.fsencode(target),
            ctypes.c_uint(flags),
        ),
        "move_mount",
    )


def bind_idmapped(source: str, userns_fd: int) -> None:  # pragma: no cover - in setup
    """``source`` (the guest's root, with whatever is mounted below it) mounted onto itself
    idmapped into the guest's user namespace."""
    try:
        fd = _clone_idmapped(AT_FDCWD, source, userns_fd)
    except OSError as e:
        raise UnsupportedError(
            f"cannot mount {source} idmapped: {e.strerror}; its filesystem (or one mounted "
            f"below it) takes no idmap on this kernel; remove the guest's userns/ "
            f"(vserver NAME userns disable) to start it as before"
        ) from None
    try:
        _move(fd, AT_FDCWD, source)
    finally:
        os.close(fd)


def idmap_mount(mountpoint: int, root: int, userns_fd: int) -> bool:  # pragma: no cover
    """The mount whose root is ``root`` (an O_PATH descriptor), on the directory
    ``mountpoint`` (one opened before it was mounted), replaced by an idmapped copy of
    itself; False (left as it is) when its filesystem takes no idmap (proc, devpts...)."""
    try:
        clone = _clone_idmapped(root, "", userns_fd)
    except OSError:
        return False
    try:
        ns.umount(f"/proc/self/fd/{root}", ns.MNT_DETACH)
        _move(clone, mountpoint, "")
    finally:
        os.close(clone)
    return True


def remount_cwd() -> None:  # pragma: no cover - in init
    """Our working directory's mount (with what is below it) mounted again onto itself, and
    entered: a mount namespace made in a user namespace locks what it copied, and
    pivot_root refuses a locked new root; a mount made here is not locked."""
    fd = _clone(AT_FDCWD, ".")
    try:
        _move(fd, AT_FDCWD, ".")
        os.fchdir(fd)
    finally:
        os.close(fd)


def enter(userns_fd: int) -> None:  # pragma: no cover - in the forked setup
    """Join the guest's user namespace as its root (host ids START+0): from here on our
    capabilities hold only inside it."""
    ns.setns(userns_fd, CLONE_NEWUSER)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def enable(confroot: Path, name: str, start: int | None = None, count: int = AUTO_SIZE) -> IdMap:
    """Give the (stopped) guest a user namespace: ``start`` (with ``count`` ids), checked
    against the ranges already given out, or a free range picked; recorded in its
    ``userns/``.  Its tree is not touched (the idmap does the mapping)."""
    confdir = confroot / name
    if (confdir / "cow").exists():
        raise ConfigError(
            f"{confdir / 'cow'}: a cow guest cannot have a user namespace (FUSE mounts take "
            f"no idmap with pyfuse3); remove that file first"
        )
    if (confdir / "spaces" / "hostnet").exists():
        raise ConfigError(
            f"{confdir / 'spaces/hostnet'}: a guest on the host's network cannot have a user "
            f"namespace (its root would have no rights there); remove that file first"
        )
    with exclusive(confroot / ".userns.lock", "picking a range of host ids", wait=30):
        used = taken(confroot, but=name)
        if start is None:
            start = pick(used, count)
        else:
            _check_range(confdir / "userns", start, count)
            other = _overlap(start, count, used)
            if other is not None:
                s, c = other
                raise ConfigError(
                    f"host ids {start}..{start + count - 1} overlap {s}..{s + c - 1}, "
                    f"given to another guest, a host user or /etc/subuid or /etc/subgid; "
                    f"choose another START or leave it out to have one picked"
                )
        write_range(confdir, (start, count), (start, count))
    return IdMap(start, count, start, count)
