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


class Progress:
    def __init__(self, enabled: bool, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.out = out or sys.stderr
        self.name = ""
        self.total = 0
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def phase(self, name: str, total_bytes: int = 0) -> None:
        self.name, self.total = name, total_bytes
        self.t0 = time.monotonic()
        self.last = 0.0  # the first update of a phase always shows

    def update(self, files: int, nbytes: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        el = max(now - self.t0, 1e-6)
        line = f"{self.name}: {files} files"
        if nbytes:
            rate = nbytes / el
            line += f", {human(nbytes)} ({human(rate)}/s)"
            if self.total and rate > 0:
                line += f", ETA {max(self.total - nbytes, 0) / rate:.0f}s"
        self.out.write("\r\x1b[K" + line)
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.enabled and self.shown:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.shown = False
