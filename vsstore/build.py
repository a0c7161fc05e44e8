"""``vserver NAME build``: a new guest's tree and configuration, made whole or not at all.

Methods: ``skeleton`` (the minimal tree and configuration), ``debootstrap`` (Debian's
debootstrap fills the tree), ``clone`` (a copy of another guest in which every file that
guest shares through the store is linked, not copied: a clone costs almost no disk).
"""
from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from . import attrs, syscalls
from .config import Guest, Paths, configured_names, valid_name
from .errors import ConfigError, StateError
from .names import shown
from .private import copy_file
from .window import unsealed

SKELETON_DIRS = [("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("home", 0o755),
                 ("lib", 0o755), ("proc", 0o555), ("root", 0o700), ("run", 0o755),
                 ("sbin", 0o755), ("tmp", 0o1777), ("usr", 0o755), ("usr/bin", 0o755),
                 ("usr/sbin", 0o755), ("var", 0o755), ("var/log", 0o755), ("var/tmp", 0o1777)]


@dataclass
class BuildOptions:
    name: str
    method: str
    hostname: str | None = None
    context: int | None = None
    interfaces: tuple[str, ...] = ()
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


def _interface(conf: Path, i: int, spec: str) -> None:
    """``IP[/PREFIX][,hostip=IP][,name=IFNAME]`` -> interfaces/N/{ip,prefix,hostip,name}."""
    addr, *opts = spec.split(",")
    try:
        itf = ipaddress.ip_interface(addr if "/" in addr else addr + "/24")
    except ValueError as e:
        raise ConfigError(f"--interface {spec}: {e}; write IP/PREFIX[,hostip=IP]") from None
    d = conf / "interfaces" / str(i)
    _write(d / "ip", f"{itf.ip}\n")
    _write(d / "prefix", f"{itf.network.prefixlen}\n")
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("hostip", "name") or not v:
            raise ConfigError(f"--interface {spec}: unknown option {o!r}; use hostip= or name=")
        _write(d / k, v + "\n")


def build(paths: Paths, opts: BuildOptions) -> Guest:
    """Make guest ``opts.name``; on any failure remove everything this call made."""
    if not valid_name(opts.name):
        raise ConfigError(f"guest name {opts.name!r} is not valid: use letters, digits, '._+-'")
    conf = paths.confdir / opts.name
    root = paths.vservers_root / opts.name
    if conf.exists():
        raise StateError(f"guest {opts.name} exists already ({conf}); pick another name or "
                         f"'vserver {opts.name} delete' it")
    if root.exists() and any(root.iterdir()):
        raise StateError(f"{root} exists and is not empty; pick another name or remove it")
    if opts.method not in ("skeleton", "debootstrap", "clone"):
        raise ConfigError(f"build method {opts.method!r} unknown; use skeleton, debootstrap "
                          f"or clone")
    with ExitStack() as undo:
        conf.mkdir(parents=True)
        undo.callback(shutil.rmtree, conf, True)
        root.mkdir(parents=True, exist_ok=True)
        undo.callback(_remove_tree, root)
        _write(conf / "context", f"{opts.context or _free_context(paths)}\n")
        _write(conf / "uts" / "nodename", f"{opts.hostname or opts.name}\n")
        _write(conf / "fstab", "none /tmp tmpfs size=16m,mode=1777 0 0\n")
        os.symlink(root, conf / "vdir")
        for i, spec in enumerate(opts.interfaces):
            _interface(conf, i, spec)
        style = "plain"
        if opts.method == "skeleton":
            _skeleton(root, opts.hostname or opts.name)
        elif opts.method == "debootstrap":
            _debootstrap(root, list(opts.args))
            style = "sysv" if (root / "etc/init.d/rc").exists() else "none"
        else:
            style = _clone(paths, root, list(opts.args))
        _write(conf / "apps" / "init" / "style", style + "\n")
        undo.pop_all()
    return Guest(opts.name, root, conf)


def _remove_tree(root: Path) -> None:
    if root.exists():
        remove_guest_tree(root)


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
        raise ConfigError(f"{' '.join(cmd)} failed (exit {p.returncode}); see its output "
                          f"above and {root}/debootstrap/debootstrap.log")


def _clone(paths: Paths, root: Path, args: list[str]) -> str:
    """Copy guest ``--source NAME`` (or a path) into ``root``: its store-linked files are
    linked (the store object gains a name; no byte is copied), everything else copied with
    owner, mode, xattrs and times; hardlinks inside the source stay hardlinks."""
    from .config import resolve_guest
    src_arg = args[1] if args[:1] == ["--source"] and len(args) > 1 else (args[0] if args else None)
    if not src_arg:
        raise ConfigError("build -m clone: name the guest to clone: -- --source NAME")
    src = resolve_guest(src_arg, paths)
    if os.stat(src.root).st_dev != os.stat(root).st_dev:
        raise ConfigError(f"clone: {src.root} and {root} are on different filesystems; "
                          f"hardlinks cannot cross them")
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
        for f in ("style", "cmd.start", "cmd.stop", "stop-signal", "stop-timeout"):
            p = src.confdir / "apps" / "init" / f
            if p.is_file():
                if f == "style":
                    style = p.read_text().strip()
                else:
                    _write(paths.confdir / root.name / "apps" / "init" / f, p.read_text())
    return style


def _copy_meta(sfd: int, dfd: int, name: str | None) -> None:
    kw = {"dir_fd": dfd, "follow_symlinks": False} if name else {}
    st = os.stat(name, dir_fd=sfd, follow_symlinks=False) if name else os.fstat(sfd)
    target: str | int = name if name else dfd
    os.chown(target, st.st_uid, st.st_gid, **kw)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(target, stat.S_IMODE(st.st_mode), **kw)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), **kw)


