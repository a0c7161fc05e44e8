#!/usr/bin/env python3
"""vsunify against `hardlink -c` on a large synthetic host (issue 17).

Generates G guests with N files in all (90% the same in every guest, 10% each guest's
own; sizes log-normal, a few KiB; fixed seed) twice, one copy per tool, in a temporary
directory on the filesystem of /var/tmp; then runs both tools, alternating, for these
phases: first run (caches dropped), unchanged re-run warm (the tool's tree walked by `du`
just before) and cold (caches dropped), re-run after 1% of the files were replaced (an
upgrade: the same new content in every guest), and a run after one more guest was added.  Per run: wall time, CPU (user+sys) and peak RSS of
the tool's process (os.wait4), and the size of vsunify's index after the run.  Prints a
markdown table with the ratios; always removes the trees (unsealing the immutable store
objects first).  ``--tools vsunify --phases first,warm`` measures vsunify's memory on a
host too large to hold twice (5,000,000 names: 100 guests).

    nice python bench/bench_million.py [--guests 10] [--files 500000] [--markdown FILE]
                                       [--tools vsunify,hardlink] [--phases first,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchhost import CONTENT_ONLY, drop_caches, log  # noqa: E402

from vsstore.attrs import unseal_tree  # noqa: E402

SHARED = 0.9  # share of each guest's files that every guest has
CHANGED = 0.01  # share of the files the "changed" phase replaces
PER_DIR = 100  # files per directory
MAX_SIZE = 1 << 20
TOOLS = ("vsunify", "hardlink")
PHASES = ("first", "warm", "cold", "changed", "added")


def size_of(rnd: random.Random) -> int:
    """Log-normal around 2 KiB (most files of a distribution are small), 1 B to 1 MiB."""
    return max(1, min(MAX_SIZE, int(rnd.lognormvariate(7.6, 1.3))))


def rel_path(i: int) -> str:
    return f"d{i // (PER_DIR * 100):03d}/d{(i // PER_DIR) % 100:02d}/f{i:07d}"


def content(kind: str, i: int) -> bytes:
    rnd = random.Random(f"{kind}:{i}")
    return rnd.randbytes(size_of(rnd))


def write_guest(roots: list[Path], g: int, per_guest: int) -> None:
    """Guest ``g``'s files, the same bytes in each of ``roots`` (one per tool)."""
    shared = int(per_guest * SHARED)
    for i in range(per_guest):
        data = content("s", i) if i < shared else content(f"u{g}", i)
        rel = rel_path(i)
        for root in roots:
            p = root / rel
            if i % PER_DIR == 0:
                p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


def pick_changed(per_guest: int) -> list[int]:
    """CHANGED of the files: shared ones, replaced in every guest (an upgrade)."""
    shared = int(per_guest * SHARED)
    return random.Random(17).sample(range(shared), max(1, int(per_guest * CHANGED)))


def replace_some(roots: list[Path], guests: list[str], picks: list[int]) -> int:
    """Replace the ``picks`` in every guest by new content (the same in every guest), as
    an upgrade does: a new file renamed over the old name."""
    for i in picks:
        data = content("v2", i)
        for root in roots:
            for g in guests:
                p = root / g / rel_path(i)
                tmp = p.with_name(p.name + ".new")
                tmp.write_bytes(data)
                os.rename(tmp, p)
    return len(picks) * len(guests)


@dataclass
class Sample:
    wall: float
    cpu: float
    rss: int  # bytes
    out: str


