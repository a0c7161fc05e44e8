#!/usr/bin/env python3
"""Memory sharing, measured: N Debian guests running the same programs (nginx and rsyslogd
of the corpus guest bookworm-services), as separate copies, unified and started directly,
and unified and started through the cow overlay.

For each scenario: sync and drop caches, start the N guests and their programs, wait, then
read the system's figures (/proc/meminfo: Cached and AnonPages, before and after) and
vsunify's own (`report --memory`: file-backed memory with and without unification, from
smaps).  Everything runs in a temporary host (VSERVERS_* and VSSTORE_* moved) and is
stopped, unmounted and removed afterwards.

    python bench/bench_memory.py [--guests N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchhost import CORPUS, Host, drop_caches, emit, log

SOURCE = "bookworm-services"
PROGRAMS = [["/usr/sbin/nginx"], ["/usr/sbin/rsyslogd"]]
SETTLE = 3.0


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def make_guests(host: Host, n: int) -> list[str]:
    names = [f"mem{i:02d}" for i in range(n)]
    (host.base / "vservers").mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(names):
        root = host.base / "vservers" / g
        subprocess.run(["cp", "-a", str(CORPUS / SOURCE), str(root)], check=True)
        c = host.base / "etc" / g
        (c / "apps/init").mkdir(parents=True)
        (c / "interfaces/0").mkdir(parents=True)
        os.symlink(root, c / "vdir")
        (c / "context").write_text(f"{100 + i}\n")
        (c / "apps/init/style").write_text("none\n")
        (c / "interfaces/0/ip").write_text(f"10.233.{i}.2\n")
        (c / "interfaces/0/prefix").write_text("24\n")
        (c / "interfaces/0/hostip").write_text(f"10.233.{i}.1\n")
    return names


def scenario(host: Host, names: list[str], label: str) -> dict[str, object]:
    """Start every guest and its programs on dropped caches; the figures; stop them."""
    drop_caches()
    time.sleep(1)
    before = meminfo()
    t0 = time.monotonic()
    try:
        for g in names:
            host.vserver(g, "start")
            for prog in PROGRAMS:
                host.vserver(g, "exec", *prog)
        started = time.monotonic() - t0
        time.sleep(SETTLE)
        after = meminfo()
        rep = json.loads(
            host.cli("unify.cli", "report", "--json", "--memory", "--no-record", *names).stdout
        )["memory"]
        procs = sum(int(g["processes"]) for g in rep["guests"].values())
    finally:
        for g in names:
            host.vserver(g, "stop", check=False)
    res = {
        "label": label,
        "guests": len(names),
        "processes": procs,
        "start_seconds": round(started, 2),
        "cached_delta": after["Cached"] - before["Cached"],
        "anon_delta": after["AnonPages"] - before["AnonPages"],
        "smaps_with": rep["total"]["with_unification"],
        "smaps_without": rep["total"]["without_unification"],
        "per_guest_file_rss": round(
            sum(int(g["file_rss"]) for g in rep["guests"].values()) / max(1, len(rep["guests"]))
        ),
    }
    log(f"{label}: {res}")
    return res


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def markdown(results: list[dict[str, object]], n: int, cmd: str, took: float) -> str:
    base = results[0]
    lines = [
        f"## Memory sharing benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Command (as root, from the checkout):",
        "",
        "```",
        cmd,
        "```",
        "",
        f"{n} guests, each a `cp -a` of the corpus guest `{SOURCE}` (bench/corpus.sh) with "
        f"its own network namespace (a veth pair), each running `nginx` (a master and "
        f"2 workers) and `rsyslogd`, started through `vserver NAME start` + `exec`.  "
        f"Before each scenario: sync, drop caches.  The figures {SETTLE:g} s after the "
        f"last program started.  Total runtime {took / 60:.1f} min.",
        "",
        "| scenario | processes | page cache added (MiB) | anonymous memory added (MiB) | "
        "file-backed, smaps, each inode once (MiB) | same if every guest had its own "
        "copies (MiB) | page cache vs separate copies |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        ratio = float(r["cached_delta"]) / float(base["cached_delta"])  # type: ignore[arg-type]
        lines.append(
            f"| {r['label']} | {r['processes']} | {mib(r['cached_delta'])} | "  # type: ignore[arg-type]
            f"{mib(r['anon_delta'])} | {mib(r['smaps_with'])} | "  # type: ignore[arg-type]
            f"{mib(r['smaps_without'])} | {ratio:.2f} |"
        )  # type: ignore[arg-type]
    per = float(base["per_guest_file_rss"])  # type: ignore[arg-type]
    lines += [
        "",
        f"One guest's programs map {mib(per)} MiB of files (smaps, resident).  "
        f"Separate copies cost about {n} times that in page cache; unified guests "
        f"about one copy (direct) or two (through cow: the FUSE inode's pages and the "
        f"backing file's, the latter read by the daemon).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=6)
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()
    if not (CORPUS / SOURCE / ".complete").exists():
        print(f"no corpus in {CORPUS}: run bench/corpus.sh first", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="vsstore-bench-mem-", dir="/var/tmp"))
    host = Host(base)
    results = []
    try:
        names = make_guests(host, args.guests)
        results.append(scenario(host, names, "separate copies (not unified)"))
        host.cli("unify.cli", "run", *names)
        results.append(scenario(host, names, "unified, started directly"))
        for g in names:
            (base / "etc" / g / "cow").touch()
        results.append(scenario(host, names, "unified, through the cow overlay"))
    finally:
        for g in sorted((base / "etc").glob("*")) if (base / "etc").exists() else []:
            host.vserver(g.name, "stop", check=False)
        host.remove()
    cmd = "python bench/bench_memory.py " + " ".join(sys.argv[1:])
    md = markdown(results, args.guests, cmd.strip(), time.monotonic() - t0)
    emit(md, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
