#!/usr/bin/env python3
"""pjdfstest (the POSIX file-system test suite) on the cow overlay and on fuse-overlayfs.

Run as root from the checkout::

    .venv/bin/python bench/bench_pjdfstest.py [--only cow|fuse-overlayfs] [--save DIR]

pjdfstest is built once from ``/work/shared/tools/pjdfstest-src.tar.gz`` (``--tarball``)
into a cache directory outside the checkout (``VSSTORE_BENCH_CACHE``, default
/var/cache/vsstore-bench).  Each tool mounts its own copy of a small guest tree (a few
directories and files) in a temporary directory: the cow overlay with ``vscow mount``, and
fuse-overlayfs with the copy as its lower layer.  ``prove -r`` then runs in a new directory of
the mounted tree, as a guest's process would: in a pid namespace of its own, which is
attached to the cow guest before anything runs (for fuse-overlayfs the same namespace, for
parity).  The failures of each tool (the sum of prove's ``Failed: N``), per test file side by
side and the ratio, go to stdout (markdown; ``--markdown FILE`` too).  Everything is unmounted
and removed afterwards, also on failure or Ctrl-C; ``--save DIR`` keeps prove's output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench_cow import mountpoints, wait_mounted
from bench_unify import BenchError
from benchhost import log

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOOLS = ("cow", "fuse-overlayfs")
TARBALL = Path("/work/shared/tools/pjdfstest-src.tar.gz")
GUEST = "pjdguest"
# Debian packages the run needs: prove (perl), the two file systems, a compiler, and
# automake (the tarball's auxiliary build scripts are links into automake's directory).
NEEDED = {
    "prove": "perl",
    "fuse-overlayfs": "fuse-overlayfs",
    "fusermount3": "fuse3",
    "gcc": "gcc",
    "make": "make",
    "unshare": "util-linux",
}
AUTOMAKE_AUX = Path("/usr/share/automake-1.16")


def run(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A helper command's stdout; BenchError if it fails."""
    res = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()[-2000:]}")
    return res.stdout


# -- what the run needs --------------------------------------------------------------------


