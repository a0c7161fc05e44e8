"""One run at a time: an flock on a file in the run directory, holding the owner's pid."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, ConfigError


@contextmanager
def exclusive(
    path: Path,
    what: str,
    wait: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` or raise BusyError: at once, or after ``wait``
    seconds of trying (``on_wait`` is told the holder's pid once, when waiting begins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ConfigError(
            f"cannot create lock file {path}: {e.strerror}; "
            f"set VSSTORE_RUNDIR to a writable directory"
        ) from None
    try:
        deadline = time.monotonic() + wait
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"another {what} is running (pid {holder}, lock {path}); wait for "
                        f"it to finish" + (f" (waited {wait:.0f} s)" if wait else "")
                    ) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
