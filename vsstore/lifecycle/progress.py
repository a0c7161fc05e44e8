"""A progress line for long lifecycle work (``build -m clone``, ``delete``): vsunify's
one-line display, fed by a counter that the tree walks tick (files and bytes done) without
handing it down through every recursive call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from unify.progress import Progress

_current: ContextVar[_Counter | None] = ContextVar("vsstore_lifecycle_progress", default=None)


class _Counter:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.files = 0
        self.bytes = 0

    def tick(self, nbytes: int) -> None:
        self.files += 1
        self.bytes += nbytes
        self.progress.update(self.files, self.bytes)


@contextmanager
def shown(what: str, enabled: bool) -> Iterator[None]:
    """While the block runs, ``tick`` draws ``WHAT: N files, BYTES (RATE)`` on stderr
    (when ``enabled``: on a terminal, or asked for with --progress); cleared at the end."""
    p = Progress(enabled)
    p.phase(what)
    token = _current.set(_Counter(p))
    try:
        yield
    finally:
        _current.reset(token)
        p.done()


def tick(nbytes: int = 0) -> None:
    """One more file (of ``nbytes``) done, if a progress line is shown."""
    c = _current.get()
    if c is not None:
        c.tick(nbytes)
