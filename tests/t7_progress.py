"""Layer 7: clone and delete of a guest show a progress line with --progress (or on a
terminal).  Its content is checked, never its timing."""

from __future__ import annotations

import re

FILES = {f"usr/lib/f{i}": bytes([i]) * 20000 for i in range(40)}


def _lines(stderr: str, prefix: str) -> list[str]:
    """The progress lines (text mode reads their \r as a newline)."""
    return [
        ln.strip("\r\n") for ln in stderr.split("\x1b[K") if ln.strip("\r\n").startswith(prefix)
    ]


def test_clone_and_delete_show_their_progress(vs, host):
    vs.guest("src", files=FILES)
    p = vs("build", "copy", "-m", "clone", "--progress", "--", "--source", "src")
    lines = _lines(p.stderr, "clone into copy: ")
    assert lines, p.stderr
    n = re.match(r"clone into copy: (\d+) files", lines[-1])
    assert n is not None and int(n.group(1)) > 0  # redrawn at most every 0.1 s: any count
    assert (host.root / "copy/usr/lib/f7").read_bytes() == FILES["usr/lib/f7"]
    p = vs("delete", "copy", "--force", "--progress")
    lines = _lines(p.stderr, "delete copy: ")
    assert lines, p.stderr
    n = re.match(r"delete copy: (\d+) files", lines[-1])
    assert n is not None and int(n.group(1)) > 0  # redrawn at most every 0.1 s: any count
    assert not (host.root / "copy").exists()
    # without the option and without a terminal: no progress line
    vs("build", "copy2", "-m", "clone", "--", "--source", "src")
    p = vs("delete", "copy2", "--force")
    assert "\x1b[K" not in p.stderr
