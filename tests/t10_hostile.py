"""Layer 10: hostile guests (issue 13): no escape from a guest, and no guest (nor a careless
command line) can change what another guest or the host sees.  Each test replays an attack
a guest's root mounted against unified guests.  Guests are busybox skeletons started for
real (t7's helpers); attacks are bounded in time, and every test cleans up also when it
fails."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import py_compile
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest
from guests import IDLE, Vserver, eventually, gone, host_mounts, pid_ns, procs_in_ns

from conftest import REPO, flags, inode
from vsstore.errors import EXIT_CONFIG, UnsupportedError
from vsstore.lifecycle import cgroups, helper

LAYOUT = cgroups.detect()
needs_cgroups = pytest.mark.skipif(LAYOUT.version == 0, reason=f"no cgroups: {LAYOUT.why}")


def _leftovers(host, st: dict, ns_ino: int) -> list[str]:  # type: ignore[no-untyped-def]
    """What a stopped guest left behind: processes, mounts, its cgroup, its run state."""
    out = [f"process {p}" for p in procs_in_ns(ns_ino)]
    out += [f"mount {m}" for m in host_mounts() if str(host.root) in m]
    out += [f"cgroup {d}" for d in st["cgroup"].values() if os.path.exists(d)]
    if not gone(st["monitor_pid"]):
        out.append(f"monitor {st['monitor_pid']}")
    if (host.base / "run/guests" / f"{st['name']}.json").exists():
        out.append("run state")
    return out


# == Entering a guest: planted modules, TIOCSTI, the pty relay, the helper (items 1, 2) ====

EXTRA_APPLETS = ["stty", "readlink", "tty", "kill", "printf", "sed", "cut"]
PROMPT = b"# "


def _guest(vs: Vserver, name: str, **kw: object) -> Path:
    root = vs.guest(name, **kw)  # type: ignore[arg-type]
    for a in EXTRA_APPLETS:
        os.symlink("busybox", root / "bin" / a)
    return root


TIOCSTI_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
/* tiocsti WHERE TEXT: push TEXT ("\n" for a newline) into the input of the terminal WHERE
   ("tty": the controlling one, else a descriptor number), one byte at a time. */
int main(int argc, char **argv) {
    char text[1024];
    int n = 0, fd, ok = 0, k;
    const char *s;
    if (argc != 3)
        return 2;
    for (s = argv[2]; *s && n < 1000; s++)
        if (s[0] == '\\' && s[1] == 'n') { text[n++] = '\n'; s++; } else text[n++] = *s;
    fd = strcmp(argv[1], "tty") ? atoi(argv[1]) : open("/dev/tty", O_RDWR | O_NOCTTY);
    for (k = 0; k < n; k++)
        if (ioctl(fd, TIOCSTI, &text[k]) == 0)
            ok++;
    dprintf(2, "tiocsti: %d of %d pushed\n", ok, n);
    return ok == n ? 0 : 1;
}
"""

PLANT_SO_C = r"""
#include <fcntl.h>
#include <unistd.h>
/* Loaded as a Python extension (or anything else): the constructor runs and leaves marks. */
__attribute__((constructor)) static void planted(void) {
    const char *marks[] = { HOST_MARK, GUEST_MARK };
    for (int i = 0; i < 2; i++) {
        int fd = open(marks[i], O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) { write(fd, "so\n", 3); close(fd); }
    }
}
"""


def _cc(src: str, out: Path, *flags: str) -> Path:
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-O2", *flags, "-o", str(out), str(c)], check=True, capture_output=True)
    return out


@pytest.fixture
def tiocsti(host) -> Path:  # type: ignore[no-untyped-def]
    """A static TIOCSTI tool (busybox has none), to copy into guests."""
    return _cc(TIOCSTI_C, host.base / "tiocsti", "-static")


# -- the admin's terminal ------------------------------------------------------------------


class Admin:
    """``vserver ARGS...`` on a pty of the test's own: the admin's terminal, its controlling
    tty (stdin and stdout can be something else).  Killed on close, whatever happened."""

    def __init__(
        self,
        vs: Vserver,
        *args: str,
        rows: int = 24,
        cols: int = 80,
        stdin: int | None = None,
        stdout: int | None = None,
    ) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        self.out = b""
        self.pos = 0  # expect() looks past what it matched already
        self.p = subprocess.Popen(
            [sys.executable, "-m", "vsstore.lifecycle.cli", *args],
            cwd=REPO,
            env={**vs.env, "TERM": "xterm"},
            stdin=self.slave if stdin is None else stdin,
            stdout=self.slave if stdout is None else stdout,
            stderr=self.slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(2, termios.TIOCSCTTY, 0),
        )

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(10)
        os.close(self.master)
        os.close(self.slave)

    def read(self, seconds: float) -> None:
        """What the terminal shows within ``seconds`` (returns at the first output)."""
        if select.select([self.master], [], [], seconds)[0]:
            try:
                self.out += os.read(self.master, 65536)
            except OSError:
                pass

    def expect(self, pattern: bytes, seconds: float = 20) -> None:
        """Wait for ``pattern`` in the output after the previous match."""
        end = time.monotonic() + seconds
        while (at := self.out.find(pattern, self.pos)) < 0:
            assert time.monotonic() < end, f"no {pattern!r} in {self.out[self.pos :]!r}"
            self.read(0.1)
        self.pos = at + len(pattern)

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait(self, seconds: float = 30) -> int:
        end = time.monotonic() + seconds
        while self.p.poll() is None:
            assert time.monotonic() < end, f"vserver still runs: {self.out[-2000:]!r}"
            self.read(0.1)
        end = time.monotonic() + 0.2
        while time.monotonic() < end:
            self.read(0.05)
        return self.p.returncode

    def resize(self, rows: int, cols: int) -> None:
        """What a terminal emulator does: the new size, SIGWINCH to the foreground group."""
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def pending_input(self) -> bytes:
        """What the host's shell would read next from this terminal (read without waiting
        for a line, the terminal's mode kept)."""
        n = struct.unpack("i", fcntl.ioctl(self.slave, termios.FIONREAD, b"\0" * 4))[0]
        if not n:
            return b""
        saved = termios.tcgetattr(self.slave)
        raw = list(saved)
        raw[3] &= ~termios.ICANON
        raw[6] = list(raw[6])
        raw[6][termios.VMIN], raw[6][termios.VTIME] = 0, 0
        termios.tcsetattr(self.slave, termios.TCSANOW, raw)
        try:
            return os.read(self.slave, 65536)
        finally:
            termios.tcsetattr(self.slave, termios.TCSANOW, saved)


def _holders(dev_ino: tuple[int, int], ns_ino: int | None) -> list[str]:
    """Every descriptor that a process of the pid namespace holds on the file ``dev_ino``."""
    out = []
    members = set(procs_in_ns(ns_ino)) if ns_ino is not None else set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) not in members:
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{d}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == dev_ino:
                out.append(f"{d}:{fd}")
    return out


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _children_now(pid: int) -> list[int]:
    """``_children``, none once ``pid`` is gone."""
    try:
        return _children(pid)
    except FileNotFoundError:
        return []


def _runs(pid: int, name: str, ns: int | None) -> bool:
    """Is ``pid`` (still) a process called ``name`` in pid namespace ``ns``?"""
    try:
        return pid_ns(pid) == ns and _status(pid)["Name"] == name
    except FileNotFoundError:
        return False


