#!/usr/bin/env python3
"""Benchmark vsunify against hardlink -c, rdfind and jdupes on real Debian guest trees.

Run as root from the checkout (drops the page cache between runs)::

    /tmp/venv/bin/python bench/bench_unify.py [--cache DIR] [--work DIR] [--copies N]

Every tool gets its own fresh, identical copy of a guest set (the cached debootstrap trees
of bench/corpus.sh plus extra ``cp -a`` copies) and is timed, cold, on three phases:

* ``first``: the first run over the N guests;
* ``rerun``: the same command again, nothing changed (also timed warm: ``rerun-warm``);
* ``add``: one more guest is copied in, then the command runs over all N+1 guests.

Savings are measured per tool with ``du -sc --block-size=1`` over the whole set (du counts
each hardlinked inode once).  A markdown section with the figures, the command line and the
machine facts goes to stdout, and with ``--markdown FILE`` to FILE as well.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
BASE_GUESTS = ("bookworm-minbase", "bookworm-services", "trixie-minbase")
EXTRA_SOURCE = "bookworm-minbase"  # the source of --copies extra guests
ADDED_SOURCE = "bookworm-services"  # the guest added before the "add" phase
TOOLS = ("vsunify", "hardlink", "rdfind", "jdupes")
PHASES = ("first", "rerun", "rerun-warm", "add")
COLD = {"first": True, "rerun": True, "rerun-warm": False, "add": True}
FIRST_RUN_TARGET = 1.5  # vsunify first run at most this times hardlink's
CLEARLY_FASTER = 0.5  # "clearly faster": at most this times hardlink's


class BenchError(Exception):
    """A tool failed or the environment is not fit for the benchmark."""


@dataclass(slots=True)
class Sample:
    """One timed run of one tool in one phase."""

    wall: float
    cpu: float
    du_before: int
    du_after: int
    names: int = 0
    inodes: int = 0
    du_before_guests: int = 0  # vsunify: the guests without the store directory
    du_after_guests: int = 0
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def saved(self) -> int:
        return self.du_before - self.du_after

    @property
    def saved_guests(self) -> int:
        return self.du_before_guests - self.du_after_guests


@dataclass(slots=True)
class GuestInfo:
    """A guest of the set: its name, its corpus source and its size."""

    name: str
    source: str
    files: int
    apparent: int
    disk: int


@dataclass(slots=True)
class Context:
    """Paths and settings shared by all runs of one benchmark."""

    cache: Path
    work: Path
    copies: int
    rounds: int
    tools: tuple[str, ...]
    vsunify: str

    @property
    def corpus(self) -> Path:
        return self.cache / "debian"

    def guest_sources(self) -> list[tuple[str, str]]:
        """(guest name, corpus tree) of the first N guests."""
        srcs = list(BASE_GUESTS) + [EXTRA_SOURCE] * self.copies
        return [(f"g{i}", s) for i, s in enumerate(srcs, 1)]

    def added_guest(self) -> tuple[str, str]:
        return f"g{len(BASE_GUESTS) + self.copies + 1}", ADDED_SOURCE


# -- helpers -----------------------------------------------------------------------------


def sh(argv: Sequence[str | os.PathLike[str]]) -> str:
    """Run a helper command, return its stdout; raise BenchError on failure."""
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BenchError(f"{shlex.join(map(str, argv))}: exit {res.returncode}: "
                         f"{res.stderr.strip()[-2000:]}")
    return res.stdout


def drop_caches() -> None:
    """Write back dirty pages and drop the page, dentry and inode caches."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def du(paths: Sequence[Path]) -> int:
    """Bytes on disk of ``paths`` together, each inode counted once."""
    out = sh(["du", "-sc", "--block-size=1", "--", *paths])
    return int(out.strip().splitlines()[-1].split()[0])


