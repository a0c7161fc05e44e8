"""``vserver NAME build``: a new guest's tree and configuration, made whole or not at all.

Methods: ``skeleton`` (the minimal tree and configuration), ``debootstrap`` (Debian's
debootstrap fills the tree), ``clone`` (a copy of another guest in which every file that
guest shares through the store is linked, not copied: a clone costs almost no disk).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from vsstore import attrs, syscalls
from vsstore.config import Guest, Paths, configured_names, deletable_guest, valid_name
from vsstore.errors import ConfigError, StateError, UnsafeTreeError
from vsstore.names import shown
from vsstore.private import copy_file
from vsstore.safetree import GuestTree, mount_id, open_child_dir, open_regular_at
from vsstore.window import unsealed

from . import initstyle, progress, userns

SKELETON_DIRS = [
    ("bin", 0o755),
    ("dev", 0o755),
    ("etc", 0o755),
    ("home", 0o755),
    ("lib", 0o755),
    ("proc", 0o555),
    ("root", 0o700),
    ("run", 0o755),
    ("sbin", 0o755),
    ("tmp", 0o1777),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("var", 0o755),
    ("var/log", 0o755),
    ("var/tmp", 0o1777),
]


@dataclass
class BuildOptions:
    name: str
    method: str
    hostname: str | None = None
    context: int | None = None
    interfaces: tuple[str, ...] = ()
    net: tuple[tuple[str, str], ...] = ()  # --netdev, --netprefix, ...: interfaces/{dev,...}
    progress: bool = False  # a progress line on stderr while cloning
    args: tuple[str, ...] = ()  # the method's own arguments (after --)


def _free_context(paths: Paths) -> int:
    """One more than the highest context configured (a guest whose tree is missing still
    holds its number)."""
    used = set()
    for name in configured_names(paths):
        try:
            used.add(int((paths.confdir / name / "context").read_text().strip()))
        except (OSError, ValueError):
            continue
    return max(used | {1}) + 1


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _interface(conf: Path, i: int, spec: str, net: dict[str, str]) -> None:
    """``[LABEL=][DEV:]IP[/PREFIX|/MASK][,hostip=IP][,name=IFNAME]`` (util-vserver's form
    and ours) -> interfaces/N/{ip,prefix|mask,dev,name,hostip}."""
    addr, *opts = spec.split(",")
    d = conf / "interfaces" / str(i)
    label, _, rest = addr.rpartition("=")
    dev = ""
    if ":" in rest.partition("/")[0]:
        try:
            ipaddress.ip_address(rest.partition("/")[0])
        except ValueError:  # not an IPv6 address: DEV:IP
            dev, _, rest = rest.partition(":")
    ip, slash, prefix = rest.partition("/")
    default_prefix = net.get("prefix") or net.get("mask") or ""
    try:
        itf = ipaddress.ip_interface(
            f"{ip}/{prefix or default_prefix or ('64' if ':' in ip else '24')}"
        )
    except ValueError as e:
        raise ConfigError(
            f"--interface {spec}: {e}; write [DEV:]IP[/PREFIX][,hostip=IP][,name=IF]"
        ) from None
    _write(d / "ip", f"{itf.ip}\n")
    if slash or not default_prefix:
        _write(d / "prefix", f"{itf.network.prefixlen}\n")
    for k, v in (("dev", dev), ("name", label)):
        if v:
            _write(d / k, v + "\n")
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("hostip", "name") or not v:
            raise ConfigError(f"--interface {spec}: unknown option {o!r}; use hostip= or name=")
        _write(d / k, v + "\n")


def _net_defaults(conf: Path, net: dict[str, str]) -> None:
    """``--netdev``, ``--netprefix``, ``--netmask``, ``--netbcast`` (util-vserver's build
    options) -> interfaces/{dev,prefix,mask,bcast}, the defaults of every interface."""
    for k, v in net.items():
        if k == "dev" and (len(v) > 15 or "/" in v or ":" in v or not v.strip()):
            raise ConfigError(f"--netdev {v!r}: not an interface name")
        if k in ("prefix", "mask"):
            try:
                ipaddress.ip_interface(f"10.0.0.1/{v}")
            except ValueError:
                raise ConfigError(f"--net{k} {v!r}: not a prefix length or mask") from None
        if k == "bcast":
            try:
                ipaddress.IPv4Address(v)
            except ValueError:
                raise ConfigError(f"--netbcast {v!r}: not an IPv4 address") from None
        _write(conf / "interfaces" / k, v + "\n")


METHODS = ("skeleton", "debootstrap", "clone")


def build(paths: Paths, opts: BuildOptions) -> Guest:
    """Make guest ``opts.name``; on any failure remove everything this call made."""
    if not valid_name(opts.name):
        raise ConfigError(f"guest name {opts.name!r} is not valid: use letters, digits, '._+-'")
    conf = paths.confdir / opts.name
    root = paths.vservers_root / opts.name
    if conf.exists():
        raise StateError(
            f"guest {opts.name} exists already ({conf}); pick another name or "
            f"'vserver {opts.name} delete' it"
        )
    if root.exists() and any(root.iterdir()):
        raise StateError(f"{root} exists and is not empty; pick another name or remove it")
    if opts.method not in METHODS:
        raise ConfigError(
            f"build method {opts.method!r} unknown; use skeleton, debootstrap or clone"
        )
    with ExitStack() as undo:
        conf.mkdir(parents=True)
        undo.callback(shutil.rmtree, conf, True)
        if not paths.vservers_root.exists():  # util-vserver's barrier: no host user passes
            paths.vservers_root.mkdir(mode=0o000, parents=True)
            os.chmod(paths.vservers_root, 0o000)
        root.mkdir(parents=True, exist_ok=True)
        undo.callback(_remove_tree, root, paths.vservers_root)
        _write(conf / "context", f"{opts.context or _free_context(paths)}\n")
        _write(conf / "uts" / "nodename", f"{opts.hostname or opts.name}\n")
        _write(conf / "fstab", "none /tmp tmpfs size=16m,mode=1777 0 0\n")
        os.symlink(root, conf / "vdir")
        net = dict(opts.net)
        _net_defaults(conf, net)
        for i, spec in enumerate(opts.interfaces):
            _interface(conf, i, spec, net)
        if opts.method == "clone":
            with progress.shown(f"clone into {opts.name}", opts.progress):
                style = _clone(paths, root, list(opts.args))
        else:
            if opts.method == "skeleton":
                _skeleton(root, opts.hostname or opts.name)
            else:
                _debootstrap(root, list(opts.args))
            with GuestTree(root, opts.name) as tree:
                found = initstyle.detect(tree)
            style = found.style
            print(f"guest {opts.name}: init style {style} ({found.why})")
        _write(conf / "apps" / "init" / "style", style + "\n")
        undo.pop_all()
    return Guest(opts.name, root, conf)


def _remove_tree(root: Path, base: Path) -> None:
    if root.exists():
        remove_guest_tree(root, base)


def _skeleton(root: Path, hostname: str) -> None:
    for d, mode in SKELETON_DIRS:
        (root / d).mkdir(exist_ok=True)
        os.chmod(root / d, mode)
    _write(root / "etc" / "hostname", hostname + "\n")
    _write(root / "etc" / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n")
    for f in ("resolv.conf", "localtime"):
        src = Path("/etc") / f
        if src.is_file():
            shutil.copyfile(src, root / "etc" / f)


def _debootstrap(root: Path, args: list[str]) -> None:
    """util-vserver's form: ``-- -d SUITE [-m MIRROR] [debootstrap options...]``."""
    suite, mirror, rest = None, None, []
    it = iter(args)
    for a in it:
        if a == "-d":
            suite = next(it, None)
        elif a == "-m":
            mirror = next(it, None)
        else:
            rest.append(a)
    if suite is None:
        raise ConfigError("build -m debootstrap: name the suite: -- -d bookworm [-m MIRROR]")
    if shutil.which("debootstrap") is None:
        raise ConfigError("debootstrap is not installed; apt-get install debootstrap")
    cmd = ["debootstrap", *rest, suite, str(root), *([mirror] if mirror else [])]
    p = subprocess.run(cmd)
    if p.returncode != 0:
        raise ConfigError(
            f"{' '.join(cmd)} failed (exit {p.returncode}); see its output "
            f"above and {root}/debootstrap/debootstrap.log"
        )