# -- planted modules --------------------------------------------------------------------------

PLANTED_PY = [
    "termios",
    "fcntl",
    "tty",
    "pty",
    "select",
    "selectors",
    "traceback",
    "linecache",
    "tokenize",
    "token",
    "locale",
    "gettext",
    "warnings",
    "signal",
    "resource",
    "struct",
    "json",
    "subprocess",
    "platform",
    "errno",
    "codecs",
    "sitecustomize",
    "usercustomize",
    "this",
]
PLANTED_SO = [
    "termios",
    "fcntl",
    "select",
    "resource",
    "mmap",
    "_posixsubprocess",
    "_ctypes",
    "_json",
    "_struct",
    "math",
    "binascii",
    "zlib",
    "_socket",
    "array",
    "_random",
    "_hashlib",
    "_lzma",
    "_bz2",
    "_decimal",
    "readline",
    "_curses",
]
PLANTED_ENCODINGS = ["cp437", "cp1252", "idna", "mac_roman", "koi8_r", "utf_16", "ascii"]


def _interpreter_paths() -> list[str]:
    """sys.path of the vserver command as the tests run it, and the usual other places."""
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, site, sys; print(json.dumps("
            "sys.path + site.getsitepackages() + [site.getusersitepackages()]))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    paths = {os.path.abspath(x) if x else str(REPO) for x in json.loads(p.stdout)}
    paths |= {
        "/usr/lib/python3.11",
        "/usr/lib/python3.11/lib-dynload",
        "/usr/lib/python3/dist-packages",
        "/usr/local/lib/python3.11/dist-packages",
        "/",
        "/root",
        str(REPO),
        *(str(REPO / pkg) for pkg in ("vsstore", "cow", "unify")),
    }
    return sorted(paths)


class Planted:
    """Modules, extensions and path hooks planted in a guest wherever a Python with our
    sys.path (or one from the Debian packages) would look, each leaving a mark when it runs:
    in a host directory (it ran with the host's root) and in the guest's /var/tmp (it ran
    inside with our privileges, or on the host: /var/tmp there is checked too)."""

    def __init__(self, host, tag: str) -> None:  # type: ignore[no-untyped-def]
        self.token = f".vsplant-{tag}-{uuid.uuid4().hex[:8]}"
        self.host_dir = host.base / "escaped"
        self.host_dir.mkdir()
        self.so = _cc(
            PLANT_SO_C,
            host.base / "planted.so",
            "-shared",
            "-fPIC",
            f'-DHOST_MARK="{self.host_dir}/so"',
            f'-DGUEST_MARK="/var/tmp/{self.token}-so"',
        )
        self.roots: list[Path] = []

    def code(self, name: str) -> str:
        return (
            f"for _p in ({str(self.host_dir / name)!r}, '/var/tmp/{self.token}-{name}'):\n"
            f"    try:\n        open(_p, 'a').write('ran\\n')\n"
            f"    except Exception:\n        pass\n"
        )

    def plant(self, root: Path) -> None:
        self.roots.append(root)
        ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        for d in _interpreter_paths():
            at = root / d.lstrip("/")  # (python311.zip: a directory of that name works too)
            at.mkdir(parents=True, exist_ok=True)
            for n in PLANTED_PY:
                (at / f"{n}.py").write_text(self.code(n))
            for n in ("tty", "pty"):  # compiled, as an interpreter would cache them
                (at / "__pycache__").mkdir(exist_ok=True)
                py_compile.compile(
                    str(at / f"{n}.py"), cfile=str(at / "__pycache__" / f"{n}.cpython-311.pyc")
                )
            (at / "x.pth").write_text(f"import os; exec({self.code('pth')!r})\n")
            for n in PLANTED_SO:
                for suffix in (ext, ".abi3.so", ".so"):
                    shutil.copyfile(self.so, at / f"{n}{suffix}")
            enc = at / "encodings"
            enc.mkdir(exist_ok=True)
            (enc / "__init__.py").write_text(self.code("encodings"))
            for n in PLANTED_ENCODINGS:
                (enc / f"{n}.py").write_text(self.code(f"encodings.{n}"))

    def marks(self) -> list[str]:
        found = [str(p) for p in self.host_dir.iterdir()]
        for base in [Path("/var/tmp"), *(r / "var/tmp" for r in self.roots)]:
            found += [str(p) for p in base.glob(f"{self.token}*")]
        return found

    def clean(self) -> None:
        for p in Path("/var/tmp").glob(f"{self.token}*"):
            p.unlink()


@pytest.fixture
def planted(host):  # type: ignore[no-untyped-def]
    pl = Planted(host, "h3")
    try:
        yield pl
    finally:
        pl.clean()


def test_planted_modules_never_run_on_any_way_into_a_guest(vs, host, planted):
    plain = _guest(vs, "hp", conf={"apps/init/cmd.stop": "/bin/sh\n-c\nexit 0\n"})
    sysv = _guest(vs, "hs", init="true", conf={"apps/init/style": "sysv\n"})
    for root in (plain, sysv):
        planted.plant(root)
    vs("start", "hp")
    vs("start", "hs")
    assert planted.marks() == []
    with Admin(vs, "hp", "enter") as a:  # a real terminal: the pty path
        a.expect(PROMPT)
        a.send(b"echo planted-''ok; exit 3\n")
        assert a.wait() == 3
        assert b"planted-ok" in a.out
    p = vs("exec", "hp", "sh", "-c", "echo piped; exit 4", check=False)
    assert (p.returncode, p.stdout) == (4, "piped\n")
    with Admin(vs, "hp", "exec", "sh", "-c", "echo on-a-tty; exit 5") as a:
        assert a.wait() == 5
        assert b"on-a-tty" in a.out
    p = vs("exec", "hp", "/nosuch", check=False)  # the error path
    assert "cannot run /nosuch" in p.stderr
    p = vs("exec", "hp", "--cow", "sh", "-c", "echo cow-running; exit 6", check=False)
    assert (p.returncode, p.stdout) == (6, "cow-running\n")
    p = vs("exec", "hs", "sh", "-c", "echo sysv; exit 0", check=False)
    assert (p.returncode, p.stdout) == (0, "sysv\n")
    vs("stop", "hp")  # through its cmd.stop
    vs("stop", "hs")
    p = vs("exec", "hp", "--cow", "sh", "-c", "echo cow-stopped; exit 7", check=False)
    assert (p.returncode, p.stdout) == (7, "cow-stopped\n")
    with Admin(vs, "hp", "enter", "--cow") as a:
        a.expect(PROMPT)
        a.send(b"echo c''ow-tty; exit 8\n")
        assert a.wait() == 8
        assert b"cow-tty" in a.out
    assert planted.marks() == []


# -- TIOCSTI ------------------------------------------------------------------------------------


def test_tiocsti_from_inside_enter_reaches_only_the_guests_own_pty(vs, host, tiocsti):
    root = _guest(vs, "g1")
    shutil.copy2(tiocsti, root / "bin/tiocsti")
    marker = host.base / "pwned"
    vs("start", "g1")
    with Admin(vs, "g1", "enter") as a:
        a.expect(PROMPT)
        a.send(b"tiocsti tty 'echo $((6*7)) > /var/tmp/injected\\n'\n")
        a.expect(b"pushed")
        # the guest's shell read it: the text went to the guest's own terminal
        assert eventually(lambda: (root / "var/tmp/injected").exists(), 10)
        assert (root / "var/tmp/injected").read_text() == "42\n"
        # the classic: end the guest's shell, leave a command for the host's shell
        a.send(f"tiocsti tty 'exit\\necho PWNED > {marker}\\n'\n".encode())
        assert a.wait() == 0  # the guest's shell read the pushed "exit"
        pending = a.pending_input()
        if pending:  # what the host's shell would run next: let it (the attack, if it worked)
            subprocess.run(["sh"], input=pending, timeout=10, capture_output=True)
        assert b"PWNED" not in pending and pending == b""
        assert not marker.exists()


def test_exec_with_only_stdout_on_the_terminal_gives_it_a_pty_too(vs, host, tiocsti):
    root = _guest(vs, "g1")
    shutil.copy2(tiocsti, root / "bin/tiocsti")
    marker = host.base / "pwned"
    vs("start", "g1")
    r, w = os.pipe()
    os.write(w, b"from-the-pipe\n")
    os.close(w)
    script = (
        "cat; readlink /proc/self/fd/0; "
        "[ $(stat -L -c %d /proc/$$/fd/1) = $(stat -c %d /dev/pts/ptmx) ] && "
        f"echo out-on-the-guests-pty; tiocsti 1 'echo PWNED > {marker}\\n'; exit 9"
    )
    try:
        with Admin(vs, "g1", "exec", "sh", "-c", script, stdin=r) as a:
            assert a.wait() == 9
            assert b"from-the-pipe" in a.out and b"pipe:[" in a.out
            assert b"out-on-the-guests-pty" in a.out
            assert a.pending_input() == b""
    finally:
        os.close(r)
    assert not marker.exists()


# -- the relay -----------------------------------------------------------------------------------


def test_enter_relays_size_resize_ctrl_c_and_the_exit_code_and_restores_the_terminal(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    st = vs.state("g1")
    with Admin(vs, "g1", "enter", rows=33, cols=101) as a:
        a.expect(PROMPT)
        a.send(b"stty size\n")
        a.expect(b"33 101")
        # no process of the guest holds the admin's terminal
        tty = os.fstat(a.slave)
        assert _holders((tty.st_dev, tty.st_ino), pid_ns(st["init_pid"])) == []
        a.send(b'sh -c \'trap "echo GOT-WI""NCH; exit" WINCH; while :; do sleep 1; done\'\n')
        time.sleep(1)
        a.resize(40, 120)  # SIGWINCH to vserver, the new size to the guest's pty
        a.expect(b"GOT-WINCH")  # which signals its foreground process group
        a.send(b"stty size\n")
        a.expect(b"40 120")
        a.send(b"sleep 100\n")
        time.sleep(1)
        a.send(b"\x03")  # Ctrl-C, a byte through the pty: the guest's sleep is interrupted
        a.send(b"echo alive-$?\n")
        a.expect(b"alive-130")  # and the session goes on
        a.send(b"exit 5\n")
        assert a.wait() == 5
        assert termios.tcgetattr(a.slave) == a.before


def test_a_terminal_answer_to_the_guests_last_query_is_not_typed_into_the_hosts_shell(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    marker = host.base / "pwned"
    with Admin(vs, "g1", "enter") as a:
        a.expect(PROMPT)
        a.send(b"printf '\\033[21''t'; exit 0\n")  # report the window title, then leave
        a.expect(b"\x1b[21t")
        time.sleep(0.05)  # a terminal that answers (with a title the guest had set) late
        a.send(f"echo PWNED > {marker}\n".encode())
        assert a.wait() == 0
        pending = a.pending_input()
        if pending:
            subprocess.run(["sh"], input=pending, timeout=10, capture_output=True)
        assert pending == b"" and not marker.exists()


def test_the_helper_keeps_nothing_a_guest_process_could_use(vs, host):
    vs.guest("g1")
    vs("start", "g1")
    guest_ns = pid_ns(vs.state("g1")["init_pid"])
    with Admin(vs, "g1", "exec", "sleep", "30") as a:
        # the command runs (sleep, in the guest's pid namespace) only once its waiting half
        # has dropped everything; the waiter is the child of vserver whose child that is
        # (vserver's other children come and go: one seen may be gone a moment later)
        waiters: list[int] = []

        def waiting() -> bool:
            waiters[:] = [
                c
                for c in _children_now(a.p.pid)
                if any(_runs(k, "sleep", guest_ns) for k in _children_now(c))
            ]
            return bool(waiters)

        assert eventually(waiting, 10)
        waiter = waiters[0]
        st = _status(waiter)
        for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[k], 16) == 0, (k, st[k])
        assert len(st["NSpid"].split()) == 1 and pid_ns(waiter) != guest_ns  # unseen inside
        assert [
            os.readlink(f"/proc/{waiter}/fd/{n}") for n in os.listdir(f"/proc/{waiter}/fd")
        ] == ["anon_inode:[signalfd]"]
        command = _children(waiter)[0]
        assert pid_ns(command) == guest_ns
        os.killpg(a.p.pid, signal.SIGTERM)  # passed on: vserver -> waiter -> the command
        assert a.wait() == 128 + signal.SIGTERM
    # a pid 1 of ours (sysv): no capabilities, and its descriptors are out of reach
    _guest(vs, "g2", init="true", conf={"apps/init/style": "sysv\n"})
    vs("start", "g2")
    p = vs(
        "exec",
        "g2",
        "sh",
        "-c",
        "ls -l /proc/1/fd/ /proc/1/root/; cat /proc/1/environ; grep Cap /proc/1/status",
        check=False,
    )
    assert p.stderr.count("Permission denied") == 3, p.stderr
    caps = dict(ln.split(":\t") for ln in p.stdout.splitlines() if ln.startswith("Cap"))
    assert caps and all(int(v, 16) == 0 for v in caps.values()), caps
    vs("stop", "g2")
    # exec --cow of a stopped guest: its pid 1 is the helper's waiting half
    p = vs(
        "exec",
        "g2",
        "--cow",
        "sh",
        "-c",
        "ls -l /proc/1/fd/; grep CapEff /proc/1/status",
        check=False,
    )
    assert "Permission denied" in p.stderr and re.search(r"CapEff:\s+0+\n", p.stdout), p


# -- the helper itself ---------------------------------------------------------------------------


def test_the_helper_is_static_checked_and_parses_strictly(host, tmp_path):
    path = helper.binary(host.base / "state")
    image = path.read_bytes()
    helper.check_static(image, str(path))
    with pytest.raises(UnsupportedError, match="interpreter"):
        helper.check_static(Path("/bin/true").read_bytes(), "/bin/true")
    fd = helper.load(path)
    assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:vsguest (deleted)"
    with pytest.raises(OSError):
        os.write(fd, b"x")  # sealed
    os.close(fd)
    mark = tmp_path / "ran"
    good = ["--errfd", "3", "--last-cap", "40", "--", "/bin/sh", "-c", f": > {mark}"]
    bad = [
        ["exec", "--errfd", "3", "--", "/bin/true"],  # no --last-cap
        ["exec", "--errfd", "3", "--last-cap", "40", "--setns", "x1", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "40", "--nice", "20", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "64", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "40", "--rlimit", "7:9:8", "--", "true"],
        [
            "exec",
            "--errfd",
            "3",
            "--last-cap",
            "40",
            "--caps",
            "1ffffffffffffffff",
            "--",
            "/bin/true",
        ],
        ["exec", "--errfd", "3", "--last-cap", "40", "--ctty", "3", "--", "/bin/true"],
        ["none", "--errfd", "3", "--last-cap", "40", "--", "/bin/true"],
        ["init", "--errfd", "3", "--last-cap", "40", "--root", "4", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "40", "--bogus", "1", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "40", "--"],
        # suexec's ids: both or neither, numbers below (uid_t)-1, groups only with them
        ["exec", "--errfd", "3", "--last-cap", "40", "--uid", "33", "--", "/bin/true"],
        ["exec", "--errfd", "3", "--last-cap", "40", "--groups", "4", "--", "/bin/true"],
        [
            "exec",
            *("--errfd", "3", "--last-cap", "40", "--uid", "4294967295", "--gid", "1"),
            *("--", "/bin/true"),
        ],
        [
            "exec",
            *("--errfd", "3", "--last-cap", "40", "--uid", "1", "--gid", "1"),
            *("--groups", "4,,5", "--", "/bin/true"),
        ],
        [
            "exec",
            *("--errfd", "3", "--last-cap", "40", "--uid", "1", "--gid", "1"),
            *("--groups", ",".join(["7"] * 65), "--", "/bin/true"),
        ],
        ["init", "--errfd", "3", "--last-cap", "40", "--uid", "1", "--gid", "1", "--", "/x"],
    ]
    for args in bad:
        r, w = os.pipe()
        p = subprocess.run(
            [str(path), *args],
            stdin=subprocess.DEVNULL,
            close_fds=False,
            capture_output=True,
            timeout=10,
            preexec_fn=_errfd_from(w),
        )
        os.close(w)
        assert p.returncode == 127, args
        assert os.read(r, 100) == b"vsguest:args:22\n", args
        os.close(r)
    assert not mark.exists()
    p = subprocess.run(
        [str(path), "exec", *good], close_fds=False, timeout=10, preexec_fn=_errfd_from(2)
    )
    assert p.returncode == 0 and mark.exists()
    if shutil.which("strace"):  # nothing but what the source says: no start-up file access
        p = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=%file,%desc",
                str(path),
                "exec",
                "--errfd",
                "3",
                "--last-cap",
                "40",
                "--",
                "/bin/true",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            close_fds=False,
            preexec_fn=_errfd_from(2),
        )
        own = p.stderr.split('execve("/bin/true"')[0]  # the command's own start-up not
        assert not re.findall(r"\b(?:open|openat|stat|newfstatat|statx|readlink|access)\(", own), (
            own
        )


def test_a_start_command_that_cannot_run_is_reported_for_every_style(vs, host):
    for style in ("plain", "sysv"):
        _guest(vs, style, conf={"apps/init/style": f"{style}\n"})
        (host.conf / style / "apps/init/cmd.start").write_text("/nosuch\n")
        p = vs("start", style, check=False)  # sysv: our pid 1 would have waited for ever
        assert p.returncode == 3 and "cannot run /nosuch inside the guest" in p.stderr, p
        assert vs.state(style) is None


def _errfd_from(fd: int):  # type: ignore[no-untyped-def]
    def put() -> None:
        if fd == 3:
            os.set_inheritable(3, True)
        else:
            os.dup2(fd, 3)

    return put


def test_a_forked_python_that_reached_a_guest_imports_nothing():
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vsstore.lifecycle import helper\n"
            "helper.seal_python()\n"
            "for name in ('json', 'termios', 'xml.dom', 'encodings.cp437'):\n"
            "    try:\n        __import__(name)\n    except ImportError:\n"
            "        print('refused', name)\n"
            "try:\n    b'x'.decode('cp437')\nexcept LookupError:\n"
            "    print('refused codec')\n",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.stdout.split("\n") == [
        "refused json",
        "refused termios",
        "refused xml.dom",
        "refused encodings.cp437",
        "refused codec",
        "",
    ], p


# -- item 10: stop never fails on a cgroup that goes away, and needs only the run state ---


def test_stop_succeeds_in_every_one_of_many_start_stop_cycles(vs, host):
    """stop raced the monitor's clean-up (ENODEV from a freezer.state of a cgroup removed
    meanwhile), and a stop right after start hit an init that had no handler yet."""
    vs.guest("g1")
    for i in range(80):
        vs("start", "g1")
        st = vs.state("g1")
        ns_ino = pid_ns(st["init_pid"])
        p = vs("stop", "g1", check=False)
        assert p.returncode == 0, f"cycle {i}: stop exited {p.returncode}: {p.stderr}"
        assert _leftovers(host, st, ns_ino) == [], f"cycle {i}"


@needs_cgroups
@pytest.mark.parametrize("when", ["removed before", "removed while writing"])
def test_killing_a_cgroup_that_vanishes_is_not_an_error(monkeypatch, when):
    cg = cgroups.create(LAYOUT, f"t10-gone-{os.getpid()}", None, cgroups.Limits())
    try:
        if when == "removed before":
            for d in cg.dirs.values():
                d.rmdir()
        else:  # the monitor removes it between kill's open and write of a control file
            real = cgroups._write_file
            seen: list[str] = []

            def write_then_vanish(p, value):  # type: ignore[no-untyped-def]
                with open(p, "w") as f:
                    for d in cg.dirs.values():
                        if d.exists():
                            d.rmdir()
                    try:
                        f.write(value + "\n")
                        f.flush()
                    except OSError as e:
                        seen.append(errno.errorcode[e.errno])
                        raise
                monkeypatch.setattr(cgroups, "_write_file", real)

            monkeypatch.setattr(cgroups, "_write_file", write_then_vanish)
        cg.kill()
        cg.remove()
        assert cg.pids() == []
        if when != "removed before":
            assert seen == ["ENODEV"]  # what the kernel says to a write into a removed one
    finally:
        for d in cg.dirs.values():
            if d.exists():
                d.rmdir()


@pytest.mark.parametrize(
    "rel,text",
    [
        ("rlimits/nofile", "many\n"),
        ("cgroup/memory.max", "lots\n"),
        ("apps/init/style", "bogus\n"),
        ("bcapabilities", "CAP_BOGUS\n"),
        ("apps/init/stop-timeout", "soon\n"),
    ],
)
def test_stop_works_from_the_run_state_whatever_the_configuration_says_now(vs, host, rel, text):
    root = vs.guest(
        "g1", conf={"apps/init/cmd.stop": "/bin/sh\n-c\necho stopped > /var/log/stop-ran\n"}
    )
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = pid_ns(st["init_pid"])
    conf = host.conf / "g1"
    (conf / rel).parent.mkdir(parents=True, exist_ok=True)
    (conf / rel).write_text(text)
    (conf / "apps/init/cmd.stop").write_text("/bin/sh\n-c\necho changed > /var/log/stop-ran\n")
    assert vs("start", "g1", check=False).returncode != 0  # the configuration is broken
    p = vs("stop", "g1", check=False)
    assert p.returncode == 0, p.stderr
    assert _leftovers(host, st, ns_ino) == []
    assert (root / "var/log/stop-ran").read_text() == "stopped\n"  # the command it started with


def test_stop_with_sigkill_as_stop_signal_needs_no_handler_and_no_timeout(vs, host):
    vs.guest(
        "g1", conf={"apps/init/stop-signal": "SIGKILL\n", "apps/init/stop-timeout": "3600\n"}
    )  # waiting would hang here
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = pid_ns(st["init_pid"])
    vs("stop", "g1")
    assert _leftovers(host, st, ns_ino) == []
    assert "init ended (signal 9)" in (host.base / "log/vserver-g1.log").read_text()


def test_stop_works_with_the_configuration_gone_and_an_old_run_state(vs, host):
    vs.guest("g1", init=IDLE)
    vs("start", "g1")
    st = vs.state("g1")
    ns_ino = pid_ns(st["init_pid"])
    f = host.base / "run/guests/g1.json"
    old = {
        k: v
        for k, v in st.items()
        if k not in ("stop", "stop_signal", "stop_timeout", "keep_caps", "rlimits", "nice")
    }
    f.write_text(json.dumps(old))  # written by a vsstore before these fields existed
    shutil.move(host.conf / "g1", host.base / "g1.conf")
    try:
        p = vs("stop", "g1", check=False)
        assert p.returncode == 0, p.stderr
        assert _leftovers(host, st, ns_ino) == []
    finally:
        shutil.move(host.base / "g1.conf", host.conf / "g1")


# -- item 6: a guest's network is its own unless its configuration says otherwise ---------

PROBE_C = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
/* netprobe IFINDEX PORT ABSTRACT: what a guest's root can reach of the host's network */
int main(int argc, char **argv) {
    if (argc != 4) return 9;
    struct if_nameindex *ifs = if_nameindex(), *i;
    for (i = ifs; i && i->if_index; i++) printf("interface %s\n", i->if_name);
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) printf("packet socket: %s\n", strerror(errno));
    else {
        struct sockaddr_ll a = {0};
        a.sll_family = AF_PACKET; a.sll_protocol = htons(ETH_P_ALL);
        a.sll_ifindex = atoi(argv[1]);
        if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
            printf("packet bind: %s\n", strerror(errno));
        else printf("packet bind: bound\n");
    }
    int t = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in in = {0};
    in.sin_family = AF_INET; in.sin_port = htons(atoi(argv[2]));
    in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(t, (struct sockaddr *)&in, sizeof in) < 0)
        printf("tcp 127.0.0.1: %s\n", strerror(errno));
    else { write(t, "probe\n", 6); printf("tcp 127.0.0.1: connected\n"); }
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un un = {0};
    un.sun_family = AF_UNIX;
    size_t n = strlen(argv[3]);
    memcpy(un.sun_path + 1, argv[3], n);  /* sun_path[0] = 0: the abstract namespace */
    if (connect(u, (struct sockaddr *)&un, offsetof(struct sockaddr_un, sun_path) + 1 + n) < 0)
        printf("abstract unix: %s\n", strerror(errno));
    else { write(u, "probe\n", 6); printf("abstract unix: connected\n"); }
    return 0;
}
"""


@pytest.fixture(scope="module")
def netprobe(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A static probe a guest runs: packet socket on a host interface, TCP to 127.0.0.1,
    an abstract unix socket (each only a connect; nothing is sent on the wire)."""
    return _cc(PROBE_C, tmp_path_factory.mktemp("netprobe") / "netprobe", "-static")


