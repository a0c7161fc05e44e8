"""Layer 4: long vsunify work shows a progress line with --progress (or on a terminal):
deunify and run.  Its content is checked, never its timing."""

from __future__ import annotations

import re

SHARED = {f"usr/lib/f{i}": bytes([i]) * 20000 for i in range(30)}


def test_deunify_shows_its_progress_with_the_option(host):
    for g in "ab":
        host.guest(g, SHARED)
    host.vsunify("run", "a", "b")
    quiet = host.vsunify("deunify", "a")  # stderr is no terminal: silent
    assert "\x1b[K" not in quiet.stderr
    host.vsunify("run", "a", "b")
    p = host.vsunify("deunify", "--progress", "a")
    # (text mode reads the line's \r as a newline)
    lines = [ln.strip("\r\n") for ln in p.stderr.split("\x1b[K") if ln.strip()]
    assert lines and all(ln.startswith("deunify a: made private: ") for ln in lines), lines
    last = re.match(r"deunify a: made private: (\d+) files", lines[-1])
    assert last is not None and 0 < int(last.group(1)) <= 30
    assert "a: 30 files made private" in p.stdout


def test_run_shows_its_progress_with_the_option(host):
    for g in "ab":
        host.guest(g, SHARED)
    p = host.vsunify("run", "--progress", "a", "b")
    assert "\x1b[K" in p.stderr and " files" in p.stderr