def walk_files(root: Path) -> Iterator[os.stat_result]:
    """lstat of every regular file below ``root``, never following symlinks."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    yield e.stat(follow_symlinks=False)


def count_files(paths: Sequence[Path]) -> tuple[int, int]:
    """(regular file names, distinct regular-file inodes) below ``paths``."""
    names = 0
    inodes: set[tuple[int, int]] = set()
    for p in paths:
        for st in walk_files(p):
            names += 1
            inodes.add((st.st_dev, st.st_ino))
    return names, len(inodes)


def remove_tree(path: Path) -> None:
    """Clear immutable/append-only flags (vsunify seals shared inodes), then delete."""
    if not path.exists():
        return
    subprocess.run(["chattr", "-R", "-f", "-i", "-a", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    failed: list[str] = []
    shutil.rmtree(path, onerror=lambda _f, p, exc: failed.append(f"{p}: {exc[1]}"))
    if failed:
        print(f"bench: could not remove {len(failed)} paths below {path}, e.g. {failed[0]}",
              file=sys.stderr)


def fmt_bytes(n: float) -> str:
    """Human-readable binary size: '512 B', '1.5 MiB'."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


# -- the tools ---------------------------------------------------------------------------


def tool_command(tool: str, ctx: Context, rnd: Path, guests: list[Path],
                 ) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of ``tool`` over ``guests`` (content-only dedup)."""
    dirs = [str(g) for g in guests]
    if tool == "vsunify":
        env = {"VSSTORE_STATEDIR": str(rnd / "vsunify-state"),
               "VSSTORE_RUNDIR": str(rnd / "vsunify-run"),
               "VSERVERS_CONFDIR": str(rnd / "vsunify-conf"),
               "VSERVERS_ROOT": str(rnd / "vsunify")}
        return [ctx.vsunify, "run", "--no-default-excludes", "--ignore-mtime", "--min-size",
                "1", "--json", "--store", str(rnd / ".hash-vsunify"), *dirs], env
    if tool == "hardlink":
        return ["hardlink", "-c", *dirs], {}
    if tool == "rdfind":
        return ["rdfind", "-makehardlinks", "true", "-makeresultsfile", "false", *dirs], {}
    if tool == "jdupes":
        return ["jdupes", "-r", "-L", "-q", *dirs], {}
    raise ValueError(tool)


def timed_run(argv: list[str], env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Run ``argv``; return (wall seconds, user+sys CPU seconds of the child, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        rc = subprocess.run(argv, stdout=out, stderr=err, env={**os.environ, **env},
                            cwd=log.parent, check=False).returncode
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    text = log.read_text()
    if rc != 0:
        raise BenchError(f"{shlex.join(argv)}: exit {rc}\n"
                         f"{log.with_suffix('.err').read_text()[-2000:]}")
    return wall, cpu, text


def parse_hardlink_summary(out: str) -> dict[str, object]:
    """hardlink's closing 'Key:   value' lines (Method, Linked, Saved, Duration, ...)."""
    stats: dict[str, object] = {}
    for ln in out.splitlines():
        key, sep, value = ln.partition(":")
        if sep and key and not key.startswith(" ") and value.startswith("  "):
            stats.setdefault(key.strip(), value.strip())
    return stats


def tool_versions(ctx: Context) -> dict[str, str]:
    """One line of version information per tool."""
    from importlib.metadata import version
    try:
        rev = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
    except (BenchError, OSError):
        rev = "unknown"
    out = {"vsunify": f"vsstore {version('vsstore')} (checkout at commit {rev}, "
                      f"working tree as found), Python {platform.python_version()}"}
    probes = {"hardlink": ["hardlink", "--version"], "rdfind": ["rdfind", "--version"],
              "jdupes": ["jdupes", "-v"]}
    for tool, argv in probes.items():
        if tool in ctx.tools:
            out[tool] = sh(argv).strip().splitlines()[0]
    return out


# -- machine and corpus facts -------------------------------------------------------------