def timed(argv: list[str], env: dict[str, str]) -> Sample:
    """Run ``argv``; its wall time, user+sys CPU and peak RSS (os.wait4: this child only)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    # Drain the pipes in the background so a talkative tool cannot block on them.
    outs: list[bytes] = []

    def drain() -> None:
        assert p.stdout is not None and p.stderr is not None
        outs.append(p.stdout.read())
        err = p.stderr.read()
        if err:
            outs.append(err)

    t = threading.Thread(target=drain)
    t.start()
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    t.join()
    out = outs[0].decode(errors="replace") if outs else ""
    if p.returncode != 0:
        err = outs[1].decode(errors="replace") if len(outs) > 1 else ""
        raise RuntimeError(f"{argv[:3]}...: exit {p.returncode}: {err[-2000:]}")
    return Sample(wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, out)


class Bench:
    def __init__(
        self,
        base: Path,
        guests: int,
        files: int,
        tools: tuple[str, ...] = TOOLS,
        phases: tuple[str, ...] = PHASES,
    ) -> None:
        self.base = base
        self.tools = tools
        self.phases = phases
        self.names = [f"g{i:03d}" for i in range(guests)]
        self.per_guest = files // guests
        self.v = base / "vsunify"
        self.h = base / "hardlink"
        self.env = {
            "VSERVERS_CONFDIR": str(base / "conf"),
            "VSERVERS_ROOT": str(self.v),
            "VSSTORE_STATEDIR": str(base / "state"),
            "VSSTORE_RUNDIR": str(base / "run"),
            "VSSTORE_LOGDIR": str(base / "log"),
        }
        # Compiled modules kept (as an installed package has them), below base.
        self.py_env = {
            **self.env,
            "PYTHONPATH": str(REPO),
            "PYTHONPYCACHEPREFIX": str(base / "pycache"),
            "PYTHONDONTWRITEBYTECODE": "",
        }
        # Per phase: vsunify's and hardlink's samples (None: not run), the index's bytes.
        self.rows: list[tuple[str, Sample | None, Sample | None, int]] = []

    def roots(self) -> list[Path]:
        """One tree per tool measured."""
        return [
            root for tool, root in (("vsunify", self.v), ("hardlink", self.h)) if tool in self.tools
        ]

    def make(self) -> None:
        t0 = time.monotonic()
        for g, name in enumerate(self.names):
            write_guest([r / name for r in self.roots()], g, self.per_guest)
        log(
            f"{len(self.names)} x {self.per_guest} files made {len(self.roots())} time(s) "
            f"in {time.monotonic() - t0:.0f} s"
        )

    def index_bytes(self) -> int:
        """vsunify's index on disk (the database and its write-ahead log)."""
        state = self.base / "state"
        return sum(p.stat().st_size for p in state.glob("index.sqlite*")) if state.exists() else 0

    def vsunify(self) -> Sample:
        argv = [
            sys.executable,
            "-m",
            "unify.cli",
            "run",
            *CONTENT_ONLY,
            "--json",
            "--store",
            str(self.v / ".hash"),
            *(str(self.v / n) for n in self.names),
        ]
        return timed(argv, self.py_env)

    def hardlink(self) -> Sample:
        return timed(["hardlink", "-c", *(str(self.h / n) for n in self.names)], {})

    def phase(self, label: str, cold: bool) -> None:
        samples: list[Sample | None] = []
        for name, tool, tree in (
            ("vsunify", self.vsunify, self.v),
            ("hardlink", self.hardlink, self.h),
        ):
            if name not in self.tools:
                samples.append(None)
                continue
            if cold:
                drop_caches()
            else:
                # Warm: this tool's tree walked just before (every directory and inode
                # read, untimed): a machine that reclaims its page cache on its own (this
                # VM does) or the other tool's run in between could leave it cold.
                subprocess.run(["du", "-s", str(tree)], stdout=subprocess.DEVNULL, check=True)
            samples.append(tool())
        v, h = samples
        idx = self.index_bytes()
        self.rows.append((label, v, h, idx))
        said = [label + ":"]
        if v is not None:
            said.append(f"vsunify {v.wall:.2f} s {v.cpu:.1f} cpu {v.rss >> 20} MiB")
            try:
                js = json.loads(v.out)
                said.append(f"(hashed {js['files_hashed']}, linked {js['files_linked']},")
            except (ValueError, KeyError):
                said.append("(")
            said.append(f"index {idx / 2**20:.1f} MiB);")
        if h is not None:
            said.append(f"hardlink {h.wall:.2f} s {h.cpu:.1f} cpu {h.rss >> 20} MiB")
        log(" ".join(said))

    def run(self) -> None:
        self.make()
        if "first" in self.phases:
            self.phase("first run (cold)", cold=True)
        if "warm" in self.phases:
            self.phase("unchanged re-run, warm", cold=False)
        if "cold" in self.phases:
            self.phase("unchanged re-run, cold", cold=True)
        if "changed" in self.phases:
            picks = pick_changed(self.per_guest)
            if "vsunify" in self.tools:
                for name in self.names:  # unified files are sealed: made private first, untimed
                    timed(
                        [sys.executable, "-m", "unify.cli", "deunify", "--json"]
                        + [str(self.v / name)]
                        + ["/" + rel_path(i) for i in picks],
                        self.py_env,
                    )
            n = replace_some(self.roots(), self.names, picks)
            log(f"{n} files replaced")
            self.phase("re-run after 1% changed (warm)", cold=False)
        if "added" in self.phases:
            g = len(self.names)
            name = f"g{g:03d}"
            write_guest([r / name for r in self.roots()], g, self.per_guest)
            self.names.append(name)
            self.phase("one guest added (warm)", cold=False)

    def remove(self) -> None:
        if not self.base.exists():
            return
        unseal_tree(self.v / ".hash")  # every sealed inode has a name in the store
        failed: list[str] = []
        shutil.rmtree(self.base, onerror=lambda *_a: failed.append("x"))
        if failed or self.base.exists():  # sealed inodes without a store name
            unseal_tree(self.base)
            shutil.rmtree(self.base, ignore_errors=True)


