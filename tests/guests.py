"""Helpers of the test layers that start guests (t7 and up): a ``vserver`` runner, busybox
and Debian guests, and the checks that nothing is left behind.  The fixture ``vs`` is in
conftest."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO
from vsstore.lifecycle import alive

BUSYBOX = "/bin/busybox"


APPLETS = [
    "sh",
    "sleep",
    "ps",
    "mount",
    "mknod",
    "hostname",
    "cat",
    "ls",
    "echo",
    "id",
    "true",
    "grep",
    "wc",
    "head",
    "stat",
]


IDLE = 'trap "exit 0" TERM; while :; do sleep 1 & wait; done'
# an init whose processes do not change from one moment to the next (IDLE forks a sleep a
# second), for tests that count them twice
STEADY = 'trap "exit 0" TERM; sleep 100000 & while :; do wait; done'


CORPUS = Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")) / "debian"


class Vserver:
    def __init__(self, host) -> None:  # type: ignore[no-untyped-def]
        self.host = host
        self.env = {**os.environ, **host.env}

    def __call__(
        self, cmd: str, name: str, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``vserver NAME CMD ARGS...``"""
        args = (name, cmd, *args)
        p = subprocess.run(
            [sys.executable, "-m", "vsstore.lifecycle.cli", *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            input=input,
        )
        if check and p.returncode != 0:
            raise AssertionError(
                f"vserver {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
            )
        return p

    def stat(self) -> list[dict]:
        p = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from vsstore.lifecycle.cli import "
                "stat_main; sys.exit(stat_main(['--json']))",
            ],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(p.stdout)

    def stat_memory(self) -> dict:
        p = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from vsstore.lifecycle.cli import "
                "stat_main; sys.exit(stat_main(['--json', '--memory']))",
            ],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(p.stdout)

    def guest(
        self,
        name: str,
        init: str = IDLE,
        files: dict[str, bytes] | None = None,
        conf: dict[str, str] | None = None,
    ) -> Path:
        """A skeleton guest with busybox; ``init`` is its /bin/sh -c script."""
        self("build", name, "-m", "skeleton")
        root = self.host.root / name
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")  # same mtime in every guest
        for a in APPLETS:
            os.symlink("busybox", root / "bin" / a)
        for rel, data in (files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            os.utime(root / rel, (1_600_000_000, 1_600_000_000))
        c = self.host.conf / name
        (c / "apps/init/cmd.start").write_text(f"/bin/sh\n-c\n{init}\n")
        (c / "apps/init/style").write_text("plain\n")  # build found no init: none
        for rel, text in (conf or {}).items():
            (c / rel).parent.mkdir(parents=True, exist_ok=True)
            (c / rel).write_text(text)
        return root

    def state(self, name: str) -> dict | None:
        f = self.host.base / "run" / "guests" / f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None

    def exec(self, name: str, *cmd: str) -> str:
        return self("exec", name, *cmd).stdout  # type: ignore[arg-type]


def leave_nothing(v: Vserver, host) -> None:  # type: ignore[no-untyped-def]
    """Whatever a failing test left: stop, kill (never a reused pid), unmount."""
    for f in sorted((host.base / "run/guests").glob("*.json")):
        st = json.loads(f.read_text())
        v("stop", st["name"], check=False)
        for pid, started in (
            (st["init_pid"], st["init_start"]),
            (st["monitor_pid"], st["monitor_start"]),
        ):
            if alive(pid, started):  # stop failed
                os.kill(pid, signal.SIGKILL)
    cow = host.base / "run" / "cow"
    if cow.exists() and str(cow) in host_mounts():
        subprocess.run(["fusermount3", "-u", "-z", str(cow)], check=False)


def host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


_PINNED: dict[int, int] = {}


def pid_ns(pid: int) -> int | None:
    """The inode number of ``pid``'s pid namespace.  The namespace is held open for the rest
    of the session: once freed, its number may be given to another namespace (another test
    run's guest), and a test asking "is anything left in it?" would see strangers."""
    try:
        fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    ino = os.fstat(fd).st_ino
    if ino in _PINNED:
        os.close(fd)
    else:
        _PINNED[ino] = fd
    return ino


def gone(pid: int) -> bool:
    """Ended (a zombie waiting for whichever process adopted it counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _ns_ino(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def procs_in_ns(ns_ino: int) -> list[int]:
    """Processes in the pid namespace numbered ``ns_ino`` (one pid_ns() returned, so held)."""
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _ns_ino(int(d)) == ns_ino]


def eventually(check, seconds: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def debian_guest(host, name: str) -> Path:  # type: ignore[no-untyped-def]
    """A configured guest copied from the cached corpus (bookworm minbase), of style none
    (no systemd: services come by exec)."""
    root = host.root / name
    subprocess.run(["cp", "-a", str(CORPUS / "bookworm-minbase"), str(root)], check=True)
    c = host.conf / name
    (c / "apps/init").mkdir(parents=True)
    os.symlink(root, c / "vdir")
    (c / "apps/init/style").write_text("none\n")
    return root


def static_program(d: Path, source: str, name: str = "probe") -> Path:
    """``source`` (C) compiled statically into ``d/name``: a program for a guest's tree
    that needs nothing of it (busybox has no applet for the calls the tests probe)."""
    (d / f"{name}.c").write_text(source)
    subprocess.run(
        ["gcc", "-O2", "-static", "-o", str(d / name), str(d / f"{name}.c")],
        check=True,
        capture_output=True,
    )
    return d / name