def machine_facts(work: Path) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
                 platform.machine())
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
    fs = sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", work]).strip()
    virt = "unknown"
    if shutil.which("systemd-detect-virt"):
        virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True,
                              check=False).stdout.strip() or "none"
    return {"cpu": f"{os.cpu_count()} cores, {model}", "ram": f"{mem_kb / 2**20:.1f} GiB",
            "kernel": f"{platform.system()} {platform.release()}",
            "os": _os_release(), "systemd-detect-virt": virt,
            "filesystem (findmnt FSTYPE SOURCE OPTIONS)": " ".join(fs.split())}


def _os_release() -> str:
    try:
        for ln in Path("/etc/os-release").read_text().splitlines():
            if ln.startswith("PRETTY_NAME="):
                return ln.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def corpus_info(ctx: Context) -> list[GuestInfo]:
    """Size of every guest of the N+1 set, from the corpus trees."""
    sizes: dict[str, tuple[int, int, int]] = {}
    out = []
    for name, src in [*ctx.guest_sources(), ctx.added_guest()]:
        if src not in sizes:
            tree = ctx.corpus / src
            files = apparent = 0
            for st in walk_files(tree):
                files += 1
                apparent += st.st_size
            sizes[src] = (files, apparent, du([tree]))
        out.append(GuestInfo(name, src, *sizes[src]))
    return out


# -- the benchmark -----------------------------------------------------------------------