class HostListeners:
    """Services only the host should reach: TCP on 127.0.0.1 and an abstract unix socket;
    every connection and what it sent is recorded."""

    def __init__(self) -> None:
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.bind(("127.0.0.1", 0))
        self.port = self.tcp.getsockname()[1]
        self.abstract = f"vsstore-t10-{os.getpid()}-{self.port}"
        self.unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix.bind("\0" + self.abstract)
        self.got: list[tuple[str, bytes]] = []
        self.threads = []
        for kind, s in (("tcp", self.tcp), ("unix", self.unix)):
            s.listen(8)
            t = threading.Thread(target=self._serve, args=(kind, s), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, kind: str, s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return  # closed
            with c:
                c.settimeout(5)
                try:
                    self.got.append((kind, c.recv(100)))
                except OSError:
                    self.got.append((kind, b""))

    def close(self) -> None:
        for s in (self.tcp, self.unix):
            s.close()


@pytest.fixture
def listeners():  # type: ignore[no-untyped-def]
    h = HostListeners()
    try:
        yield h
    finally:
        h.close()


def _host_interface() -> tuple[str, int]:
    for index, name in socket.if_nameindex():
        if name != "lo":
            return name, index
    pytest.skip("the host has no network interface but lo")


def _net_guest(vs, netprobe: Path, conf: dict[str, str] | None = None) -> Path:  # type: ignore[no-untyped-def]
    root = vs.guest("g1", conf=conf)
    shutil.copy(netprobe, root / "bin/netprobe")
    for applet in ("nc", "ping"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def _probe(vs, listeners, *, cow: bool = False) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Run the probe in guest g1 (exec, or exec --cow); what it saw."""
    _name, index = _host_interface()
    args = ["--cow"] if cow else []
    out = vs(
        "exec", "g1", *args, "/bin/netprobe", str(index), str(listeners.port), listeners.abstract
    ).stdout
    seen: dict[str, object] = {"interfaces": set()}
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key.startswith("interface "):
            seen["interfaces"].add(key.split()[1])  # type: ignore[union-attr]
        else:
            seen[key] = value
    seen["proc_net_dev"] = {
        ln.split(":")[0].strip()
        for ln in vs.exec("g1", *args, "cat", "/proc/net/dev").splitlines()[2:]
    }
    return seen


def test_a_guest_without_interfaces_sees_loopback_only_and_reaches_nothing_of_the_host(
    vs, host, netprobe, listeners
):
    _net_guest(vs, netprobe)
    p = vs("start", "g1")
    assert "hostnet" not in p.stderr
    seen = _probe(vs, listeners)
    assert seen["interfaces"] == {"lo"} and seen["proc_net_dev"] == {"lo"}
    # It keeps CAP_NET_RAW (ping), in its own namespace: a packet socket opens, but no
    # host interface exists there to bind it to.
    assert seen["packet bind"] == "No such device"
    assert seen["tcp 127.0.0.1"] == "Connection refused"
    assert seen["abstract unix"] == "Connection refused"
    p = vs("exec", "g1", "sh", "-c", f"echo hello | nc 127.0.0.1 {listeners.port}", check=False)
    assert p.returncode != 0
    assert vs("exec", "g1", "ping", "-c", "1", "-W", "5", "127.0.0.1").stdout  # its own lo is up
    assert listeners.got == []  # nothing of the guest's ever reached the host's services
    st = vs.state("g1")
    assert os.stat(f"/proc/{st['init_pid']}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


def test_spaces_hostnet_shares_the_host_network_without_raw_sockets_and_warns(
    vs, host, netprobe, listeners
):
    _net_guest(vs, netprobe, conf={"spaces/hostnet": ""})
    p = vs("start", "g1")
    assert "warning" in p.stderr and "spaces/hostnet" in p.stderr
    assert "spaces/hostnet" in (host.base / "log/vserver-g1.log").read_text()
    seen = _probe(vs, listeners)
    host_if = {"lo", _host_interface()[0]}  # (other test runs add and remove veths)
    assert host_if <= seen["interfaces"] and host_if <= seen["proc_net_dev"]
    assert seen["packet socket"] == "Operation not permitted"  # CAP_NET_RAW is gone
    assert seen["tcp 127.0.0.1"] == "connected" and seen["abstract unix"] == "connected"
    vs("exec", "g1", "sh", "-c", f"echo hello | nc 127.0.0.1 {listeners.port}")
    assert eventually(lambda: ("tcp", b"hello\n") in listeners.got)
    vs("stop", "g1")
    (host.conf / "g1/bcapabilities").write_text("CAP_NET_RAW\n")  # asked for by name
    vs("start", "g1")
    assert _probe(vs, listeners)["packet bind"] == "bound"


def test_exec_cow_on_a_stopped_guest_gets_a_network_of_its_own(vs, host, netprobe, listeners):
    _net_guest(vs, netprobe)
    seen = _probe(vs, listeners, cow=True)
    assert seen["interfaces"] == {"lo"} and seen["proc_net_dev"] == {"lo"}
    assert seen["tcp 127.0.0.1"] == "Connection refused"
    assert seen["abstract unix"] == "Connection refused"
    assert listeners.got == []
    (host.conf / "g1/spaces").mkdir()
    (host.conf / "g1/spaces/hostnet").touch()
    seen = _probe(vs, listeners, cow=True)
    assert _host_interface()[0] in seen["interfaces"]
    assert seen["tcp 127.0.0.1"] == "connected"


def test_hostnet_and_interfaces_exclude_each_other(vs, host):
    vs.guest("g1", conf={"spaces/hostnet": "", "interfaces/0/ip": "10.231.8.2\n"})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG and "Traceback" not in p.stderr
    assert "spaces/hostnet" in p.stderr and "interfaces" in p.stderr
    assert vs.state("g1") is None


# -- item 7: delete removes a configured guest's tree below the guests' root, nothing else --

# Runs `vserver ARGS` in a mount namespace of its own in which every mount is read-only
# but the test's directory: a delete that goes wrong cannot harm the host running the
# tests (the refusals below would otherwise be tried on '/' itself).
SANDBOX = r"""
import ctypes, json, os, sys
from vsstore.lifecycle import ns
libc = ctypes.CDLL(None, use_errno=True)
class MountAttr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
def readonly(path, ro):
    a = MountAttr(1 if ro else 0, 0 if ro else 1, 0, 0)  # MOUNT_ATTR_RDONLY, recursively:
    if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), path.encode(),  # AT_RECURSIVE
                    ctypes.c_uint(0x8000), ctypes.byref(a), ctypes.c_size_t(32)) != 0:
        raise OSError(ctypes.get_errno(), "mount_setattr", path)