def _clone(paths: Paths, root: Path, args: list[str]) -> str:
    """Copy guest ``--source NAME`` (or a path) into ``root``: its store-linked files are
    linked (the store object gains a name; no byte is copied), everything else copied with
    owner, mode, xattrs and times; hardlinks inside the source stay hardlinks."""
    from vsstore.config import resolve_guest

    src_arg = args[1] if args[:1] == ["--source"] and len(args) > 1 else (args[0] if args else None)
    if not src_arg:
        raise ConfigError("build -m clone: name the guest to clone: -- --source NAME")
    src = resolve_guest(src_arg, paths)
    if os.stat(src.root).st_dev != os.stat(root).st_dev:
        raise ConfigError(
            f"clone: {src.root} and {root} are on different filesystems; "
            f"hardlinks cannot cross them"
        )
    seen: dict[tuple[int, int], str] = {}
    sfd = os.open(src.root, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _copy_dir(sfd, dfd, "", dfd, seen)
        _copy_meta(sfd, dfd, None)
    finally:
        os.close(sfd)
        os.close(dfd)
    style = "plain"
    if src.confdir is not None:
        if userns.read(src.confdir) is not None:  # a namespaced guest's copy: one too, its own
            userns.enable(paths.confdir, root.name)
        for f in ("style", "cmd.start", "cmd.stop", "stop-signal", "stop-timeout"):
            p = src.confdir / "apps" / "init" / f
            if p.is_file():
                if f == "style":
                    style = p.read_text().strip()
                else:
                    _write(paths.confdir / root.name / "apps" / "init" / f, p.read_text())
    return style


def _copy_meta(sfd: int, dfd: int, name: str | None) -> None:
    """Owner, mode and times of entry ``name`` of ``sfd`` (or of ``sfd`` itself) onto the
    same name in ``dfd`` (or ``dfd`` itself); a symlink keeps its own mode."""
    if name is None:
        st = os.fstat(sfd)
        os.chown(dfd, st.st_uid, st.st_gid)
        os.chmod(dfd, stat.S_IMODE(st.st_mode))
        os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    st = os.stat(name, dir_fd=sfd, follow_symlinks=False)
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)


