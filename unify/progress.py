"""A one-line progress display on a terminal (files, bytes, rate, ETA); silent otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def line(
    phase: str, files: int, total_files: int, nbytes: int, total_bytes: int, elapsed: float
) -> str:
    """The progress line, one meaning in every phase: files done (of total), bytes done (of
    total), rate, ETA (from the bytes, else the files; only when a total is known)::

        hash+link: 1152 of 8960 files, 24.1 MiB of 191.8 MiB, 12.0 MiB/s, ETA 14s
    """
    el = max(elapsed, 1e-6)
    out = f"{phase}: {files} of {total_files} files" if total_files else f"{phase}: {files} files"
    if total_bytes:
        out += f", {human(nbytes)} of {human(total_bytes)}"
    elif nbytes:
        out += f", {human(nbytes)}"
    if nbytes:
        out += f", {human(nbytes / el)}/s"
    if total_bytes and nbytes:
        out += f", ETA {_duration((total_bytes - min(nbytes, total_bytes)) / (nbytes / el))}"
    elif total_files and files and not total_bytes:
        out += f", ETA {_duration((total_files - min(files, total_files)) / (files / el))}"
    return out


class Progress:
    """One line on a terminal, redrawn at most ten times a second: ``line()``'s figures of
    the current phase.  ``refresh()`` redraws the last figures (a phase's slow step that
    moves no counter: the rate and ETA go on)."""

    def __init__(self, enabled: bool, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.out = out or sys.stderr
        self.name = ""
        self.total_files = self.total_bytes = 0
        self.files = self.nbytes = 0
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def phase(self, name: str, total_files: int = 0, total_bytes: int = 0) -> None:
        self.name, self.total_files, self.total_bytes = name, total_files, total_bytes
        self.files = self.nbytes = 0
        self.t0 = time.monotonic()
        self.last = 0.0  # the first update of a phase always shows

    def update(self, files: int, nbytes: int) -> None:
        self.files, self.nbytes = files, nbytes
        self.refresh()

    def refresh(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        text = line(
            self.name, self.files, self.total_files, self.nbytes, self.total_bytes, now - self.t0
        )
        self.out.write("\r\x1b[K" + text)
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.enabled and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False
