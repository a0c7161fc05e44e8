#!/usr/bin/env python3
"""What a user namespace costs at start: a guest started (``vserver NAME start`` until it
returns, then ``exec true`` to be sure it answers) and stopped, with and without
``userns/``, alternating, in one run.  Two guests per kind: a busybox skeleton (the
tests' guest) and, when the corpus has it, the Debian guest bookworm-systemd booting
systemd to ``running``.

    python bench/bench_userns.py [--rounds N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchhost import CORPUS, Host, emit, log

BUSYBOX = "/bin/busybox"


def _skeleton(h: Host, name: str) -> None:
    h.vserver(name, "build", "-m", "skeleton")
    root = h.base / "vservers" / name
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for a in ("sh", "sleep", "true"):
        os.symlink("busybox", root / "bin" / a)
    c = h.base / "etc" / name
    (c / "apps/init/cmd.start").write_text("/bin/sh\n-c\nexec sleep 100000\n")
    (c / "apps/init/style").write_text("plain\n")


def _systemd(h: Host, name: str) -> bool:
    src = CORPUS / "bookworm-systemd"
    if not src.is_dir():
        return False
    root = h.base / "vservers" / name
    subprocess.run(["cp", "-a", str(src), str(root)], check=True)
    c = h.base / "etc" / name
    (c / "apps/init").mkdir(parents=True)
    os.symlink(root, c / "vdir")
    (c / "apps/init/style").write_text("systemd\n")
    (c / "apps/init/cmd.start").write_text("/sbin/init\n")
    return True


def _once(h: Host, name: str, systemd: bool) -> float:
    t = time.monotonic()
    h.vserver(name, "start")
    if systemd:  # booted: systemd says so
        h.vserver(name, "exec", "systemctl", "is-system-running", "--wait", check=False)
    else:
        h.vserver(name, "exec", "true")
    took = time.monotonic() - t
    h.vserver(name, "stop")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--markdown")
    a = ap.parse_args()
    h = Host(Path(tempfile.mkdtemp(prefix="vsstore-bench-userns-", dir="/var/tmp")))
    (h.base / "vservers").mkdir()
    try:
        kinds = []
        for ns in ("classic", "userns"):
            _skeleton(h, f"bb-{ns}")
            kinds.append((f"bb-{ns}", "busybox skeleton", False))
            if _systemd(h, f"sd-{ns}"):
                kinds.append((f"sd-{ns}", "Debian bookworm, systemd to running", True))
        for name, _, _ in kinds:
            if name.endswith("-userns"):
                h.vserver(name, "userns", "enable")
        times: dict[str, list[float]] = {k[0]: [] for k in kinds}
        for r in range(a.rounds):
            for name, _what, sd in kinds:
                times[name].append(_once(h, name, sd))
            log(f"round {r + 1}/{a.rounds} done")
        rows = []
        for what in dict.fromkeys(k[1] for k in kinds):
            names = [k[0] for k in kinds if k[1] == what]
            cls = statistics.median(times[names[0]])
            uns = statistics.median(times[names[1]])
            rows.append(f"| {what} | {cls:.3f} | {uns:.3f} | {uns / cls:.2f} |")
        md = "\n".join(
            [
                f"## Start with and without a user namespace ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
                "",
                f"`python bench/bench_userns.py --rounds {a.rounds}`: `vserver NAME start` and "
                "the first `exec` answering (systemd: `systemctl is-system-running --wait`), "
                f"median of {a.rounds} alternating rounds, seconds; {os.cpu_count()} CPUs.",
                "",
                "| guest | classic | userns | ratio |",
                "|---|--:|--:|--:|",
                *rows,
                "",
            ]
        )
        emit(md, a.markdown)
    finally:
        for name in ("bb-classic", "bb-userns", "sd-classic", "sd-userns"):
            h.vserver(name, "stop", check=False)
        h.remove()


if __name__ == "__main__":
    main()