def _copy_dir(
    sfd: int,
    dfd: int,
    rel: str,
    droot: int,
    seen: dict[tuple[int, int], str],
) -> None:
    """Copy directory ``sfd``'s entries into ``dfd`` (``rel`` below the new root
    ``droot``); ``seen`` maps source inodes copied already to their copy's path."""
    with os.scandir(sfd) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        st = e.stat(follow_symlinks=False)
        n = e.name
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(n, 0o700, dir_fd=dfd)
            s2 = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=sfd)
            d2 = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                if os.fstat(s2).st_dev == st.st_dev:  # never into another filesystem
                    _copy_dir(s2, d2, f"{rel}{n}/", droot, seen)
                for xn in os.listxattr(s2):
                    os.setxattr(d2, xn, os.getxattr(s2, xn))
            finally:
                os.close(s2)
                os.close(d2)
            _copy_meta(sfd, dfd, n)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            fd = os.open(n, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=sfd)
            try:
                if key in seen:  # another name of a file copied already
                    os.link(seen[key], n, src_dir_fd=droot, dst_dir_fd=dfd, follow_symlinks=False)
                elif st.st_nlink > 1 and attrs.has_marker(fd):  # shared: one more name
                    with unsealed(fd, what=shown(f"{rel}{n}")):
                        syscalls.link_fd(fd, dfd, n)
                else:
                    os.close(copy_file(fd, dfd, n))
                    if st.st_nlink > 1:
                        seen[key] = rel + n
            finally:
                os.close(fd)
            progress.tick(st.st_size)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(n, dir_fd=sfd), n, dir_fd=dfd)
            os.chown(n, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(n, st.st_mode, st.st_rdev, dir_fd=dfd)
            _copy_meta(sfd, dfd, n)
        # sockets are not copied: they belong to a running process


def delete(paths: Paths, name: str, show_progress: bool = False) -> Guest:
    """``vserver NAME delete --force``: remove a stopped, configured guest's tree and its
    configuration.  Only a tree strictly below the guests' root qualifies
    (``config.deletable_guest``); the guest's lock is held throughout, so nothing starts
    it meanwhile."""
    from vsstore.runtime import cow_served, read_state

    from .run import cleanup, guest_lock

    g = deletable_guest(name, paths)
    with guest_lock(paths, g.name):
        st = read_state(paths, g.name)
        if st is not None and (st.running or st.monitoring):
            raise StateError(f"guest {g.name} is running; 'vserver {g.name} stop' first")
        at = cow_served(paths).get(str(g.root))
        if at is not None:
            raise StateError(
                f"guest {g.name}'s tree {g.root} is served by the cow overlay "
                f"at {at} (an 'exec --cow' running?); wait for it to end"
            )
        if st is not None:
            cleanup(paths, st)  # what a guest that ended by itself left
        if os.path.lexists(g.root):
            with progress.shown(f"delete {g.name}", show_progress):
                remove_guest_tree(g.root, paths.vservers_root)
        assert g.confdir is not None  # deletable_guest: a configured guest
        shutil.rmtree(g.confdir)
    return g


def remove_guest_tree(root: Path, base: Path) -> None:
    """Remove guest tree ``root``, which must lie strictly below ``base`` (the guests'
    root) and is reached from it without following any symlink.  Its names of shared
    store objects go one by one, each object unsealed only for its own unlink: other
    guests' files stay protected.

    The tree is hostile: it is walked by directory descriptors, each entry opened
    without following a symlink or crossing into a mount, and only names inside it are
    unlinked.  A mount met on the way (a host directory bound into the tree, too) is
    detached (lazily, through a descriptor of the mount itself, so nothing outside the
    tree is touched) before its mount point is removed; nothing on it is.  ".." leads
    back up, checked against the inode that led down, so any depth takes a few
    descriptors."""
    real_base = os.path.realpath(base)
    rel = os.path.relpath(os.path.realpath(root), real_base)
    if rel in (".", "..") or rel.startswith("../"):
        raise UnsafeTreeError(f"{root} is not below the guests' root {real_base}; not removed")
    head, name = os.path.split(rel)
    where = str(Path(real_base, rel))
    bfd = os.open(real_base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            pfd = syscalls.openat2(
                bfd,
                head or ".",
                os.O_RDONLY | os.O_DIRECTORY,
                syscalls.RESOLVE_BENEATH
                | syscalls.RESOLVE_NO_SYMLINKS
                | syscalls.RESOLVE_NO_MAGICLINKS,
            )
        except OSError as e:
            raise UnsafeTreeError(
                f"{where}: cannot reach it below {real_base} without a "
                f"symlink ({e.strerror}); not removed"
            ) from None
    finally:
        os.close(bfd)
    try:
        try:
            rfd = open_child_dir(pfd, name)
        except OSError as e:
            why = (
                "a mount point: unmount it first"
                if e.errno == errno.EXDEV
                else "a symlink or not a directory"
                if e.errno in (errno.ELOOP, errno.ENOTDIR)
                else e.strerror
            )
            raise UnsafeTreeError(f"{where}: {why}; not removed") from None
        try:
            rst = os.fstat(rfd)
            _empty_tree(rfd, where)
        finally:
            os.close(rfd)
        cur = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        if (cur.st_dev, cur.st_ino) != (rst.st_dev, rst.st_ino):
            raise UnsafeTreeError(f"{where} was replaced while it was being removed")
        _rmdir(pfd, name, where)
    finally:
        os.close(pfd)


def _detach(dfd: int, name: str, where: str) -> bool:
    """Detach whatever is mounted on entry ``name`` of ``dfd`` (mounts stacked there
    too), through a descriptor of each mount: the mount inside the tree, never a path.
    False: nothing is mounted there."""
    from . import ns

    detached = False
    for _ in range(64):
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            if mount_id(fd) == mount_id(dfd):
                return detached
            ns.umount(f"/proc/self/fd/{fd}", ns.MNT_DETACH)
            detached = True
        except OSError as e:
            raise UnsafeTreeError(
                f"{where}: cannot detach what is mounted there "
                f"({e.strerror}); unmount it and delete again"
            ) from None
        finally:
            os.close(fd)
    raise UnsafeTreeError(
        f"{where}: more than 64 mounts on one another; unmount them and delete again"
    )


def _open_subdir(dfd: int, name: str, where: str) -> int:
    """Open subdirectory ``name`` of ``dfd``, a mount on it detached first."""
    for _ in range(2):
        try:
            return open_child_dir(dfd, name)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise UnsafeTreeError(
                    f"{where}: {e.strerror} (changed meanwhile?); removal stopped there"
                ) from None
        _detach(dfd, name, where)
    raise UnsafeTreeError(f"{where}: still a mount point; unmount it and delete again")


class _Dir:
    """A directory on the way down: its name in its parent, its inode, its subdirectories
    not yet removed."""

    __slots__ = ("name", "ino", "subdirs")

    def __init__(self, name: str, ino: int, subdirs: list[str]) -> None:
        self.name, self.ino, self.subdirs = name, ino, subdirs


def _empty_tree(rfd: int, root: str) -> None:
    """Remove everything below directory ``rfd`` (see ``remove_guest_tree``)."""
    rst = os.fstat(rfd)
    cur = os.dup(rfd)
    try:
        stack = [_Dir("", rst.st_ino, _clear_dir(cur, root))]
        path = [root]
        while stack:
            top = stack[-1]
            if top.subdirs:
                name = top.subdirs.pop()
                where = f"{path[-1]}/{name}"
                nfd = _open_subdir(cur, name, where)
                os.close(cur)
                cur = nfd
                path.append(where)
                stack.append(_Dir(name, os.fstat(cur).st_ino, _clear_dir(cur, where)))
                continue
            stack.pop()
            if not stack:
                return
            pfd = os.open(
                "..", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur
            )
            pst = os.fstat(pfd)
            if (pst.st_dev, pst.st_ino) != (rst.st_dev, stack[-1].ino):
                os.close(pfd)
                raise UnsafeTreeError(
                    f"{path[-1]}: moved while being removed; removal stopped there"
                )
            os.close(cur)
            cur = pfd
            _rmdir(cur, top.name, path.pop())
    finally:
        os.close(cur)


def _clear_dir(dfd: int, where: str) -> list[str]:
    """Unlink every entry of directory ``dfd`` but its subdirectories, whose names it
    returns."""
    subdirs = []
    with os.scandir(dfd) as it:
        names = [e.name for e in it]
    for n in names:
        try:
            st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            subdirs.append(n)
        else:
            _unlink(dfd, n, st, f"{where}/{n}")
            progress.tick(st.st_size)
    return subdirs


def _unlink(dfd: int, name: str, st: os.stat_result, where: str) -> None:
    """Unlink one name.  A shared inode (a store object) is unsealed only for this unlink
    and sealed again; an immutable or append-only file or directory of the guest's own has
    its flags cleared first.  A file mounted on the name is detached first: no flag of
    anything outside the tree is ever touched."""
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        if _detach(dfd, name, where):
            return _unlink(dfd, name, os.stat(name, dir_fd=dfd, follow_symlinks=False), where)
        fd = open_regular_at(dfd, name, (st.st_dev, st.st_ino))
        try:
            with unsealed(fd, what=where):
                _retry_unsealed(dfd, lambda: os.unlink(name, dir_fd=dfd))
        finally:
            os.close(fd)
        return None
    try:
        _retry_unsealed(dfd, lambda: os.unlink(name, dir_fd=dfd))
        return None
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.EPERM):
            raise
    if _detach(dfd, name, where):
        return _unlink(dfd, name, os.stat(name, dir_fd=dfd, follow_symlinks=False), where)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeTreeError(
            f"{where}: cannot remove it (an immutable special file?); chattr -i it and delete again"
        )
    fd = open_regular_at(dfd, name, (st.st_dev, st.st_ino))
    try:
        attrs.clear_flags(fd)
    finally:
        os.close(fd)
    os.unlink(name, dir_fd=dfd)
    return None


def _retry_unsealed(dfd: int, op: Callable[[], object]) -> None:
    """Run ``op`` (an unlink or rmdir in ``dfd``); on EPERM clear the directory's own
    immutable/append-only flags (a directory of the guest's, being removed) and retry."""
    try:
        op()
    except PermissionError:
        if not syscalls.get_inode_flags(dfd) & (syscalls.FS_IMMUTABLE_FL | syscalls.FS_APPEND_FL):
            raise
        attrs.clear_flags(dfd)
        op()


def _rmdir(dfd: int, name: str, where: str) -> None:
    """Remove the (emptied) directory ``name`` of ``dfd``."""
    try:
        _retry_unsealed(dfd, lambda: os.rmdir(name, dir_fd=dfd))
    except PermissionError:  # the directory itself immutable or append-only
        fd = open_child_dir(dfd, name)
        try:
            attrs.clear_flags(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dfd)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UnsafeTreeError(f"{where}: a mount point; unmount it and delete again") from None
        if e.errno == errno.ENOTEMPTY:
            raise UnsafeTreeError(f"{where}: changed while being removed; delete again") from None
        raise
