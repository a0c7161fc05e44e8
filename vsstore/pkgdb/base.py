"""What every package-database reader shares: the result type, the error type, the limits,
and bounded reads through the guest's safe tree access.

A guest's package database is hostile input.  Readers are pure Python, never run guest
code, read every file through ``GuestTree`` (no symlink followed, no mount crossed) and stop
at hard limits, so that any input costs bounded time and memory.  Whatever is wrong with a
database is reported as ``PkgDbError`` naming the file; nothing else may escape a reader.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from ..errors import UnsafeTreeError
from ..names import shown
from ..safetree import GuestTree


class PkgDbError(UnsafeTreeError):
    """A package database that cannot be read or makes no sense.  The message names the
    guest's file (as the guest sees it) and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits for one guest's databases.  Generous for real systems (a full Fedora or
    Debian install is far below each), small enough that a hostile file cannot hurt."""

    max_file_bytes: int = 256 << 20  # one database file
    max_total_bytes: int = 1 << 30  # all files read for one guest
    max_dir_entries: int = 200_000  # names listed in one directory (e.g. dpkg/info)
    max_packages: int = 100_000
    max_paths: int = 4_000_000  # owned paths, all packages together
    max_path_bytes: int = 4096  # one path
    max_line_bytes: int = 1 << 20  # one line or field
    max_header_entries: int = 100_000  # rpm: index entries in one header


@dataclass(slots=True)
class PackageFiles:
    """What one database says.  Paths are absolute inside the guest ('/etc/passwd')."""

    manager: str  # 'dpkg', 'rpm', 'apk', 'pacman'
    source: str  # the database, as the guest sees it
    config: dict[str, str] = field(default_factory=dict)  # path -> package
    owned: dict[str, str | None] = field(default_factory=dict)  # path -> digest or None


class Budget:
    """Counts what one guest's readers consumed against the limits."""

    def __init__(self, tree: GuestTree, limits: Limits, want_owned: bool = True) -> None:
        self.tree = tree
        self.limits = limits
        self.want_owned = want_owned  # False: config files are enough (readers may skip work)
        self.bytes_read = 0

    def where(self, rel: str) -> str:
        return f"guest '{shown(self.tree.name)}': /{shown(rel)}"

    def fail(self, rel: str, what: str) -> PkgDbError:
        return PkgDbError(f"{self.where(rel)}: {what}")

    def exists(self, rel: str) -> bool:
        """Whether ``rel`` is there as a regular file or directory (not a symlink)."""
        try:
            fd = self.tree.open_beneath(rel, os.O_PATH)
        except OSError:
            return False
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        return stat.S_ISREG(mode) or stat.S_ISDIR(mode)

    def read(self, rel: str) -> bytes:
        """The whole regular file ``rel``, within the limits."""
        try:
            fd = self.tree.open_regular(rel)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self.fail(rel, "is a symlink (never followed)") from None
            raise self.fail(rel, f"cannot open: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size > self.limits.max_file_bytes:
                raise self.fail(
                    rel, f"{size} bytes, more than the limit of {self.limits.max_file_bytes}"
                )
            if self.bytes_read + size > self.limits.max_total_bytes:
                raise self.fail(
                    rel,
                    "the guest's package databases exceed the read limit of "
                    f"{self.limits.max_total_bytes} bytes",
                )
            chunks, got = [], 0
            while got <= size:  # a file growing while we read is cut at size + 1 bytes
                data = os.read(fd, min(1 << 20, size + 1 - got))
                if not data:
                    break
                chunks.append(data)
                got += len(data)
            self.bytes_read += got
            return b"".join(chunks)[:size]
        except OSError as e:
            raise self.fail(rel, f"cannot read: {e.strerror}") from None
        finally:
            os.close(fd)

    def listdir(self, rel: str) -> list[str]:
        """Names in directory ``rel``, within the limit."""
        try:
            fd = self.tree.open_beneath(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise self.fail(rel, f"cannot open directory: {e.strerror}") from None
        names: list[str] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    names.append(entry.name)
                    if len(names) > self.limits.max_dir_entries:
                        raise self.fail(rel, f"more than {self.limits.max_dir_entries} entries")
        except OSError as e:
            raise self.fail(rel, f"cannot list: {e.strerror}") from None
        finally:
            os.close(fd)
        return sorted(names)

    def check_path(self, rel: str, path: str) -> str:
        """A path as a database names it: absolute, normalised, bounded."""
        if len(path) > self.limits.max_path_bytes:
            raise self.fail(rel, f"a path longer than {self.limits.max_path_bytes} bytes")
        if "\0" in path:
            raise self.fail(rel, "a path with a NUL character")
        if not path.startswith("/"):
            path = "/" + path
        parts = [p for p in path.split("/") if p and p != "."]
        if ".." in parts:
            raise self.fail(rel, f"a path with '..': {path[:200]!r}")
        return "/" + "/".join(parts)


def decode(data: bytes) -> str:
    """Database text as str; undecodable bytes survive as surrogates (like file names)."""
    return data.decode("utf-8", errors="surrogateescape")