def _copy_dir(sfd: int, dfd: int, rel: str, droot: int, seen: dict[tuple[int, int], str],
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
                    os.link(seen[key], n, src_dir_fd=droot, dst_dir_fd=dfd,
                            follow_symlinks=False)
                elif st.st_nlink > 1 and attrs.has_marker(fd):  # shared: one more name
                    with unsealed(fd, what=shown(f"{rel}{n}")):
                        syscalls.link_fd(fd, dfd, n)
                else:
                    os.close(copy_file(fd, dfd, n))
                    if st.st_nlink > 1:
                        seen[key] = rel + n
            finally:
                os.close(fd)
        elif stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(n, dir_fd=sfd), n, dir_fd=dfd)
            os.chown(n, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            os.mknod(n, st.st_mode, st.st_rdev, dir_fd=dfd)
            _copy_meta(sfd, dfd, n)
        # sockets are not copied: they belong to a running process


def remove_guest_tree(root: Path) -> None:
    """Remove a guest tree.  Its names of shared store objects go one by one, each object
    unsealed only for its own unlink: other guests' files stay protected."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        dfd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for f in filenames:
                st = os.stat(f, dir_fd=dfd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
                    try:
                        with unsealed(fd, what=shown(os.path.join(dirpath, f))):
                            os.unlink(f, dir_fd=dfd)
                    finally:
                        os.close(fd)
                else:
                    try:
                        os.unlink(f, dir_fd=dfd)
                    except PermissionError:  # an immutable or append-only private file
                        fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
                        try:
                            attrs.clear_flags(fd)
                        finally:
                            os.close(fd)
                        os.unlink(f, dir_fd=dfd)
            for d in dirnames:
                try:
                    os.rmdir(d, dir_fd=dfd)
                except NotADirectoryError:  # a symlink os.walk listed as a directory
                    os.unlink(d, dir_fd=dfd)
        finally:
            os.close(dfd)
    os.rmdir(root)
