"""The content-addressed store: one directory of shared inodes per filesystem.

An object is a hardlink to an inode that guests share.  Its name encodes what may link to
it: ``XX/<xxh3-128 hex>-<metadata class hex>[.N]`` (XX: the digest's first two hex digits;
``.N``: a further generation when the first reached the filesystem's link limit, EMLINK).
The store must be on the guests' filesystem (hardlinks cannot cross filesystems) and outside
every guest tree (guests must not reach it).
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from . import syscalls
from .errors import NOSPACE_ERRNOS, ConfigError, NoSpaceError
from .names import shown
from .window import Meta

_NAME_RE = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{16})(?:\.([1-9][0-9]{0,5}))?$")
Key = tuple[bytes, bytes]  # (content digest, metadata class)


@dataclass(slots=True)
class StoreObject:
    """One object: its key, generation, name in the store and its inode as last seen."""

    key: Key
    gen: int
    name: str
    ino: int
    nlink: int
    size: int
    full: bool = False  # reached EMLINK this run
    stamp: tuple[int, int] | None = None  # (mtime_ns, ctime_ns) as scan() saw them
    strong: bytes | None = None  # BLAKE3 of the content, once known this run
    expect: Meta | None = None  # its metadata as verified against its name this run


def object_name(key: Key, gen: int) -> str:
    d = key[0].hex()
    return f"{d[:2]}/{d}-{key[1].hex()}" + (f".{gen}" if gen else "")


class Store:
    """The store directory, held open by fd."""

    def __init__(self, path: Path, create: bool = True, missing_ok: bool = False) -> None:
        self.path = Path(path)
        self._subdirs: dict[str, int] = {}
        if missing_ok and not create and not self.path.exists():
            # A dry run before the first run: an empty store on the parent's filesystem.
            self.fd = -1
            parent = next(p for p in self.path.parents if p.exists())
            self.dev = os.stat(parent).st_dev
            return
        try:
            if create:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ConfigError(
                f"store {self.path} does not exist; run `vsunify run` first or pass --store"
            ) from None
        except OSError as e:
            if e.errno in NOSPACE_ERRNOS:
                raise NoSpaceError.on(self.path, f"the store {shown(self.path)}") from None
            raise ConfigError(
                f"store {self.path}: {e.strerror}; choose another with --store"
            ) from None
        self.dev = os.fstat(self.fd).st_dev

    def close(self) -> None:
        for fd in self._subdirs.values():
            os.close(fd)
        self._subdirs.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_guest(self, name: str, root: Path, dev: int) -> None:
        """Refuse guests on another filesystem, and a store inside a guest (or vice versa)."""
        if dev != self.dev:
            raise ConfigError(
                f"store {shown(self.path)} is on another filesystem than guest '{shown(name)}' "
                f"({shown(root)}); hardlinks cannot cross filesystems: put the store on the "
                f"guests' filesystem with --store DIR (one store per filesystem)"
            )
        s, r = self.path.resolve(), root.resolve()
        if s == r or s.is_relative_to(r) or r.is_relative_to(s):
            raise ConfigError(
                f"store {shown(self.path)} and guest '{shown(name)}' "
                f"({shown(root)}) overlap; the store must lie outside every "
                f"guest tree (default: /vservers/.hash)"
            )

    def subdir(self, prefix: str, create: bool = False) -> int:
        fd = self._subdirs.get(prefix)
        if fd is None:
            if create:
                try:
                    os.mkdir(prefix, 0o700, dir_fd=self.fd)
                except FileExistsError:
                    pass
            fd = os.open(
                prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd
            )
            self._subdirs[prefix] = fd
        return fd

    def scan(self) -> dict[Key, list[StoreObject]]:
        """Every object, by key, generations in order.  Foreign names are ignored."""
        out: dict[Key, list[StoreObject]] = {}
        if self.fd < 0:
            return out
        # The directory fds are kept open: list each from its start again (btrfs goes on
        # from where the last listing ended, and so missed objects made since).
        os.lseek(self.fd, 0, os.SEEK_SET)
        with os.scandir(self.fd) as top:
            prefixes = sorted(
                e.name for e in top if len(e.name) == 2 and e.is_dir(follow_symlinks=False)
            )
        for prefix in prefixes:
            fd = self.subdir(prefix)
            os.lseek(fd, 0, os.SEEK_SET)
            with os.scandir(fd) as it:
                for e in it:
                    m = _NAME_RE.match(e.name)
                    if not m or m.group(1)[:2] != prefix:
                        continue
                    st = e.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    key = (bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2)))
                    gen = int(m.group(3) or 0)
                    out.setdefault(key, []).append(
                        StoreObject(
                            key,
                            gen,
                            f"{prefix}/{e.name}",
                            st.st_ino,
                            st.st_nlink,
                            st.st_size,
                            stamp=(st.st_mtime_ns, st.st_ctime_ns),
                        )
                    )
        for objs in out.values():
            objs.sort(key=lambda o: o.gen)
        return out

    def open_object(self, obj: StoreObject, flags: int = os.O_RDONLY) -> int:
        prefix, name = obj.name.split("/")
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.subdir(prefix))

    def dir_and_name(self, obj: StoreObject) -> tuple[int, str]:
        prefix, name = obj.name.split("/")
        return self.subdir(prefix), name

    def reserve(self, key: Key, taken: list[StoreObject], ino: int) -> StoreObject:
        """Name the next generation of ``key`` for inode ``ino``, without linking it yet."""
        gen = max((o.gen for o in taken), default=-1) + 1
        return StoreObject(key, gen, object_name(key, gen), ino, 0, 0)

    def link(self, fd: int, obj: StoreObject) -> None:
        """Link the open file ``fd`` into the store under ``obj``'s reserved name."""
        prefix, base = obj.name.split("/")
        syscalls.link_fd(fd, self.subdir(prefix, create=True), base)
        st = os.fstat(fd)
        obj.ino, obj.nlink, obj.size = st.st_ino, st.st_nlink, st.st_size

    @staticmethod
    def parse_name(name: str) -> Key | None:
        """The key an object name ('ab/<digest>-<meta>[.N]') stands for, or None."""
        m = _NAME_RE.match(name.rpartition("/")[2])
        return (bytes.fromhex(m.group(1)), bytes.fromhex(m.group(2))) if m else None

    def unlink(self, obj: StoreObject) -> None:
        d, name = self.dir_and_name(obj)
        try:
            os.unlink(name, dir_fd=d)
        except FileNotFoundError:
            pass