ns.unshare(ns.CLONE_NEWNS)
ns.mount(None, "/", None, ns.MS_REC | (1 << 18))  # MS_PRIVATE
writable = sys.argv[1]
ns.mount(writable, writable, None, ns.MS_BIND | ns.MS_REC)
readonly("/", True)
readonly(writable, False)
for src, dst in json.loads(os.environ.get("T10_BINDS", "[]")):
    ns.mount(src, dst, None, ns.MS_BIND)  # the sandbox's own mounts (one on another, too)
from vsstore.lifecycle.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _sandboxed(
    vs,
    host,
    *args: str,  # type: ignore[no-untyped-def]
    binds: list[tuple[str, str]] = (),
) -> subprocess.CompletedProcess[str]:
    """``vserver ARGS`` with the whole host read-only but the test's directory (and
    ``binds`` mounted in that namespace first)."""
    env = {**vs.env, "T10_BINDS": json.dumps(list(binds))}
    return subprocess.run(
        [sys.executable, "-B", "-c", SANDBOX, str(host.base), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _tree(p: Path) -> dict[str, tuple]:
    """Every name below ``p`` (not following symlinks): type, inode, content of files."""
    out = {}
    for dirpath, dirs, files in os.walk(p):
        for n in dirs + files:
            q = Path(dirpath) / n
            st = os.lstat(q)
            data = q.read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[str(q.relative_to(p))] = (stat.S_IFMT(st.st_mode), st.st_ino, data)
    return out


@pytest.fixture
def hostdir(host) -> Path:  # type: ignore[no-untyped-def]
    """A host directory outside the guests' root that no delete may touch."""
    d = host.base / "hostdir"
    (d / "sub").mkdir(parents=True)
    (d / "precious").write_text("host data\n")
    (d / "sub/more").write_text("more host data\n")
    return d


def _check_probe_runs(vs, host):  # type: ignore[no-untyped-def]
    p = _sandboxed(vs, host, "nosuch", "running")
    if "mount_setattr" in p.stderr:
        pytest.skip(f"no mount_setattr here for the read-only sandbox: {p.stderr[-200:]}")


@pytest.mark.parametrize(
    "arg", ["/", "HOSTDIR", "ROOT", "ROOT/g1", "ROOT/.hash", "unconfigured", "../g1", "g1/", "."]
)
def test_delete_takes_a_configured_guest_name_only(vs, host, hostdir, arg):
    _check_probe_runs(vs, host)
    vs.guest("g1")
    (host.root / "unconfigured/etc").mkdir(parents=True)  # a tree without configuration
    (host.root / ".hash").mkdir(exist_ok=True)
    before = _tree(host.base)
    arg = arg.replace("HOSTDIR", str(hostdir)).replace("ROOT", str(host.root))
    for args in ((arg, "delete", "--force"), (arg, "delete")):
        p = _sandboxed(vs, host, *args)
        assert p.returncode == EXIT_CONFIG, p.stdout + p.stderr
        assert "configured guest" in p.stderr and "Traceback" not in p.stderr
    assert _tree(host.base) == before  # nothing removed, not even a lock file made


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/etc",
        "HOSTDIR",
        "ROOT",
        "ROOT/",
        "ROOT/.hash",
        "ROOT/g2",
        "ROOT/g2/etc",
        "ROOT/link-to-root",
        "ROOT/link-to-hostdir",
        "ROOT/g1/../..",
        "ROOT/g2-link",
    ],
)
def test_delete_refuses_a_vdir_that_leaves_the_guests_root(vs, host, hostdir, target):
    _check_probe_runs(vs, host)
    vs.guest("g1")
    vs.guest("g2")
    (host.root / ".hash").mkdir(exist_ok=True)
    os.symlink("/", host.root / "link-to-root")
    os.symlink(hostdir, host.root / "link-to-hostdir")
    os.symlink(host.root / "g2", host.root / "g2-link")
    vdir = host.conf / "g1/vdir"
    vdir.unlink()
    os.symlink(target.replace("HOSTDIR", str(hostdir)).replace("ROOT", str(host.root)), vdir)
    before = _tree(host.base)
    p = _sandboxed(vs, host, "g1", "delete", "--force")
    assert p.returncode == EXIT_CONFIG, p.stdout + p.stderr
    assert str(vdir) in p.stderr and "Traceback" not in p.stderr  # names the file to fix
    assert _tree(host.base) == before