def markdown(b: Bench, guests: int, files: int, cmd: str, took: float) -> str:
    out = [
        f"### {guests} guests x {files // guests} files "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"`{cmd}`; {os.cpu_count()} cores, {platform.release()}, "
        f"Python {platform.python_version()}; total {took / 60:.1f} min.",
        "",
        "| phase | vsunify wall (s) | hardlink wall (s) | ratio | vsunify CPU (s) | "
        "hardlink CPU (s) | ratio | vsunify peak RSS (MiB) | hardlink peak RSS (MiB) | "
        "vsunify index (MiB) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]

    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    for label, v, h, idx in b.rows:
        wall = v.wall / h.wall if v and h else None
        cpu = v.cpu / max(h.cpu, 0.01) if v and h else None
        out.append(
            f"| {label} | {f(v and v.wall, '.2f')} | {f(h and h.wall, '.2f')} | "
            f"{f(wall, '.2f')} | {f(v and v.cpu, '.1f')} | {f(h and h.cpu, '.1f')} | "
            f"{f(cpu, '.2f')} | {f(v and v.rss / 2**20, '.0f')} | "
            f"{f(h and h.rss / 2**20, '.0f')} | {f(v and idx / 2**20, '.1f')} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--files", type=int, default=500_000, help="files in all the guests")
    ap.add_argument("--markdown", metavar="FILE", help="append the table to FILE")
    ap.add_argument("--dir", default="/var/tmp", help="where the temporary host goes")
    ap.add_argument(
        "--tools", default=",".join(TOOLS), help="which of vsunify,hardlink to run (both)"
    )
    ap.add_argument("--phases", default=",".join(PHASES), help=f"which of {','.join(PHASES)} (all)")
    args = ap.parse_args()
    tools = tuple(t for t in args.tools.split(",") if t)
    phases = tuple(p for p in args.phases.split(",") if p)
    if not tools or set(tools) - set(TOOLS) or set(phases) - set(PHASES):
        print(
            f"bench_million: --tools takes {','.join(TOOLS)}, --phases {','.join(PHASES)}",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print("bench_million: run as root (drops caches; vsunify seals objects)", file=sys.stderr)
        return 2
    if "hardlink" in tools and not shutil.which("hardlink"):
        print("bench_million: hardlink (util-linux) not found", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))
    base = Path(tempfile.mkdtemp(prefix="vsstore-bench-million-", dir=args.dir))
    b = Bench(base, args.guests, args.files, tools, phases)
    t0 = time.monotonic()
    try:
        b.run()
    finally:
        b.remove()
    cmd = "python bench/bench_million.py " + " ".join(sys.argv[1:])
    md = markdown(b, args.guests, args.files, cmd.strip(), time.monotonic() - t0)
    print(md)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
