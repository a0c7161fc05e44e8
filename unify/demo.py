"""The built-in demo: a few guests of one made-up distribution, unified, with the savings.

Guests are generated, not downloaded, so the demo runs anywhere in seconds: a shared
"distribution" (binaries, libraries, documentation, config files) from a fixed random seed,
Debian's busybox-static as /bin/busybox when the host has it, and per-guest drift (edited
files, an extra package, a file with another owner) that must stay private.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

from vsstore.attrs import unseal_tree

BUSYBOX = Path("/bin/busybox")


def _distribution(seed: int = 7) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(120):
        files[f"usr/bin/tool{i}"] = rnd.randbytes(int(rnd.lognormvariate(10.5, 1.0)))
    for i in range(80):
        files[f"usr/lib/x86_64-linux-gnu/libdemo{i}.so.1"] = rnd.randbytes(
            int(rnd.lognormvariate(11.5, 1.0))
        )
    for i in range(300):
        files[f"usr/share/doc/pkg{i}/copyright"] = (
            f"Package pkg{i}\nLicense: GPL-2+\n" * 20
        ).encode()
    for i in range(40):
        files[f"etc/demo/conf{i}.conf"] = f"# config {i}\nvalue = {i}\n".encode() * 4
    return files


def build_guests(base: Path, n: int) -> list[str]:
    """Create ``n`` guests and their configuration below ``base``; return their names."""
    dist = _distribution()
    conf, root = base / "etc" / "vservers", base / "vservers"
    names = []
    for g in range(n):
        name = f"demo{g}"
        names.append(name)
        tree = root / name
        for rel, data in dist.items():
            p = tree / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.utime(p, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
        if BUSYBOX.is_file():
            (tree / "bin").mkdir(exist_ok=True)
            shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
        for d in ("proc", "sys", "dev", "tmp", "var/log", "root"):
            (tree / d).mkdir(parents=True, exist_ok=True)
        (tree / "etc" / "hostname").write_text(f"{name}\n")
        (tree / "var" / "log" / "syslog").write_bytes(os.urandom(4096))
        # Drift: an edited binary, an extra package, a file owned by someone else.
        (tree / "usr/bin/tool0").write_bytes(dist["usr/bin/tool0"] + f"patched {g}".encode())
        pkg = tree / f"usr/lib/extra{g % 2}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "data.bin").write_bytes(random.Random(100 + g % 2).randbytes(200_000))
        if g == n - 1:
            os.chown(tree / "usr/bin/tool1", 1000, 1000)
        c = conf / name
        (c / "uts").mkdir(parents=True, exist_ok=True)
        (c / "uts" / "nodename").write_text(f"{name}\n")
        (c / "context").write_text(f"{40000 + g}\n")
        os.symlink(tree, c / "vdir")
    return names


def _du_check(root: Path, names: list[str]) -> None:
    """What du says of the same trees: the table's figures to check against."""
    from .progress import human

    du = shutil.which("du")
    if du is None:
        return
    trees = [str(root / n) for n in names]
    out = subprocess.run(
        [du, "-sxc", "--block-size=1", *trees], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if len(out) != len(trees) + 1:
        return
    alone = subprocess.run(
        [du, "-sx", "--block-size=1", trees[0]], capture_output=True, text=True, check=False
    ).stdout.split()
    total = int(out[-1].split()[0])
    print(
        f"\ndemo: du agrees: du -sx {names[0]} = {human(int(alone[0]))} ({names[0]}'s alone); "
        f"du -sxc of all {len(names)} trees = {human(total)} (TOTAL on disk)"
    )


def main(args: argparse.Namespace) -> int:
    from .cli import main as vsunify

    base = (
        Path(args.dir)
        if args.dir
        else Path(tempfile.mkdtemp(prefix="vsstore-demo-", dir="/var/tmp"))
    )
    base.mkdir(parents=True, exist_ok=True)
    env = {
        "VSERVERS_CONFDIR": base / "etc" / "vservers",
        "VSERVERS_ROOT": base / "vservers",
        "VSSTORE_STATEDIR": base / "state",
        "VSSTORE_RUNDIR": base / "run",
        "VSSTORE_LOGDIR": base / "log",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        names = build_guests(base, args.guests)
        print(f"demo: {len(names)} guests in {base}/vservers: {', '.join(names)}")
        print("\ndemo: before unification")
        vsunify(["report", "--all"])
        print("\ndemo: vsunify run --all")
        rc = vsunify(["run", "--all"] + (["--json"] if args.json else []))
        print("\ndemo: after unification")
        vsunify(["report", "--all"] + (["--json"] if args.json else []))
        _du_check(base / "vservers", names)
        print("\ndemo: a second run reads nothing new")
        vsunify(["run", "--all"])
        return rc
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if args.keep:
            print(f"\ndemo: kept {base}; remove it with: chattr -R -i {base} && rm -rf {base}")
        else:
            unseal_tree(base)
            shutil.rmtree(base, ignore_errors=True)