def _hostile_tree(vs, host, hostdir: Path) -> Path:  # type: ignore[no-untyped-def]
    """Guest g1 sharing a store object with g2, its tree full of what a hostile guest
    leaves: symlinks out, mount points (empty here), a fifo, a device node, a tree deeper
    than PATH_MAX, an immutable file and an immutable directory of its own."""
    shared = b"a file two guests share " * 100
    root = vs.guest("g1", files={"usr/lib/shared": shared})
    vs.guest("g2", files={"usr/lib/shared": shared})
    host.vsunify("run", "g1", "g2")
    assert os.stat(root / "usr/lib/shared").st_nlink == 3
    os.symlink(hostdir, root / "etc/hostdir")
    os.symlink(hostdir / "precious", root / "etc/precious")
    (root / "mnt/host").mkdir(parents=True)
    (root / "mnt/deep/er").mkdir(parents=True)
    (root / "etc/mounted").write_text("a file another is mounted on\n")
    os.mkfifo(root / "run/fifo")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    d = root / "var/deep"
    d.mkdir(parents=True)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(300):  # 300 * 21 bytes: walked by descriptors, not by paths
        os.mkdir("d" * 20, dir_fd=fd)
        nfd = os.open("d" * 20, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    (root / "etc/own").write_text("immutable, the guest's own\n")
    (root / "srv/locked").mkdir(parents=True)
    (root / "srv/locked/f").write_text("in an immutable directory\n")
    subprocess.run(["chattr", "+i", str(root / "etc/own"), str(root / "srv/locked")], check=True)
    subprocess.run(["chattr", "+i", str(hostdir / "precious")], check=True)  # no flag of it
    return root  # may change


def _unlock(root: Path, hostdir: Path) -> None:
    """Clear the immutable flags the test set (also where a failed delete left them), so
    the host fixture can remove everything."""
    for d in (root, hostdir):
        for dirpath, dirs, files in os.walk(d):
            for n in dirs + files:
                if not os.path.islink(os.path.join(dirpath, n)):
                    subprocess.run(["chattr", "-i", os.path.join(dirpath, n)], capture_output=True)


def _binds(root: Path, hostdir: Path) -> list[tuple[str, str]]:
    """Host directories (and a host file, immutable) bound into the tree."""
    return [
        (str(hostdir), str(root / "mnt/host")),
        (str(hostdir / "sub"), str(root / "mnt/deep/er")),
        (str(hostdir / "precious"), str(root / "etc/mounted")),
    ]


def _outside(host, hostdir: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    return {
        "host": _tree(hostdir),
        "g2": _tree(host.root / "g2"),
        "flags": (flags(hostdir / "precious"), flags(host.root / "g2/usr/lib/shared")),
        "store": {p: p.read_bytes() for p in host.store.rglob("*") if p.is_file()},
    }


def test_delete_removes_a_hostile_tree_with_host_mounts_and_nothing_outside_it(vs, host, hostdir):
    root = _hostile_tree(vs, host, hostdir)
    before = _outside(host, hostdir)
    mounted = []
    try:
        for src, dst in _binds(root, hostdir):
            subprocess.run(["mount", "--bind", src, dst], check=True)
            mounted.append(dst)
        vs("delete", "g1", "--force")
        assert not root.exists() and not (host.conf / "g1").exists()
        assert not [m for m in host_mounts() if m.startswith(str(root))]
        assert _outside(host, hostdir) == before
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", m], capture_output=True)
        _unlock(root, hostdir)
    assert os.stat(host.root / "g2/usr/lib/shared").st_nlink == 2  # g2's and the store's


def test_delete_of_a_tree_with_a_symlink_to_slash_and_stacked_mounts_in_a_sandbox(
    vs, host, hostdir
):
    _check_probe_runs(vs, host)
    root = _hostile_tree(vs, host, hostdir)
    os.symlink("/", root / "etc/slash")
    os.symlink("../../../../../../../../..", root / "etc/up")
    binds = _binds(root, hostdir) + [(str(hostdir / "sub"), str(root / "mnt/host"))]
    before = _outside(host, hostdir)
    try:
        p = _sandboxed(
            vs, host, "g1", "delete", "--force", binds=binds
        )  # mounted in the sandbox: gone with it
        assert p.returncode == 0, p.stdout + p.stderr
        assert not root.exists() and not (host.conf / "g1").exists()
        assert _outside(host, hostdir) == before
    finally:
        _unlock(root, hostdir)


# -- items 3 and 4: cow tells guests apart by their pid namespace; unseal windows -----------

HAMMER_S = float(os.environ.get("VSSTORE_HAMMER_SECONDS", "20"))


def install(root: Path, binary: Path, as_name: str) -> None:
    shutil.copy(binary, root / as_name.lstrip("/"))
    os.chmod(root / as_name.lstrip("/"), 0o755)


# -- cow: the writing guest is told by its pid namespace, never by its root -----------------

SHARED = b"shared data of every guest\n" * 64

SPOOF_C = r"""
/* spoof DIR NEWROOT FILE DATA: keep DIR open, chroot into NEWROOT (a directory the guest
 * named like another guest's root), then append DATA to FILE through the kept directory
 * descriptor.  Exit 0 if the write went anywhere, 3 if the open was refused. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 5)
        return 2;
    int d = open(argv[1], O_RDONLY | O_DIRECTORY);
    if (d < 0 || chroot(argv[2]) != 0 || chdir("/") != 0) {
        perror("spoof: setup");
        return 2;
    }
    int f = openat(d, argv[3], O_WRONLY | O_APPEND);
    if (f < 0) {
        perror("spoof: open");
        return 3;
    }
    if (write(f, argv[4], strlen(argv[4])) < 0) {
        perror("spoof: write");
        return 4;
    }
    return 0;
}
"""

HAMMER_C = r"""
/* hammer PATH SECONDS: for SECONDS, try every way a guest has to change the inode its name
 * PATH holds: open for writing (then pwrite, ftruncate), open with O_TRUNC, truncate(2),
 * chmod to set-uid, chown, setxattr, utimes.  Prints one line per success: "fd" when it got
 * a writable descriptor, "wrote", "truncated", "meta" (counts at the end). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3)
        return 2;
    const char *p = argv[1];
    time_t end = time(NULL) + atoi(argv[2]);
    long tries = 0, fds = 0, wrote = 0, trunc = 0, meta = 0;
    struct timeval tv[2] = {{5, 0}, {5, 0}};
    while (time(NULL) < end) {
        for (int i = 0; i < 1000; i++, tries++) {
            int fd = open(p, O_RDWR);
            if (fd >= 0) {
                fds++;
                if (pwrite(fd, "EVIL", 4, 0) == 4)
                    wrote++;
                if (ftruncate(fd, 1) == 0)
                    trunc++;
                close(fd);
            }
            fd = open(p, O_WRONLY | O_TRUNC);
            if (fd >= 0) {
                fds++;
                close(fd);
            }
            if (truncate(p, 0) == 0)
                trunc++;
            if (chmod(p, 04777) == 0)
                meta++;
            if (chown(p, 1234, 1234) == 0)
                meta++;
            if (setxattr(p, "user.evil", "1", 1, 0) == 0)
                meta++;
            if (utimes(p, tv) == 0)
                meta++;
        }
    }
    printf("tries %ld fds %ld wrote %ld truncated %ld meta %ld\n", tries, fds, wrote, trunc,
           meta);
    return 0;
}
"""


@pytest.mark.parametrize("form", ["tree", "overlay"])
def test_a_guest_chrooted_to_look_like_another_cannot_write_its_files(vs, host, form):
    """Guest a (through cow) keeps a directory fd, chroots into a directory of its own
    named like guest b's root (its tree's host path, or its path in the overlay) and
    writes through the fd: b's files and the store stay as they were."""
    for g in ("a", "b"):
        vs.guest(g, files={"usr/share/data.txt": SHARED, "bin/probe": SHARED + b"probe"})
        (host.conf / g / "cow").touch()
    host.vsunify("run", "a", "b")
    spoofed = str(host.root / "b") if form == "tree" else str(host.base / "run/cow/b")
    (host.root / "a" / spoofed.lstrip("/")).mkdir(parents=True)
    install(host.root / "a", _cc(SPOOF_C, host.base / "spoof", "-static"), "spoof")
    vs("start", "a")
    vs("start", "b")
    for d, f in (("/usr/share", "data.txt"), ("/bin", "probe")):
        p = vs("exec", "a", "/spoof", d, spoofed, f, "EVIL\n", check=False)
        assert p.returncode in (0, 3), p.stderr
    objs = {inode(p): p for p in host.store.rglob("*") if p.is_file()}
    for rel, data in (("usr/share/data.txt", SHARED), ("bin/probe", SHARED + b"probe")):
        assert (host.root / "b" / rel).read_bytes() == data
        assert vs.exec("b", "cat", f"/{rel}").encode() == data
        assert flags(host.root / "b" / rel) == "UIa"
        obj = objs[inode(host.root / "b" / rel)]  # still the store's object
        assert obj.read_bytes() == data and flags(obj) == "UIa"


# -- unseal windows: a guest hammering a shared inode while others' names change -------------

DATA = b"every guest has this file\n" * 100
K = 600  # names per guest of the one shared inode


def _guest_files() -> dict[str, bytes]:
    return {f"usr/share/f{i}": DATA for i in range(K)}


class Hammer:
    """The attack, inside guest a (started directly: its root is a guest root with the
    default capabilities): a static program looping over every way to change the inode of
    a's own name /usr/share/f0, restarted when it is killed, until stopped."""

    def __init__(self, vs: Vserver, host) -> None:  # type: ignore[no-untyped-def]
        self.host = host
        root = host.root / "a"
        install(root, _cc(HAMMER_C, host.base / "hammer", "-static"), "hammer")
        self.stop_file = root / "hammer-stop"
        vs("start", "a")
        self.p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vsstore.lifecycle.cli",
                "a",
                "exec",
                "/bin/sh",
                "-c",
                "while [ ! -e /hammer-stop ]; do /hammer /usr/share/f0 1; done",
            ],
            cwd=REPO,
            env=vs.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> int:
        """Stop it; the number of attempts it made."""
        self.stop_file.touch()
        try:
            out, _ = self.p.communicate(timeout=60)
        finally:
            self.p.kill()
        return sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("tries"))