def copy_guest(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    sh(["cp", "-a", "--", src, dst])


def measure(tool: str, ctx: Context, rnd: Path, guests: list[Path], phase: str) -> Sample:
    """Time ``tool`` over ``guests`` (cold unless the phase is a warm one)."""
    store = [rnd / ".hash-vsunify"] if tool == "vsunify" else []
    before = du(guests + [p for p in store if p.exists()])
    before_guests = du(guests) if store else before
    argv, env = tool_command(tool, ctx, rnd, guests)
    if COLD[phase]:
        drop_caches()
    wall, cpu, out = timed_run(argv, env, rnd / f"{tool}-{phase}.log")
    after = du(guests + store)
    names, inodes = count_files(guests)
    s = Sample(wall, cpu, before, after, names, inodes)
    if tool == "vsunify":
        s.du_before_guests, s.du_after_guests = before_guests, du(guests)
        s.stats = json.loads(out)
        if s.stats.get("errors"):
            raise BenchError(f"vsunify reported errors: {s.stats.get('messages')}")
    elif tool == "hardlink":
        s.stats = parse_hardlink_summary(out)
    print(f"bench: {phase:10} {tool:8} {wall:7.2f}s wall {cpu:7.2f}s cpu "
          f"saved {mib(s.saved):>7} MiB", file=sys.stderr, flush=True)
    return s


def one_round(ctx: Context, rnd: Path) -> dict[str, dict[str, Sample]]:
    """Fresh copies for every tool, then the phases side by side; returns samples."""
    sets = {t: [rnd / t / name for name, _ in ctx.guest_sources()] for t in ctx.tools}
    print(f"bench: copying {len(ctx.guest_sources())} guests for {len(ctx.tools)} tools to "
          f"{rnd}", file=sys.stderr, flush=True)
    for tool in ctx.tools:
        for (_name, src), dst in zip(ctx.guest_sources(), sets[tool], strict=True):
            copy_guest(ctx.corpus / src, dst)
    res: dict[str, dict[str, Sample]] = {p: {} for p in PHASES}
    for tool in ctx.tools:
        res["first"][tool] = measure(tool, ctx, rnd, sets[tool], "first")
    for tool in ctx.tools:  # the warm re-run right after the cold one, caches still full
        for phase in ("rerun", "rerun-warm"):
            res[phase][tool] = measure(tool, ctx, rnd, sets[tool], phase)
    added, src = ctx.added_guest()
    for tool in ctx.tools:
        copy_guest(ctx.corpus / src, rnd / tool / added)
        sets[tool].append(rnd / tool / added)
    for tool in ctx.tools:
        res["add"][tool] = measure(tool, ctx, rnd, sets[tool], "add")
    return res


def run_benchmark(ctx: Context) -> list[dict[str, dict[str, Sample]]]:
    rounds = []
    for r in range(ctx.rounds):
        rnd = ctx.work / f"round{r + 1}"
        rnd.mkdir()
        try:
            rounds.append(one_round(ctx, rnd))
        finally:
            remove_tree(rnd)
    return rounds


# -- reporting ---------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'1.23' for one value, '1.23 (1.10-1.40)' for several."""
    m = median(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ({min(xs):.2f}-{max(xs):.2f})"


def render(ctx: Context, rounds: list[dict[str, dict[str, Sample]]], guests: list[GuestInfo],
           facts: dict[str, str], versions: dict[str, str], argv: list[str],
           elapsed: float) -> str:
    """The markdown section with every figure of this benchmark."""
    tools = ctx.tools
    n = len(ctx.guest_sources())

    def vals(phase: str, tool: str, attr: str) -> list[float]:
        return [getattr(r[phase][tool], attr) for r in rounds]

    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    L: list[str] = [f"## Benchmark of {now}", ""]
    script = os.path.relpath(Path(__file__).resolve(), REPO)
    L += ["Command (as root, from the checkout):", "", "```",
          shlex.join([sys.executable, script, *argv]), "```", ""]
    L += [f"Total runtime {elapsed / 60:.1f} min, {ctx.rounds} round(s); figures are the "
          f"median{' (min-max)' if ctx.rounds > 1 else ''} over the rounds.", ""]
    L += ["### Machine", ""]
    L += [f"- {k}: {v}" for k, v in facts.items()]
    L += [f"- {k}: {v}" for k, v in versions.items()]
    if "hardlink" in tools:
        method = rounds[0]["first"]["hardlink"].stats.get("Method", "?")
        L.append(f"- hardlink comparison method used: {method} (its default is sha256 through "
                 f"the kernel crypto API, memcmp when that is unavailable)")
    L += ["", "### Corpus", ""]
    L += [f"{n} guests for the first runs, g{n + 1} added before the `add` phase; each a "
          f"`cp -a` of a debootstrap tree from `bench/corpus.sh` (cache {ctx.corpus}).", "",
          "| guest | source | regular files | apparent | on disk (du) |",
          "|---|---|--:|--:|--:|"]
    for g in guests:
        L.append(f"| {g.name} | {g.source} | {g.files} | {fmt_bytes(g.apparent)} | "
                 f"{fmt_bytes(g.disk)} |")
    first, everything = guests[:n], guests
    for label, gs in ((f"N={n}", first), (f"N+1={n + 1}", everything)):
        L.append(f"| **total {label}** | | {sum(g.files for g in gs)} | "
                 f"{fmt_bytes(sum(g.apparent for g in gs))} | "
                 f"{fmt_bytes(sum(g.disk for g in gs))} |")
    L += ["", "### Commands compared (content-only dedup)", ""]
    for tool in tools:
        argv_t, env = tool_command(tool, ctx, Path("WORK"), [Path("g1"), Path("...")])
        envs = " ".join(f"{k}=WORK/{Path(v).name}" for k, v in env.items())
        L.append(f"- {tool}: `{(envs + ' ') if envs else ''}{shlex.join(argv_t)}`")
    L += ["", "Cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before the run.  "
          "`rerun-warm` repeats `rerun` right after it, without dropping caches.", ""]

    L += ["### Wall time (seconds)", "",
          "| phase | " + " | ".join(tools) + " |", "|---|" + "--:|" * len(tools)]
    for phase in PHASES:
        cells = [spread(vals(phase, t, "wall")) for t in tools]
        label = f"{phase} ({n + 1 if phase == 'add' else n} guests)"
        L.append(f"| {label} | " + " | ".join(cells) + " |")
    L += ["", "### CPU time, user+sys (seconds)", "",
          "| phase | " + " | ".join(tools) + " |", "|---|" + "--:|" * len(tools)]
    for phase in PHASES:
        L.append(f"| {phase} | " + " | ".join(spread(vals(phase, t, "cpu")) for t in tools)
                 + " |")
    if "vsunify" in tools:
        others = [t for t in tools if t != "vsunify"]
        L += ["", "### Ratio of wall times, vsunify / other (below 1: vsunify is faster)", "",
              "| phase | " + " | ".join(f"vsunify/{t}" for t in others) + " |",
              "|---|" + "--:|" * len(others)]
        for phase in PHASES:
            cells = []
            for t in others:
                ratios = [r[phase]["vsunify"].wall / r[phase][t].wall for r in rounds]
                cells.append(f"{median(ratios):.2f}")
            L.append(f"| {phase} | " + " | ".join(cells) + " |")

    L += ["", "### Savings (du of the whole set, each inode once)", "",
          "| phase | " + " | ".join(f"{t} saved MiB" for t in tools) + " |",
          "|---|" + "--:|" * len(tools)]
    for phase in ("first", "rerun", "add"):
        L.append(f"| {phase} | " + " | ".join(mib(median(vals(phase, t, "saved")))
                                              for t in tools) + " |")
    tot: dict[str, float] = {}
    for t in tools:
        tot[t] = median([r["first"][t].saved + r["rerun"][t].saved + r["rerun-warm"][t].saved
                         + r["add"][t].saved for r in rounds])
    L.append("| **all phases** | " + " | ".join(f"**{mib(tot[t])}**" for t in tools) + " |")
    L.append("| set on disk after `add` (MiB) | "
             + " | ".join(mib(median(vals("add", t, "du_after"))) for t in tools) + " |")
    L.append("| distinct file inodes after `add` | "
             + " | ".join(str(int(median(vals("add", t, "inodes")))) for t in tools) + " |")
    L.append("| file names after `add` | "
             + " | ".join(str(int(median(vals("add", t, "names")))) for t in tools) + " |")
    if "vsunify" in tools:
        cells = [mib(median([r[p]["vsunify"].saved_guests for r in rounds]))
                 for p in ("first", "rerun", "add")]
        L += ["", "vsunify's figures include its store directory (`.hash-vsunify`: up to 256 "
              "prefix directories holding one more name per object; the objects are the "
              "guests' own inodes).  Without it, vsunify saved "
              f"{cells[0]} / {cells[1]} / {cells[2]} MiB (first / rerun / add)."]

    if "vsunify" in tools:
        L += ["", "### vsunify's own counters", "",
              "| phase | files_scanned | files_hashed | bytes_hashed | files_linked | "
              "bytes_saved | objects_created | duration s |", "|---|" + "--:|" * 7]
        for phase in PHASES:
            st = rounds[0][phase]["vsunify"].stats
            L.append(f"| {phase} | {st['files_scanned']} | {st['files_hashed']} | "
                     f"{st['bytes_hashed']} | {st['files_linked']} | {st['bytes_saved']} | "
                     f"{st['objects_created']} | {float(st['duration']):.2f} |")  # type: ignore[arg-type]

    if "vsunify" in tools and "hardlink" in tools:
        L += ["", "### Targets", ""]
        L += verdicts(rounds, n)
    return "\n".join(L) + "\n"


def verdicts(rounds: list[dict[str, dict[str, Sample]]], n: int) -> list[str]:
    """The issue's targets, each with its figure and MET / NOT MET."""
    def ratio(phase: str) -> float:
        return median([r[phase]["vsunify"].wall / r[phase]["hardlink"].wall for r in rounds])

    def ok(b: bool) -> str:
        return "**MET**" if b else "**NOT MET**"

    out = []
    r1, r2, r3 = ratio("first"), ratio("rerun"), ratio("add")
    out.append(f"- first run over {n} guests within {FIRST_RUN_TARGET}x of hardlink's time: "
               f"vsunify/hardlink = {r1:.2f}: {ok(r1 <= FIRST_RUN_TARGET)}")
    out.append(f"- unchanged re-run clearly faster than hardlink (taken as at most "
               f"{CLEARLY_FASTER}x): {r2:.2f}: {ok(r2 <= CLEARLY_FASTER)}")
    out.append(f"- run after adding guest g{n + 1} clearly faster than hardlink (at most "
               f"{CLEARLY_FASTER}x): {r3:.2f}: {ok(r3 <= CLEARLY_FASTER)}")
    for phase, label in (("first", "first run"), ("add", "added guest")):
        v = median([r[phase]["vsunify"].saved for r in rounds])
        vg = median([r[phase]["vsunify"].saved_guests for r in rounds])
        h = median([r[phase]["hardlink"].saved for r in rounds])
        diff = 100 * (v - h) / h if h else 0.0
        diff_g = 100 * (vg - h) / h if h else 0.0
        own = median([float(r[phase]["vsunify"].stats["bytes_saved"]) for r in rounds])  # type: ignore[arg-type]
        out.append(f"- savings equal to `hardlink -c` within 1% ({label}): vsunify "
                   f"{int(v)} B ({mib(v)} MiB, store directory counted) vs hardlink {int(h)} B "
                   f"({mib(h)} MiB), difference {diff:+.3f}%: {ok(abs(diff) <= 1)}; without "
                   f"the store directory {int(vg)} B, {diff_g:+.3f}%.  (vsunify's own "
                   f"bytes_saved, in st_size: {int(own)} B.)")
    return out


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")),
                   help="corpus cache of bench/corpus.sh (default: %(default)s)")
    p.add_argument("--work", type=Path, default=Path("/var/tmp"),
                   help="a temporary work directory is made (and removed) in here; it must "
                        "not be inside the checkout (default: %(default)s)")
    p.add_argument("--copies", type=int, default=2,
                   help=f"extra cp -a copies of {EXTRA_SOURCE} in the set (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat everything on fresh copies, report medians (default: %(default)s)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--vsunify", default=str(Path(sys.executable).parent / "vsunify"),
                   help="the vsunify executable (default: next to this Python)")
    p.add_argument("--markdown", type=Path, help="also write the markdown section to this file")
    a = p.parse_args(argv)
    if a.copies < 0 or a.rounds < 1:
        p.error("--copies must be >= 0 and --rounds >= 1")
    a.tools = tuple(t for t in a.tools.split(",") if t)
    unknown = set(a.tools) - set(TOOLS)
    if unknown:
        p.error(f"unknown tools: {', '.join(sorted(unknown))}")
    return a


def check_environment(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root (drops the page cache; vsunify sets immutable flags)")
    missing = [t for t in (*args.tools, "chattr", "du", "cp", "findmnt")
               if not shutil.which(args.vsunify if t == "vsunify" else t)]
    if missing:
        raise BenchError(f"missing: {', '.join(missing)} (scripts/setup installs them)")
    work = args.work.resolve()
    if work.is_relative_to(REPO):
        raise BenchError(f"--work {work} is inside the checkout; choose a directory outside it")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that cleanup runs
    t0 = time.monotonic()
    try:
        check_environment(args)
        sh(["bash", BENCH_DIR / "corpus.sh", args.cache])
        args.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="vsstore-bench-", dir=args.work))
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    ctx = Context(cache=args.cache, work=work, copies=args.copies, rounds=args.rounds,
                  tools=args.tools, vsunify=args.vsunify)
    try:
        guests = corpus_info(ctx)
        facts = machine_facts(work)
        versions = tool_versions(ctx)
        rounds = run_benchmark(ctx)
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        remove_tree(work)
    md = render(ctx, rounds, guests, facts, versions, argv, time.monotonic() - t0)
    print(md)
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
