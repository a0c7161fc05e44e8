#!/usr/bin/env python3
"""How vsunify's run time grows with guests and files.

For each size N: N guests, each a `cp -a` of the corpus guest bookworm-minbase with drift
(a changed config file, an "extra package" of 100 files that half of the guests share and
half have to themselves, 20 files rewritten with the guest's own content); then, with the
caches dropped and no index, a first `vsunify run` over all N (everything hashed and
linked), and an unchanged re-run (the nightly case).  Last, the cost of `vserver NAME
build -m clone` of one unified guest: wall time and the disk it adds.

    python bench/bench_scale.py [--sizes 5,10,20,30] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchhost import CORPUS, Host, drop_caches, emit, log

SOURCE = "bookworm-minbase"


def make_guest(host: Host, name: str, i: int) -> None:
    root = host.base / "vservers" / name
    subprocess.run(["cp", "-a", str(CORPUS / SOURCE), str(root)], check=True)
    c = host.base / "etc" / name
    c.mkdir(parents=True)
    os.symlink(root, c / "vdir")
    rnd = random.Random(i)
    (root / "etc/hostname").write_text(f"{name}\n")  # a changed config file
    pkg = root / "opt/extra"  # an extra package: shared by even guests, own for odd ones
    pkg.mkdir(parents=True)
    seed = random.Random(0 if i % 2 == 0 else 1000 + i)
    for n in range(100):
        data = seed.randbytes(seed.randint(1_000, 40_000))
        (pkg / f"f{n:03d}").write_bytes(data)
        os.utime(pkg / f"f{n:03d}", (1_600_000_000, 1_600_000_000))
    docs = sorted((root / "usr/share/doc").glob("*/copyright"))
    for p in rnd.sample(docs, 20):  # rewritten with the guest's own content
        p.write_bytes(p.read_bytes() + f"\n{name}\n".encode())


def run(host: Host, names: list[str]) -> dict[str, object]:
    return json.loads(host.cli("unify.cli", "run", "--json", *names).stdout)


def du(path: Path) -> int:
    """Bytes on disk of the distinct inodes below path."""
    seen, total = set(), 0
    for dirpath, _d, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def one_size(n: int) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="vsstore-bench-scale-", dir="/var/tmp"))
    host = Host(base)
    try:
        (base / "vservers").mkdir()
        names = [f"s{i:03d}" for i in range(n)]
        t0 = time.monotonic()
        for i, g in enumerate(names):
            make_guest(host, g, i)
        log(f"{n} guests made in {time.monotonic() - t0:.0f} s")
        drop_caches()
        first = run(host, names)
        again = run(host, names)
        res = {
            "guests": n,
            "files": first["files_scanned"],
            "first_s": first["duration"],
            "first_hashed": first["files_hashed"],
            "linked": first["files_linked"],
            "saved": first["bytes_saved"],
            "rerun_s": again["duration"],
            "rerun_hashed": again["files_hashed"],
        }
        if n == max(SIZES):
            before = du(base / "vservers")
            t1 = time.monotonic()
            host.cli(
                "vsstore.lifecycle.cli",
                "clone1",
                "build",
                "-m",
                "clone",
                "--",
                "--source",
                names[0],
            )
            res["clone_s"] = time.monotonic() - t1
            res["clone_bytes"] = du(base / "vservers") - before
            res["guest_bytes"] = du(CORPUS / SOURCE)
        log(f"size {n}: {res}")
        return res
    finally:
        host.remove()


SIZES = [5, 10, 20, 30]


def markdown(rows: list[dict[str, object]], cmd: str, took: float) -> str:
    b = rows[0]
    out = [
        f"## Scaling benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        "Command (as root, from the checkout):",
        "",
        "```",
        cmd,
        "```",
        "",
        f"N guests, each a `cp -a` of the corpus guest `{SOURCE}` with drift (a changed "
        f"config file; /opt/extra, 100 files of 1-40 KB, the same in even guests and "
        f"different in odd ones; 20 copyright files rewritten per guest).  First run: "
        f"caches dropped, no index; re-run: nothing changed.  Total runtime "
        f"{took / 60:.1f} min.",
        "",
        "| guests | files | first run (s) | files hashed | names linked | saved (MiB) | "
        "us per file | vs smallest, per file | unchanged re-run (s) | re-run hashed |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    base_per = float(b["first_s"]) / float(b["files"])  # type: ignore[arg-type]
    for r in rows:
        per = float(r["first_s"]) / float(r["files"])  # type: ignore[arg-type]
        out.append(
            f"| {r['guests']} | {r['files']} | {float(r['first_s']):.1f} | "  # type: ignore[arg-type]
            f"{r['first_hashed']} | {r['linked']} | {int(r['saved']) / 2**20:.0f} | "  # type: ignore[call-overload]
            f"{per * 1e6:.0f} | {per / base_per:.2f} | {float(r['rerun_s']):.1f} | "  # type: ignore[arg-type]
            f"{r['rerun_hashed']} |"
        )
    last = rows[-1]
    if "clone_s" in last:
        out += [
            "",
            f"`vserver clone1 build -m clone -- --source s000` among {last['guests']} "
            f"unified guests: {float(last['clone_s']):.1f} s (including its `vsunify "  # type: ignore[arg-type]
            f"run`), {int(last['clone_bytes']) / 2**20:.1f} MiB added on disk for a guest "  # type: ignore[call-overload]
            f"of {int(last['guest_bytes']) / 2**20:.0f} MiB.",
        ]  # type: ignore[call-overload]
    return "\n".join(out) + "\n"


def main() -> int:
    global SIZES
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()
    SIZES = [int(x) for x in args.sizes.split(",")]
    if not (CORPUS / SOURCE / ".complete").exists():
        print(f"no corpus in {CORPUS}: run bench/corpus.sh first", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    rows = [one_size(n) for n in SIZES]
    md = markdown(
        rows,
        ("python bench/bench_scale.py " + " ".join(sys.argv[1:])).strip(),
        time.monotonic() - t0,
    )
    emit(md, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