def _check_untouched(host, obj: Path, guests: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The store's object and every name of every guest: exact bytes and metadata."""
    for o in [obj]:
        assert o.read_bytes() == DATA, o
        st = os.stat(o)
        assert (st.st_mode, st.st_uid, st.st_gid) == (0o100644, 0, 0)
        assert st.st_mtime == 1_600_000_000
        assert [x for x in os.listxattr(o) if ".vsstore." not in x] == []
        assert flags(o) == "UIa"
    for g in guests:
        for f in (host.root / g / "usr/share").glob("f*"):
            assert f.read_bytes() == DATA, f
            st = os.stat(f)
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0), f
            assert [x for x in os.listxattr(f) if ".vsstore." not in x] == [], f


def _until(seconds: float, step) -> int:  # type: ignore[no-untyped-def]
    """Run ``step(i)`` for i = 0, 1, ... until ``seconds`` passed; the number of steps."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        step(i)
        i += 1
    return i


def _cow_victim(vs: Vserver, host) -> Path:  # type: ignore[no-untyped-def]
    """Guest b started through the overlay; its tree as the host sees it there."""
    (host.conf / "b" / "cow").touch()
    vs("start", "b")
    return host.base / "run/cow/b/usr/share"


def _rename(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)

    def step(i: int) -> None:
        f = d / f"f{i % K}"
        os.rename(f, d / "moved")
        os.rename(d / "moved", f)

    return _until(HAMMER_S, step)


def _link_unlink(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)

    def step(i: int) -> None:
        os.link(d / f"f{i % K}", d / "another")
        os.unlink(d / "another")

    return _until(HAMMER_S, step)


def _copy_up(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)
    end = time.monotonic() + HAMMER_S
    n = 0
    for i in range(K):  # each name once: its own copy afterwards
        with open(d / f"f{i}", "ab"):
            n += 1
        if time.monotonic() > end:
            break
    return n


def _deunify(vs, host) -> int:  # type: ignore[no-untyped-def]
    def step(i: int) -> None:
        host.vsunify("deunify", "b")
        host.vsunify("run", "a", "b")

    return _until(HAMMER_S, step) * K


def _delete(vs, host) -> int:  # type: ignore[no-untyped-def]
    def step(i: int) -> None:
        name = f"d{i}"
        vs("build", name, "-m", "skeleton")
        for rel, data in _guest_files().items():
            p = host.root / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.utime(p, (1_600_000_000, 1_600_000_000))
        host.vsunify("run", "a", name)
        vs("delete", name, "--force")

    return _until(HAMMER_S, step) * K


OPERATIONS = {
    "rename": _rename,
    "link+unlink": _link_unlink,
    "copy-up": _copy_up,
    "deunify+link": _deunify,
    "delete": _delete,
}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_a_guest_hammering_a_shared_inode_changes_nothing_others_see(vs, host, op):
    """Every window in which a shared inode's seal is lifted (for another guest's rename,
    link, unlink, copy-up, for deunify and re-linking, for delete) is leased and verified:
    guest a opening it for writing, truncating it, chmod-ing, chown-ing, setxattr-ing and
    touching it meanwhile changes no byte and no mode bit anywhere."""
    for g in ("a", "b", "c"):
        vs.guest(g, files=_guest_files())
    host.vsunify("run", "a", "b", "c")
    shared = {inode(host.root / g / "usr/share/f0") for g in "abc"}
    assert len(shared) == 1
    obj = next(p for p in host.store.rglob("*") if p.is_file() and inode(p) in shared)
    hammer = Hammer(vs, host)
    try:
        windows = OPERATIONS[op](vs, host)
    except OSError as e:
        log = host.base / "log/vscow.log"
        tail = log.read_text()[-4000:] if log.exists() else ""
        raise AssertionError(f"{op}: {e}\n{tail}") from e
    finally:
        tries = hammer.stop()
    assert tries > 0 and windows > 0
    _check_untouched(host, obj, ["a", "b", "c"])


def test_the_package_manager_is_never_told_by_a_path_leading_out_of_the_guest(vs, host):
    """``vserver NAME pkg`` picks apt, dnf or yum from the guest's tree: a guest whose /var
    is a symlink to the host's (which has a dpkg database) names no package manager."""
    vs.guest("g")
    shutil.rmtree(host.root / "g/var")
    os.symlink("/var", host.root / "g/var")
    assert os.path.exists("/var/lib/dpkg/status")  # the host's, what the symlink leads to
    p = vs("pkg", "g", "install", "x", check=False)
    assert p.returncode == EXIT_CONFIG and "cannot tell the guest's package manager" in p.stderr