def check_tools() -> None:
    """Install the Debian packages that are missing (apt-get, as scripts/setup does)."""
    missing = sorted({pkg for cmd, pkg in NEEDED.items() if shutil.which(cmd) is None})
    if not (AUTOMAKE_AUX / "install-sh").exists():
        missing.append("automake")
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    run(["apt-get", *lock, "update", "-qq"], env)
    run(["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *missing], env)


def build(tarball: Path, cache: Path) -> Path:
    """pjdfstest built from ``tarball`` (once per tarball content): its directory, with the
    ``pjdfstest`` program and ``tests/``."""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()[:16]
    home = cache / f"pjdfstest-{digest}"
    if (home / "pjdfstest" / "pjdfstest").is_file():
        return home / "pjdfstest"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pjdfstest-build-", dir=cache))
    try:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter="tar")
        src = tmp / "pjdfstest"
        log(f"building pjdfstest in {home}")
        for argv in (["./configure"], ["make", "-j2"]):
            res = subprocess.run(argv, cwd=src, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise BenchError(f"pjdfstest {argv[0]}: {(res.stdout + res.stderr)[-2000:]}")
        tmp.rename(home)  # whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return home / "pjdfstest"


# -- mounts --------------------------------------------------------------------------------


def make_guest(root: Path) -> None:
    """A small guest tree: a few directories, files and a symlink."""
    for d in ("bin", "etc", "usr/lib", "var/tmp", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "etc/hostname").write_text(f"{GUEST}\n")
    (root / "usr/lib/libx.so").write_bytes(b"library " * 512)
    (root / "bin/sh").write_bytes(b"#!shell\n")
    os.chmod(root / "bin/sh", 0o755)
    os.symlink("../usr/lib/libx.so", root / "bin/libx")


@dataclass(slots=True)
class Tool:
    """One file system under test: its own copy of the guest, its mount."""

    name: str
    base: Path
    proc: subprocess.Popen[bytes] | None = None  # fuse-overlayfs in the foreground
    env: dict[str, str] = field(default_factory=dict)

    @property
    def mnt(self) -> Path:
        return self.base / "mnt"

    @property
    def tree(self) -> Path:
        return self.base / GUEST

    @property
    def workdir(self) -> Path:
        """Where prove runs: a new directory in the mounted guest."""
        return (self.mnt / GUEST if self.name == "cow" else self.mnt) / "pjd"

    def vscow(self, *args: str) -> str:
        return run([str(Path(sys.executable).parent / "vscow"), *args], {**os.environ, **self.env})

    @contextmanager
    def mounted(self) -> Iterator[None]:
        self.base.mkdir()
        make_guest(self.tree)
        self.mnt.mkdir()
        if self.name == "cow":
            self.env = {
                "VSSTORE_RUNDIR": str(self.base / "run"),
                "VSSTORE_STATEDIR": str(self.base / "state"),
                "VSSTORE_LOGDIR": str(self.base / "log"),
                "VSERVERS_CONFDIR": str(self.base / "conf"),
                "VSERVERS_ROOT": str(self.base),
            }
            self.vscow("mount", "--at", str(self.mnt), str(self.tree))
        else:
            for d in ("upper", "work"):
                (self.base / d).mkdir()
            out = open(self.base / "fuse-overlayfs.log", "ab")
            self.proc = subprocess.Popen(
                [
                    "fuse-overlayfs",
                    "-f",
                    "-o",
                    f"lowerdir={self.tree},upperdir={self.base / 'upper'},"
                    f"workdir={self.base / 'work'}",
                    str(self.mnt),
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
            out.close()
        try:
            if not wait_mounted(self.mnt, True):
                raise BenchError(f"{self.name} did not come up at {self.mnt}")
            self.workdir.mkdir()
            yield
        finally:
            self.umount()

    def umount(self) -> None:
        if str(self.mnt) in mountpoints():
            if self.name == "cow":
                try:
                    self.vscow("umount", str(self.mnt))
                except BenchError as e:
                    log(str(e))
            else:
                subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)
            if not wait_mounted(self.mnt, False, 10):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], check=False)
                wait_mounted(self.mnt, False, 10)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if str(self.mnt) in mountpoints():
            raise BenchError(f"{self.mnt}: could not unmount")

    def attach(self, pid: int) -> None:
        """The pid namespace ``unshare --pid --fork`` (``pid``) made for its child is the
        cow guest's (what ``vserver start`` does for a guest)."""
        own = os.stat("/proc/self/ns/pid").st_ino
        end = time.monotonic() + 10
        while os.stat(f"/proc/{pid}/ns/pid_for_children").st_ino == own:
            if time.monotonic() > end:
                raise BenchError("unshare made no pid namespace")
            time.sleep(0.01)
        if self.name != "cow":
            return
        children = Path(f"/proc/{pid}/task/{pid}/children")
        while not children.read_text().split():  # the child, in the new namespace
            if time.monotonic() > end:
                raise BenchError("unshare started no child")
            time.sleep(0.01)
        child = children.read_text().split()[0]
        self.vscow("attach", str(self.mnt), GUEST, "--pid", child)


# -- running and reading prove -------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What prove said: tests run, failures per test file (relative to tests/)."""

    tests: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    bad_plan: list[str] = field(default_factory=list)  # files that died before their plan
    seconds: float = 0.0
    output: str = ""

    @property
    def total_failed(self) -> int:
        return sum(self.failed.values())


_FILE = re.compile(r"^(\S+\.t)\s+\(Wstat: .*Tests: (\d+)\s+Failed: (\d+)\)")
_PLAN = re.compile(r"Bad plan\.\s+You planned (\d+) tests but ran (\d+)")
_TOTAL = re.compile(r"^Files=\d+, Tests=(\d+)", re.M)


def parse(text: str, tests_dir: Path) -> Outcome:
    out = Outcome(output=text)
    m = _TOTAL.search(text)
    out.tests = int(m.group(1)) if m else 0
    current = ""
    for line in text.splitlines():
        f = _FILE.match(line)
        if f:
            current = os.path.relpath(f.group(1), tests_dir)
            if int(f.group(3)):
                out.failed[current] = int(f.group(3))
            continue
        p = _PLAN.search(line)
        if p and current:
            out.bad_plan.append(current)
            # tests a file never ran count as failed (as the figures did)
            missing = int(p.group(1)) - int(p.group(2))
            out.failed[current] = out.failed.get(current, 0) + missing
            out.tests += missing
    return out


def run_prove(tool: Tool, pjd: Path, timeout: float) -> Outcome:
    """prove -r over pjdfstest's tests, in the tool's work directory, in a new pid
    namespace (attached to the cow guest before prove starts)."""
    tests = pjd / "tests"
    log(f"{tool.name}: prove -r {tests} in {tool.workdir}")
    p = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            'read go && exec prove -r "$0"',
            str(tests),
        ],
        cwd=tool.workdir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    try:
        tool.attach(p.pid)
        text, _ = p.communicate("go\n", timeout=timeout)
    except BaseException:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise
    out = parse(text, tests)
    out.seconds = time.monotonic() - t0
    if out.tests == 0:
        raise BenchError(f"{tool.name}: prove ran no test:\n{text[-2000:]}")
    log(f"{tool.name}: {out.total_failed} of {out.tests} failed ({out.seconds:.0f} s)")
    return out


