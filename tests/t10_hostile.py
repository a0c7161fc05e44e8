"""Layer 10: hostile guests.  Real busybox guests (t7's helpers) attack the host through the
ways into them; each attack is bounded in time and cleaned up also when it succeeds."""
from __future__ import annotations

import fcntl
import os
import py_compile
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import termios
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from t7_lifecycle import Vserver, _eventually, _pid_ns, leave_nothing
from vsstore import enter
from vsstore.errors import UnsupportedError

# == Entering a guest: planted modules, TIOCSTI, the pty relay, the helper (items 1, 2) ====

EXTRA_APPLETS = ["stty", "readlink", "tty", "kill", "printf", "sed", "cut"]
PROMPT = b"# "


@pytest.fixture
def vs(host):  # type: ignore[no-untyped-def]
    v = Vserver(host)
    try:
        yield v
    finally:
        leave_nothing(v, host)


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
    subprocess.run(["gcc", "-O2", *flags, "-o", str(out), str(c)], check=True,
                   capture_output=True)
    return out


@pytest.fixture
def tiocsti(host) -> Path:  # type: ignore[no-untyped-def]
    """A static TIOCSTI tool (busybox has none), to copy into guests."""
    return _cc(TIOCSTI_C, host.base / "tiocsti", "-static")


# -- the admin's terminal ------------------------------------------------------------------

class Admin:
    """``vserver ARGS...`` on a pty of the test's own: the admin's terminal, its controlling
    tty (stdin and stdout can be something else).  Killed on close, whatever happened."""

    def __init__(self, vs: Vserver, *args: str, rows: int = 24, cols: int = 80,
                 stdin: int | None = None, stdout: int | None = None) -> None:
        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.before = termios.tcgetattr(self.slave)
        self.out = b""
        self.pos = 0  # expect() looks past what it matched already
        self.p = subprocess.Popen(
            [sys.executable, "-m", "vsstore.vserver_cli", *args], cwd=REPO,
            env={**vs.env, "TERM": "xterm"},
            stdin=self.slave if stdin is None else stdin,
            stdout=self.slave if stdout is None else stdout, stderr=self.slave,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(2, termios.TIOCSCTTY, 0))

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
            assert time.monotonic() < end, f"no {pattern!r} in {self.out[self.pos:]!r}"
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


