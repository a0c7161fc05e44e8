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
import hashlib
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
from importlib.metadata import version
from pathlib import Path

from benchhost import CONTENT_ONLY

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
    read: int  # bytes the run read from disk (ru_inblock)
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
class Round:
    """Every sample of one round, by phase and tool, and the cold walk floor."""

    samples: dict[str, dict[str, Sample]]
    walk_cold: float  # cold `find` over the N guests: no re-run can be faster


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
        raise BenchError(
            f"{shlex.join(map(str, argv))}: exit {res.returncode}: {res.stderr.strip()[-2000:]}"
        )
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
    subprocess.run(
        ["chattr", "-R", "-f", "-i", "-a", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    failed: list[str] = []
    shutil.rmtree(path, onerror=lambda _f, p, exc: failed.append(f"{p}: {exc[1]}"))
    if failed:
        print(
            f"bench: could not remove {len(failed)} paths below {path}, e.g. {failed[0]}",
            file=sys.stderr,
        )


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


def tool_command(
    tool: str,
    ctx: Context,
    rnd: Path,
    guests: list[Path],
) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment of ``tool`` over ``guests`` (content-only dedup)."""
    dirs = [str(g) for g in guests]
    if tool == "vsunify":
        env = {
            "VSSTORE_STATEDIR": str(rnd / "vsunify-state"),
            "VSSTORE_RUNDIR": str(rnd / "vsunify-run"),
            "VSERVERS_CONFDIR": str(rnd / "vsunify-conf"),
            "VSERVERS_ROOT": str(rnd / "vsunify"),
        }
        # No excludes at all, like the others: the content-only comparison.
        return [
            ctx.vsunify,
            "run",
            *CONTENT_ONLY,
            "--json",
            "--store",
            str(rnd / ".hash-vsunify"),
            *dirs,
        ], env
    if tool == "hardlink":
        return ["hardlink", "-c", *dirs], {}
    if tool == "rdfind":
        return ["rdfind", "-makehardlinks", "true", "-makeresultsfile", "false", *dirs], {}
    if tool == "jdupes":
        return ["jdupes", "-r", "-L", "-q", *dirs], {}
    raise ValueError(tool)


def timed_run(
    argv: list[str],
    env: dict[str, str],
    log: Path,
) -> tuple[float, float, int, str]:
    """Run ``argv``; return wall seconds, the child's user+sys CPU seconds, the bytes it
    read from disk, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        rc = subprocess.run(
            argv, stdout=out, stderr=err, env={**os.environ, **env}, cwd=log.parent, check=False
        ).returncode
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    read = (after.ru_inblock - before.ru_inblock) * 512
    text = log.read_text()
    if rc != 0:
        raise BenchError(
            f"{shlex.join(argv)}: exit {rc}\n{log.with_suffix('.err').read_text()[-2000:]}"
        )
    return wall, cpu, read, text


def parse_hardlink_summary(out: str) -> dict[str, object]:
    """hardlink's closing 'Key:   value' lines (Method, Linked, Saved, Duration, ...)."""
    stats: dict[str, object] = {}
    for ln in out.splitlines():
        key, sep, value = ln.partition(":")
        if sep and key and not key.startswith(" ") and value.startswith("  "):
            stats.setdefault(key.strip(), value.strip())
    return stats


SOURCE_DIRS = ("vsstore", "unify")  # what vsunify runs, edited by others meanwhile


def source_state(dirs: Sequence[str] = SOURCE_DIRS) -> tuple[str, str]:
    """(description, fingerprint) of the benchmarked source (``dirs`` of the checkout): the
    commit, and whether the working tree matches it.  Read-only git commands only."""
    files = sorted(
        str(p.relative_to(REPO))
        for d in dirs
        for p in (REPO / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    try:
        blobs = sh(["git", "-C", REPO, "hash-object", "--", *files]).split()
        head = sh(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
        listed = sh(["git", "-C", REPO, "ls-tree", "-r", "HEAD", "--", *dirs])
    except (BenchError, OSError):
        data = b"".join(f.encode() + (REPO / f).read_bytes() for f in files)
        return "not a git checkout", hashlib.sha256(data).hexdigest()[:12]
    work = dict(zip(files, blobs, strict=True))
    committed = {ln.split("\t", 1)[1]: ln.split()[2] for ln in listed.splitlines()}
    fp = hashlib.sha256(repr(sorted(work.items())).encode()).hexdigest()[:12]
    state = "identical to it" if work == committed else "WITH UNCOMMITTED CHANGES"
    return (
        f"commit {head}, {'/ '.join(dirs)}/ in the working tree {state} (source fingerprint {fp})"
    ), fp


def tool_versions(ctx: Context, source: str) -> dict[str, str]:
    """One line of version information per tool."""
    out = {"vsunify": f"vsstore {version('vsstore')}, {source}, Python {platform.python_version()}"}
    probes = {
        "hardlink": ["hardlink", "--version"],
        "rdfind": ["rdfind", "--version"],
        "jdupes": ["jdupes", "-v"],
    }
    for tool, argv in probes.items():
        if tool in ctx.tools:
            out[tool] = sh(argv).strip().splitlines()[0]
    return out


# -- machine and corpus facts -------------------------------------------------------------


def machine_facts(work: Path) -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
        platform.machine(),
    )
    mem_kb = next(
        int(ln.split()[1])
        for ln in Path("/proc/meminfo").read_text().splitlines()
        if ln.startswith("MemTotal:")
    )
    fs = sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", work]).strip()
    virt = "unknown"
    if shutil.which("systemd-detect-virt"):
        virt = (
            subprocess.run(
                ["systemd-detect-virt"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or "none"
        )
    return {
        "cpu": f"{os.cpu_count()} cores, {model}",
        "ram": f"{mem_kb / 2**20:.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_release(),
        "systemd-detect-virt": virt,
        "filesystem (findmnt FSTYPE SOURCE OPTIONS)": " ".join(fs.split()),
    }


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
    wall, cpu, read, out = timed_run(argv, env, rnd / f"{tool}-{phase}.log")
    after = du(guests + store)
    names, inodes = count_files(guests)
    s = Sample(wall, cpu, read, before, after, names, inodes)
    if tool == "vsunify":
        s.du_before_guests, s.du_after_guests = before_guests, du(guests)
        s.stats = json.loads(out)
        if s.stats.get("errors"):
            raise BenchError(f"vsunify reported errors: {s.stats.get('messages')}")
    elif tool == "hardlink":
        s.stats = parse_hardlink_summary(out)
    print(
        f"bench: {phase:10} {tool:8} {wall:7.2f}s wall {cpu:7.2f}s cpu "
        f"read {mib(read):>7} MiB saved {mib(s.saved):>7} MiB",
        file=sys.stderr,
        flush=True,
    )
    return s


def walk_floor(guests: list[Path]) -> float:
    """Cold wall time of `find` lstat-ing every name below ``guests``."""
    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(
        ["find", *map(str, guests), "-printf", "%i %s\n"], stdout=subprocess.DEVNULL, check=True
    )
    return time.perf_counter() - t0


def one_round(ctx: Context, rnd: Path) -> Round:
    """Fresh copies for every tool, then the phases side by side; returns samples."""
    sets = {t: [rnd / t / name for name, _ in ctx.guest_sources()] for t in ctx.tools}
    print(
        f"bench: copying {len(ctx.guest_sources())} guests for {len(ctx.tools)} tools to {rnd}",
        file=sys.stderr,
        flush=True,
    )
    for tool in ctx.tools:
        for (_name, src), dst in zip(ctx.guest_sources(), sets[tool], strict=True):
            copy_guest(ctx.corpus / src, dst)
    res: dict[str, dict[str, Sample]] = {p: {} for p in PHASES}
    for tool in ctx.tools:
        res["first"][tool] = measure(tool, ctx, rnd, sets[tool], "first")
    for tool in ctx.tools:  # the warm re-run right after the cold one, caches still full
        for phase in ("rerun", "rerun-warm"):
            res[phase][tool] = measure(tool, ctx, rnd, sets[tool], phase)
    floor = walk_floor(sets[ctx.tools[0]])
    added, src = ctx.added_guest()
    for tool in ctx.tools:
        copy_guest(ctx.corpus / src, rnd / tool / added)
        sets[tool].append(rnd / tool / added)
    for tool in ctx.tools:
        res["add"][tool] = measure(tool, ctx, rnd, sets[tool], "add")
    return Round(res, floor)


def run_benchmark(ctx: Context) -> list[Round]:
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


def values(rounds: list[Round], phase: str, tool: str, attr: str) -> list[float]:
    """One attribute of a tool's sample in ``phase``, per round."""
    return [float(getattr(r.samples[phase][tool], attr)) for r in rounds]


def ratio(rounds: list[Round], phase: str, tool: str, other: str) -> float:
    """Median over the rounds of the wall-time ratio tool / other."""
    return median([r.samples[phase][tool].wall / r.samples[phase][other].wall for r in rounds])


def spread(xs: Sequence[float]) -> str:
    """'1.23' for one value, '1.23 (1.10-1.40)' for several."""
    m = median(xs)
    return f"{m:.2f}" if len(xs) == 1 else f"{m:.2f} ({min(xs):.2f}-{max(xs):.2f})"


def table(head: Sequence[str], rows: list[Sequence[str]], left: int = 1) -> list[str]:
    """A markdown table, the first ``left`` columns left-aligned, the others right-aligned."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * left + "--:|" * (len(head) - left)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


@dataclass(slots=True)
class Report:
    """Everything the markdown section shows."""

    ctx: Context
    rounds: list[Round]
    guests: list[GuestInfo]
    facts: dict[str, str]
    versions: dict[str, str]
    argv: list[str]
    elapsed: float
    source_changed: bool

    @property
    def n(self) -> int:
        return len(self.ctx.guest_sources())


def render(rep: Report) -> str:
    """The markdown section with every figure of this benchmark."""
    parts = [_header(rep), _corpus(rep), _times(rep), _savings(rep)]
    if "vsunify" in rep.ctx.tools:
        parts.append(_counters(rep))
        if "hardlink" in rep.ctx.tools:
            parts.append(["### Targets", "", *verdicts(rep)])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def _header(rep: Report) -> list[str]:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    script = os.path.relpath(Path(__file__).resolve(), REPO)
    many = rep.ctx.rounds > 1
    out = [
        f"## Benchmark of {now}",
        "",
        "Command (as root, from the checkout):",
        "",
        "```",
        shlex.join([sys.executable, script, *rep.argv]),
        "```",
        "",
        f"Total runtime {rep.elapsed / 60:.1f} min, {rep.ctx.rounds} round(s) on fresh "
        f"copies; figures are the median{' (min-max)' if many else ''} over the rounds.",
        "",
    ]
    if rep.source_changed:
        out += [
            "**WARNING: vsunify's source changed while the benchmark ran; its figures may "
            "mix two versions.**",
            "",
        ]
    out += ["### Machine and tools", ""]
    out += [f"- {k}: {v}" for k, v in rep.facts.items()]
    out += [f"- {k}: {v}" for k, v in rep.versions.items()]
    if "hardlink" in rep.ctx.tools:
        method = rep.rounds[0].samples["first"]["hardlink"].stats.get("Method", "?")
        out.append(
            f"- hardlink's comparison method in these runs: {method} (it uses sha256 "
            f"through the kernel crypto API when available, else memcmp)"
        )
    return out


def _corpus(rep: Report) -> list[str]:
    n, ctx = rep.n, rep.ctx
    rows = [
        [g.name, g.source, str(g.files), fmt_bytes(g.apparent), fmt_bytes(g.disk)]
        for g in rep.guests
    ]
    for label, gs in ((f"N={n}", rep.guests[:n]), (f"N+1={n + 1}", rep.guests)):
        rows.append(
            [
                f"**total {label}**",
                "",
                str(sum(g.files for g in gs)),
                fmt_bytes(sum(g.apparent for g in gs)),
                fmt_bytes(sum(g.disk for g in gs)),
            ]
        )
    out = [
        "### Corpus",
        "",
        f"{n} guests for the first runs, g{n + 1} added before the `add` phase; each a "
        f"`cp -a` of a debootstrap tree made by `bench/corpus.sh` (cache {ctx.corpus}).",
        "",
    ]
    out += table(["guest", "source", "regular files", "apparent", "on disk (du)"], rows, left=2)
    out += ["", "### Commands compared (content-only dedup)", ""]
    for tool in ctx.tools:
        argv, env = tool_command(tool, ctx, Path("WORK"), [Path("g1"), Path("...")])
        envs = "".join(f"{k}=WORK/{Path(v).name} " for k, v in env.items())
        out.append(f"- {tool}: `{envs}{shlex.join(argv)}`")
    out += [
        "",
        "Every tool works on its own copy of the set.  Cold: `sync; echo 3 > "
        "/proc/sys/vm/drop_caches` before the run.  `rerun-warm` repeats `rerun` right "
        "after it, without dropping caches.",
    ]
    return out


def _times(rep: Report) -> list[str]:
    tools, rounds, n = rep.ctx.tools, rep.rounds, rep.n
    out = ["### Wall time (seconds)", ""]
    out += table(
        ["phase", *tools],
        [
            [
                f"{p} ({n + 1 if p == 'add' else n} guests)",
                *(spread(values(rounds, p, t, "wall")) for t in tools),
            ]
            for p in PHASES
        ],
    )
    floor = [r.walk_cold for r in rounds]
    out += [
        "",
        f"For scale: a cold `find` that lstats every name of the {n} guests takes "
        f"{spread(floor)} s; no re-run that looks at every file can be faster.",
    ]
    out += ["", "### CPU time, user+sys (seconds)", ""]
    out += table(
        ["phase", *tools],
        [[p, *(spread(values(rounds, p, t, "cpu")) for t in tools)] for p in PHASES],
    )
    out += ["", "### Read from disk (MiB, the run's block input)", ""]
    out += table(
        ["phase", *tools],
        [[p, *(mib(median(values(rounds, p, t, "read"))) for t in tools)] for p in PHASES],
    )
    if "vsunify" in tools:
        others = [t for t in tools if t != "vsunify"]
        out += ["", "### Wall-time ratio vsunify / other (below 1: vsunify is faster)", ""]
        out += table(
            ["phase", *(f"vsunify/{t}" for t in others)],
            [[p, *(f"{ratio(rounds, p, 'vsunify', t):.2f}" for t in others)] for p in PHASES],
        )
    return out


def _savings(rep: Report) -> list[str]:
    tools, rounds = rep.ctx.tools, rep.rounds

    def total(t: str) -> float:
        return median([sum(r.samples[p][t].saved for p in PHASES) for r in rounds])

    rows = [
        [p, *(mib(median(values(rounds, p, t, "saved"))) for t in tools)]
        for p in ("first", "rerun", "add")
    ]
    rows.append(["**all phases**", *(f"**{mib(total(t))}**" for t in tools)])
    rows.append(
        [
            "set on disk after `add` (MiB)",
            *(mib(median(values(rounds, "add", t, "du_after"))) for t in tools),
        ]
    )
    for label, attr in (
        ("distinct file inodes after `add`", "inodes"),
        ("file names after `add`", "names"),
    ):
        rows.append([label, *(str(int(median(values(rounds, "add", t, attr)))) for t in tools)])
    out = ["### Savings (du of the whole set, each inode counted once)", ""]
    out += table(["MiB saved in phase", *tools], rows)
    if "vsunify" in tools:
        cells = [
            mib(median(values(rounds, p, "vsunify", "saved_guests")))
            for p in ("first", "rerun", "add")
        ]
        out += [
            "",
            "vsunify's figures count its store directory (`.hash-vsunify`: up to 256 "
            "prefix directories holding one more name per object; the objects are the "
            "guests' own inodes).  Without it, vsunify saved "
            f"{cells[0]} / {cells[1]} / {cells[2]} MiB (first / rerun / add).",
        ]
    return out


def _counters(rep: Report) -> list[str]:
    keys = (
        "files_scanned",
        "files_hashed",
        "bytes_hashed",
        "files_linked",
        "bytes_saved",
        "objects_created",
    )
    rows = []
    for p in PHASES:
        st = rep.rounds[0].samples[p]["vsunify"].stats
        rows.append([p, *(str(st[k]) for k in keys), f"{float(str(st['duration'])):.2f}"])
    return [
        "### vsunify's own counters (first round)",
        "",
        *table(["phase", *keys, "duration s"], rows),
    ]


def verdicts(rep: Report) -> list[str]:
    """The issue's targets, each with its figure and MET / NOT MET."""
    rounds, n = rep.rounds, rep.n

    def ok(b: bool) -> str:
        return "**MET**" if b else "**NOT MET**"

    r1, r2, r3 = (ratio(rounds, p, "vsunify", "hardlink") for p in ("first", "rerun", "add"))
    floor = median([r.walk_cold / r.samples["rerun"]["hardlink"].wall for r in rounds])
    out = [
        f"- first run over {n} guests within {FIRST_RUN_TARGET}x of hardlink's time: "
        f"vsunify/hardlink = {r1:.2f}: {ok(r1 <= FIRST_RUN_TARGET)}",
        f"- unchanged re-run clearly faster than hardlink (taken here as at most "
        f"{CLEARLY_FASTER}x): {r2:.2f}: {ok(r2 <= CLEARLY_FASTER)} (the cold `find` walk "
        f"alone is {floor:.2f}x hardlink's re-run)",
        f"- run after adding guest g{n + 1} clearly faster than hardlink (at most "
        f"{CLEARLY_FASTER}x): {r3:.2f}: {ok(r3 <= CLEARLY_FASTER)}",
    ]
    for phase, label in (("first", "first run"), ("add", "added guest")):
        v = median(values(rounds, phase, "vsunify", "saved"))
        vg = median(values(rounds, phase, "vsunify", "saved_guests"))
        h = median(values(rounds, phase, "hardlink", "saved"))
        diff = 100 * (v - h) / h if h else 0.0
        diff_g = 100 * (vg - h) / h if h else 0.0
        own = median([float(str(r.samples[phase]["vsunify"].stats["bytes_saved"])) for r in rounds])
        out.append(
            f"- savings equal to `hardlink -c` within 1% ({label}): vsunify "
            f"{int(v)} B ({mib(v)} MiB, store directory counted) vs hardlink {int(h)} B "
            f"({mib(h)} MiB), difference {diff:+.3f}%: {ok(abs(diff) <= 1)}; without "
            f"the store directory {int(vg)} B, {diff_g:+.3f}%.  (vsunify's own "
            f"bytes_saved, in st_size: {int(own)} B.)"
        )
    return out


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")),
        help="corpus cache of bench/corpus.sh (default: %(default)s)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/var/tmp"),
        help="a temporary work directory is made (and removed) in here; it must "
        "not be inside the checkout (default: %(default)s)",
    )
    p.add_argument(
        "--copies",
        type=int,
        default=2,
        help=f"extra cp -a copies of {EXTRA_SOURCE} in the set (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat everything on fresh copies, report medians (default: %(default)s)",
    )
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of %(default)s")
    p.add_argument(
        "--vsunify",
        default=str(Path(sys.executable).parent / "vsunify"),
        help="the vsunify executable (default: next to this Python)",
    )
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
    missing = [
        t
        for t in (*args.tools, "chattr", "du", "cp", "findmnt")
        if not shutil.which(args.vsunify if t == "vsunify" else t)
    ]
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
    ctx = Context(
        cache=args.cache,
        work=work,
        copies=args.copies,
        rounds=args.rounds,
        tools=args.tools,
        vsunify=args.vsunify,
    )
    try:
        source, fingerprint = source_state()
        guests = corpus_info(ctx)
        facts = machine_facts(work)
        versions = tool_versions(ctx, source)
        rounds = run_benchmark(ctx)
        changed = source_state()[1] != fingerprint
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        remove_tree(work)
    if changed:
        print("bench: WARNING: vsunify's source changed during the run", file=sys.stderr)
    md = render(Report(ctx, rounds, guests, facts, versions, argv, time.monotonic() - t0, changed))
    print(md)
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