# -- the report ----------------------------------------------------------------------------


def render(results: dict[str, Outcome], command: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    kernel = os.uname().release
    lines = [
        f"Run {when} on Linux {kernel}: `{command}`",
        "",
        "| tool | tests | failed | test files with failures | seconds |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, o in results.items():
        lines.append(
            f"| {name} | {o.tests} | {o.total_failed} | {len(o.failed)} | {o.seconds:.0f} |"
        )
    if len(results) == 2:
        cow, fo = results["cow"].total_failed, results["fuse-overlayfs"].total_failed
        ratio = f"{cow / fo:.2f}" if fo else ("1.00" if cow == 0 else "inf")
        lines += ["", f"Failures cow / fuse-overlayfs: {cow} / {fo} = {ratio}"]
    files = sorted({f for o in results.values() for f in o.failed})
    if files:
        lines += ["", "| test file | " + " | ".join(results) + " |"]
        lines.append("|---|" + "--:|" * len(results))
        for f in files:
            cells = []
            for o in results.values():
                n = o.failed.get(f, 0)
                cells.append(f"{n}{' (bad plan)' if f in o.bad_plan else ''}")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=TOOLS, action="append", help="run only this tool")
    p.add_argument("--tarball", type=Path, default=TARBALL)
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")),
        help="where pjdfstest is built (outside the checkout)",
    )
    p.add_argument("--work", type=Path, default=Path("/var/tmp"), help="temporary trees here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool")
    p.add_argument("--markdown", type=Path, help="write the result section here too")
    p.add_argument("--save", type=Path, help="keep prove's output per tool in this directory")
    return p.parse_args(argv)


def remove_work(work: Path) -> None:
    """Remove the work directory, once nothing is mounted below it (else leave it, said)."""
    left = [m for m in mountpoints() if m.startswith(f"{work}/")]
    if left:
        log(f"still mounted, NOT removing {work}: {left}")
        return
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup runs
    if os.geteuid() != 0:
        print("bench_pjdfstest: run as root (pjdfstest changes owners, mounts)", file=sys.stderr)
        return 2
    command = "bench/bench_pjdfstest.py" + ("" if not argv else " " + " ".join(argv))
    try:
        check_tools()
        pjd = build(args.tarball, args.cache)
        results: dict[str, Outcome] = {}
        with ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="vsstore-pjdfstest-", dir=args.work))
            stack.callback(remove_work, work)
            for name in args.only or TOOLS:
                tool = Tool(name, work / name)
                with tool.mounted():
                    results[name] = run_prove(tool, pjd, args.timeout)
                if args.save:
                    args.save.mkdir(parents=True, exist_ok=True)
                    (args.save / f"{name}.prove.txt").write_text(results[name].output)
                remove_work(tool.base)
    except BenchError as e:
        print(f"bench_pjdfstest: {e}", file=sys.stderr)
        return 1
    text = render(results, command)
    print(text, end="")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