def _holders(dev_ino: tuple[int, int], pid_ns: int | None) -> list[str]:
    """Every descriptor that a process of the pid namespace holds on the file ``dev_ino``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or _pid_ns(int(d)) != pid_ns:
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


# -- planted modules --------------------------------------------------------------------------

PLANTED_PY = ["termios", "fcntl", "tty", "pty", "select", "selectors", "traceback",
              "linecache", "tokenize", "token", "locale", "gettext", "warnings", "signal",
              "resource", "struct", "json", "subprocess", "platform", "errno", "codecs",
              "sitecustomize", "usercustomize", "this"]
PLANTED_SO = ["termios", "fcntl", "select", "resource", "mmap", "_posixsubprocess", "_ctypes",
              "_json", "_struct", "math", "binascii", "zlib", "_socket", "array", "_random",
              "_hashlib", "_lzma", "_bz2", "_decimal", "readline", "_curses"]
PLANTED_ENCODINGS = ["cp437", "cp1252", "idna", "mac_roman", "koi8_r", "utf_16", "ascii"]


def _interpreter_paths() -> list[str]:
    """sys.path of the vserver command as the tests run it, and the usual other places."""
    p = subprocess.run([sys.executable, "-c", "import json, site, sys; print(json.dumps("
                        "sys.path + site.getsitepackages() + [site.getusersitepackages()]))"],
                       cwd=REPO, capture_output=True, text=True, check=True)
    import json
    paths = {os.path.abspath(x) if x else str(REPO) for x in json.loads(p.stdout)}
    paths |= {"/usr/lib/python3.11", "/usr/lib/python3.11/lib-dynload",
              "/usr/lib/python3/dist-packages", "/usr/local/lib/python3.11/dist-packages",
              "/", "/root", str(REPO), *(str(REPO / pkg) for pkg in ("vsstore", "cow", "unify"))}
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
        self.so = _cc(PLANT_SO_C, host.base / "planted.so", "-shared", "-fPIC",
                      f'-DHOST_MARK="{self.host_dir}/so"',
                      f'-DGUEST_MARK="/var/tmp/{self.token}-so"')
        self.roots: list[Path] = []

    def code(self, name: str) -> str:
        return (f"for _p in ({str(self.host_dir / name)!r}, '/var/tmp/{self.token}-{name}'):\n"
                f"    try:\n        open(_p, 'a').write('ran\\n')\n"
                f"    except Exception:\n        pass\n")

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
                py_compile.compile(str(at / f"{n}.py"),
                                   cfile=str(at / "__pycache__" / f"{n}.cpython-311.pyc"))
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
        assert _eventually(lambda: (root / "var/tmp/injected").exists(), 10)
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
    script = ("cat; readlink /proc/self/fd/0; "
              "[ $(stat -L -c %d /proc/$$/fd/1) = $(stat -c %d /dev/pts/ptmx) ] && "
              f"echo out-on-the-guests-pty; tiocsti 1 'echo PWNED > {marker}\\n'; exit 9")
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
        assert _holders((tty.st_dev, tty.st_ino), _pid_ns(st["init_pid"])) == []
        a.send(b"sh -c 'trap \"echo GOT-WI\"\"NCH; exit\" WINCH; while :; do sleep 1; done'\n")
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


def test_a_terminal_answer_to_the_guests_last_query_is_not_typed_into_the_hosts_shell(vs,
                                                                                      host):
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
    guest_ns = _pid_ns(vs.state("g1")["init_pid"])
    with Admin(vs, "g1", "exec", "sleep", "30") as a:
        assert _eventually(lambda: _children(a.p.pid), 10)
        waiter = _children(a.p.pid)[0]
        # the command runs (sleep, in the guest's pid namespace) only once its waiting half
        # has dropped everything
        assert _eventually(lambda: any(_pid_ns(c) == guest_ns and
                                       _status(c)["Name"] == "sleep"
                                       for c in _children(waiter)), 10)
        st = _status(waiter)
        for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[k], 16) == 0, (k, st[k])
        assert len(st["NSpid"].split()) == 1 and _pid_ns(waiter) != guest_ns  # unseen inside
        assert [os.readlink(f"/proc/{waiter}/fd/{n}") for n in os.listdir(f"/proc/{waiter}/fd")
                ] == ["anon_inode:[signalfd]"]
        command = _children(waiter)[0]
        assert _pid_ns(command) == guest_ns
        os.killpg(a.p.pid, signal.SIGTERM)  # passed on: vserver -> waiter -> the command
        assert a.wait() == 128 + signal.SIGTERM
    # a pid 1 of ours (sysv): no capabilities, and its descriptors are out of reach
    _guest(vs, "g2", init="true", conf={"apps/init/style": "sysv\n"})
    vs("start", "g2")
    p = vs("exec", "g2", "sh", "-c", "ls -l /proc/1/fd/ /proc/1/root/; cat /proc/1/environ; "
           "grep Cap /proc/1/status", check=False)
    assert p.stderr.count("Permission denied") == 3, p.stderr
    caps = dict(ln.split(":\t") for ln in p.stdout.splitlines() if ln.startswith("Cap"))
    assert caps and all(int(v, 16) == 0 for v in caps.values()), caps
    vs("stop", "g2")
    # exec --cow of a stopped guest: its pid 1 is the helper's waiting half
    p = vs("exec", "g2", "--cow", "sh", "-c", "ls -l /proc/1/fd/; grep CapEff /proc/1/status",
           check=False)
    assert "Permission denied" in p.stderr and re.search(r"CapEff:\s+0+\n", p.stdout), p


# -- the helper itself ---------------------------------------------------------------------------

def test_the_helper_is_static_checked_and_parses_strictly(host, tmp_path):
    path = enter.binary(host.base / "state")
    image = path.read_bytes()
    enter.check_static(image, str(path))
    with pytest.raises(UnsupportedError, match="interpreter"):
        enter.check_static(Path("/bin/true").read_bytes(), "/bin/true")
    fd = enter.load(path)
    assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:vsguest (deleted)"
    with pytest.raises(OSError):
        os.write(fd, b"x")  # sealed
    os.close(fd)
    mark = tmp_path / "ran"
    good = ["--errfd", "3", "--last-cap", "40", "--", "/bin/sh", "-c", f": > {mark}"]
    bad = [["exec", "--errfd", "3", "--", "/bin/true"],  # no --last-cap
           ["exec", "--errfd", "3", "--last-cap", "40", "--setns", "x1", "--", "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--nice", "20", "--", "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "64", "--", "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--rlimit", "7:9:8", "--", "true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--caps", "1ffffffffffffffff", "--",
            "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--ctty", "3", "--", "/bin/true"],
           ["none", "--errfd", "3", "--last-cap", "40", "--", "/bin/true"],
           ["init", "--errfd", "3", "--last-cap", "40", "--root", "4", "--", "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--bogus", "1", "--", "/bin/true"],
           ["exec", "--errfd", "3", "--last-cap", "40", "--"]]
    for args in bad:
        r, w = os.pipe()
        p = subprocess.run([str(path), *args], stdin=subprocess.DEVNULL, close_fds=False,
                           capture_output=True, timeout=10, preexec_fn=_errfd_from(w))
        os.close(w)
        assert p.returncode == 127, args
        assert os.read(r, 100) == b"vsguest:args:22\n", args
        os.close(r)
    assert not mark.exists()
    p = subprocess.run([str(path), "exec", *good], close_fds=False, timeout=10,
                       preexec_fn=_errfd_from(2))
    assert p.returncode == 0 and mark.exists()
    if shutil.which("strace"):  # nothing but what the source says: no start-up file access
        p = subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file,%desc", str(path), "exec",
                            "--errfd", "3", "--last-cap", "40", "--", "/bin/true"],
                           capture_output=True, text=True, timeout=20, close_fds=False,
                           preexec_fn=_errfd_from(2))
        own = p.stderr.split('execve("/bin/true"')[0]  # the command's own start-up not
        assert not re.findall(r"\b(?:open|openat|stat|newfstatat|statx|readlink|access)\(",
                              own), own


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
    p = subprocess.run([sys.executable, "-c", "from vsstore import enter\n"
                        "enter.seal_python()\n"
                        "for name in ('json', 'termios', 'xml.dom', 'encodings.cp437'):\n"
                        "    try:\n        __import__(name)\n    except ImportError:\n"
                        "        print('refused', name)\n"
                        "try:\n    b'x'.decode('cp437')\nexcept LookupError:\n"
                        "    print('refused codec')\n"],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.stdout.split("\n") == ["refused json", "refused termios", "refused xml.dom",
                                    "refused encodings.cp437", "refused codec", ""], p
