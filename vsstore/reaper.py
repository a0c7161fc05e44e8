"""The pid 1 of sysv- and none-style guests: a tiny static program that only reaps orphans
and ends on SIGTERM/SIGINT/SIGPWR.  A forked Python would cost each guest ~11 MiB of private
memory; this costs a few pages.  It is compiled once (gcc -static, which scripts/setup
installs) into the state directory, opened on the host before pivot_root and executed by
descriptor inside the guest: it is our program, never the guest's, and needs no file there.
Without a compiler the Python fallback in lifecycle does the same job, and start says so.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("vsstore")

C_SOURCE = r"""
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
static void stop(int sig) { (void)sig; _exit(0); }
int main(void) {
    signal(SIGTERM, stop); signal(SIGINT, stop); signal(SIGPWR, stop);
    for (;;)
        if (wait(0) < 0)
            pause();
}
"""


def reaper_binary(statedir: Path) -> Path | None:
    """The compiled reaper (built on first use), or None when it cannot be built."""
    tag = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:12]
    path = statedir / "libexec" / f"vsreaper-{tag}"
    if path.exists():
        return path
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler: guests of style sysv/none get a Python pid 1 (~11 MiB "
                    "each); apt-get install gcc (scripts/setup does)")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        src, out = Path(d) / "vsreaper.c", Path(d) / "vsreaper"
        src.write_text(C_SOURCE)
        p = subprocess.run([cc, "-static", "-Os", "-s", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            log.warning("could not build the guest reaper (%s); guests of style sysv/none "
                        "get a Python pid 1", p.stderr.strip()[-300:])
            return None
        os.chmod(out, 0o755)
        os.replace(out, path)
    return path
