"""What the guest benchmarks share: a throw-away host (every vsstore root moved into a
temporary directory), the corpus, dropping caches, and printing the markdown section."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")) / "debian"


# vsunify with no excludes at all and mtimes ignored: the content-only comparison with
# `hardlink -c` (bench_unify, bench_million).
CONTENT_ONLY = (
    "--no-default-excludes",
    "--no-pkgdb-excludes",
    "--ignore-mtime",
    "--min-size",
    "1",
)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Host:
    """vsunify and vserver run as subprocesses with every root below ``base``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.env = {
            **os.environ,
            "VSERVERS_CONFDIR": str(base / "etc"),
            "VSERVERS_ROOT": str(base / "vservers"),
            "VSSTORE_STATEDIR": str(base / "state"),
            "VSSTORE_RUNDIR": str(base / "run"),
            "VSSTORE_LOGDIR": str(base / "log"),
        }

    def cli(self, module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{module} {' '.join(args)}: exit {p.returncode}: {p.stderr}")
        return p

    def vserver(
        self, name: str, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("vsstore.lifecycle.cli", name, *args, check=check)

    def remove(self) -> None:
        """Unseal and remove everything below ``base`` (after the guests are stopped)."""
        subprocess.run(["fusermount3", "-u", "-z", str(self.base / "run/cow")], capture_output=True)
        from vsstore.attrs import unseal_tree

        unseal_tree(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def emit(md: str, markdown_file: str | None) -> None:
    print(md)
    if markdown_file:
        Path(markdown_file).write_text(md)
