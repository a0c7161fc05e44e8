"""Layer 4: long vsunify work shows a progress line with --progress (or on a terminal):
deunify and run.  Its content is checked, never its timing."""

from __future__ import annotations

import re

from unify.progress import human, line

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


def test_the_run_line_has_one_meaning_in_each_phase(host):
    """hash+link: files done of total, bytes done of total, rate, ETA; no second counter
    (the linker's) flips in between."""
    for g in "ab":
        host.guest(g, SHARED)
    p = host.vsunify("run", "--progress", "a", "b")
    lines = [ln.strip("\r\n") for ln in p.stderr.split("\x1b[K") if ln.strip()]
    hashing = [ln for ln in lines if ln.startswith("hash+link:")]
    assert hashing, lines
    for ln in hashing:
        m = re.fullmatch(
            r"hash\+link: (\d+) of (\d+) files, ([\d.]+ \w+) of ([\d.]+ \w+), "
            r"[\d.]+ \w+/s, ETA \d+s",
            ln,
        )
        assert m is not None, ln
        done, total = int(m.group(1)), int(m.group(2))
        assert 0 < done <= total <= 60
        assert m.group(4) == human(total * 20000)
    for ln in lines:
        assert ln.split(":")[0] in ("scan", "hash+link", "extents"), ln


def test_the_line_says_done_of_total_and_the_eta():
    assert line("hash+link", 1152, 8960, 10 << 20, 100 << 20, 10.0) == (
        "hash+link: 1152 of 8960 files, 10.0 MiB of 100.0 MiB, 1.0 MiB/s, ETA 1m30s"
    )
    assert line("scan", 300, 0, 3 << 20, 0, 2.0) == "scan: 300 files, 3.0 MiB, 1.5 MiB/s"
    assert line("x", 10, 40, 0, 0, 5.0) == "x: 10 of 40 files, ETA 15s"
    assert line("x", 0, 40, 0, 0, 5.0) == "x: 0 of 40 files"
