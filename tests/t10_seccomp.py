"""Layer 10: the default syscall filter of every guest process (issue 16): started init,
exec, suexec, exec --cow get EPERM for keyctl, bpf, perf_event_open, open_by_handle_at,
userfaultfd, init_module, a user namespace; normal work goes on; a guest's ``seccomp``
file adds and removes names; a bad one is a clear error before anything starts.  A small
static probe (busybox has no applet for these) makes each call and prints its errno."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from guests import CORPUS, Vserver, debian_guest, static_program

from vsstore.errors import EXIT_CONFIG
from vsstore.lifecycle import helper, seccomp

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* probe NAME...: for each, make the call with harmless arguments and print
 * "NAME ERRNO" (0: it succeeded) */
static long call(const char *n)
{
    if (!strcmp(n, "keyctl")) return syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -3, 0);
    if (!strcmp(n, "add_key")) return syscall(SYS_add_key, "user", "x", "y", 1, -3);
    if (!strcmp(n, "bpf")) return syscall(SYS_bpf, 0, NULL, 0);
    if (!strcmp(n, "perf_event_open")) return syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0);
    if (!strcmp(n, "userfaultfd")) return syscall(SYS_userfaultfd, 0);
    if (!strcmp(n, "init_module")) return syscall(SYS_init_module, NULL, 0, "");
    if (!strcmp(n, "open_by_handle_at")) return syscall(SYS_open_by_handle_at, -100, NULL, 0);
    if (!strcmp(n, "unshare_user")) return syscall(SYS_unshare, CLONE_NEWUSER);
    if (!strcmp(n, "clone3")) return syscall(SYS_clone3, NULL, 0);
    if (!strcmp(n, "getppid")) return syscall(SYS_getppid);
    if (!strcmp(n, "geteuid")) return syscall(SYS_geteuid);
#ifdef __x86_64__
    if (!strcmp(n, "keyctl32") || !strcmp(n, "getppid32")) {  /* the i386 ABI: int $0x80 */
        long r = !strcmp(n, "keyctl32") ? 288 : 64;
        __asm__ volatile("int $0x80" : "+a"(r) : "b"(0), "c"(-3), "d"(0) : "memory");
        if (r < 0 && r > -4096) { errno = (int)-r; return -1; }
        return r;
    }
#endif
    errno = EINVAL;
    return -1;
}

int main(int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        long r = call(argv[i]);
        printf("%s %d\n", argv[i], r < 0 ? errno : 0);
        if (!strcmp(argv[i], "geteuid"))
            printf("euid %ld\n", r);
    }
    return 0;
}
"""

REFUSED = [
    "keyctl",
    "add_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "init_module",
    "open_by_handle_at",
    "unshare_user",
]
EPERM, ENOSYS = 1, 38


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return static_program(tmp_path_factory.mktemp("seccomp"), PROBE_C)


def _guest(
    vs: Vserver,
    name: str,
    probe: Path,
    init: str | None = None,
    files: dict[str, bytes] | None = None,
    conf: dict[str, str] | None = None,
) -> Path:
    files = {"bin/probe": probe.read_bytes(), **(files or {})}
    if init is None:
        root = vs.guest(name, files=files, conf=conf)
    else:
        root = vs.guest(name, init=init, files=files, conf=conf)
    os.chmod(root / "bin/probe", 0o755)
    return root


def _errnos(out: str) -> dict[str, int]:
    return {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln}


def _status(text: str) -> dict[str, str]:
    return dict(ln.split(":\t", 1) for ln in text.splitlines() if ":\t" in ln)


def test_the_default_filter_builds_for_this_machine_and_names_are_checked(tmp_path):
    prog = seccomp.build(seccomp.Policy.default())
    assert prog and len(prog) % 8 == 0
    pol = seccomp.read(tmp_path / "seccomp", "# mine\n+keyctl\nbpf\n-getppid\n!uname\n")
    assert "keyctl" not in pol.refused and "bpf" not in pol.refused
    assert {"getppid", "uname", "perf_event_open"} <= pol.refused
    assert seccomp.Policy.from_changes(pol.changes()) == pol
    assert seccomp.read(tmp_path / "seccomp", None) == seccomp.Policy.default()
    with pytest.raises(Exception, match=r"seccomp:2: unknown system call 'nosuch'"):
        seccomp.read(tmp_path / "seccomp", "+keyctl\n-nosuch\n")
    with pytest.raises(Exception, match="execve cannot be refused"):
        seccomp.read(tmp_path / "seccomp", "-execve\n")


def test_guest_processes_are_refused_what_the_filter_names(vs, host, probe):
    _guest(
        vs, "g1", probe, init="/bin/probe " + " ".join(REFUSED) + " clone3 getppid; exec sleep 1000"
    )
    vs("start", "g1")
    got = _errnos(vs.exec("g1", "/bin/probe", *REFUSED, "clone3", "getppid"))
    assert got == {**dict.fromkeys(REFUSED, EPERM), "clone3": ENOSYS, "getppid": 0}
    # init itself (what it printed at start is in the guest's log), the same
    log = (host.base / "log/vserver-g1.log").read_text()
    assert all(f"{n} {EPERM}" in log for n in REFUSED), log
    # filtered, but without no_new_privs: setuid programs in a guest keep working
    for who in ("self", "1"):
        st = _status(vs.exec("g1", "cat", f"/proc/{who}/status"))
        assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "0"
    # enter, too
    out = vs("enter", "g1", input="/bin/probe keyctl bpf\nexit\n").stdout
    assert "keyctl 1" in out and "bpf 1" in out
    # normal work
    assert vs.exec("g1", "sh", "-c", "echo hi > /tmp/x; cat /tmp/x; ls /").startswith("hi\n")


def test_suexec_is_filtered_and_setuid_still_works(vs, host, probe):
    root = _guest(
        vs,
        "g1",
        probe,
        files={
            "etc/passwd": b"root:x:0:0::/root:/bin/sh\nwww:x:33:33::/:/bin/sh\n",
            "etc/group": b"root:x:0:\nwww:x:33:\n",
        },
    )
    shutil.copy2(probe, root / "bin/suidprobe")
    os.chown(root / "bin/suidprobe", 0, 0)
    os.chmod(root / "bin/suidprobe", 0o4755)
    vs("start", "g1")
    out = vs("suexec", "g1", "www", "/bin/probe", "keyctl", "bpf").stdout
    assert _errnos(out) == {"keyctl": EPERM, "bpf": EPERM}
    out = vs("suexec", "g1", "www", "/bin/suidprobe", "geteuid").stdout
    assert "euid 0" in out  # no no_new_privs: the setuid bit still counts


def test_exec_cow_is_filtered(vs, host, probe):
    _guest(vs, "g1", probe)
    out = vs("exec", "g1", "--cow", "/bin/probe", "keyctl", "perf_event_open").stdout
    assert _errnos(out) == {"keyctl": EPERM, "perf_event_open": EPERM}


def test_the_guest_file_allows_and_refuses_names(vs, host, probe):
    _guest(vs, "g1", probe, conf={"seccomp": "# this guest's keyrings\n+keyctl\n-getppid\n"})
    vs("start", "g1")
    got = _errnos(vs.exec("g1", "/bin/probe", "keyctl", "add_key", "getppid", "perf_event_open"))
    assert got["keyctl"] != EPERM  # it reaches the kernel now
    assert got["add_key"] == EPERM and got["perf_event_open"] == EPERM
    assert got["getppid"] == EPERM
    # stop (and its command) uses what start recorded
    assert vs.state("g1")["seccomp"] == ["+keyctl", "-getppid"]
    vs("stop", "g1")


def test_a_guest_without_the_file_gets_the_default(vs, host, probe):
    _guest(vs, "g1", probe)
    vs("start", "g1")
    got = _errnos(vs.exec("g1", "/bin/probe", "keyctl", "getppid"))
    assert got == {"keyctl": EPERM, "getppid": 0}
    assert vs.state("g1")["seccomp"] == []


def test_a_bad_seccomp_file_is_a_clear_error_before_anything_starts(vs, host, probe):
    _guest(vs, "g1", probe, conf={"seccomp": "+keyctl\n-frobnicate\n"})
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_CONFIG
    assert "seccomp:2" in p.stderr and "frobnicate" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    assert vs.state("g1") is None
    c = vs("check", "g1", check=False)
    assert c.returncode == EXIT_CONFIG and "frobnicate" in c.stdout + c.stderr


def test_a_debian_guest_works_under_the_filter(vs, host):
    if not (CORPUS / "bookworm-minbase/.complete").exists():
        pytest.skip(f"no {CORPUS}/bookworm-minbase (bench/corpus.sh builds it)")
    debian_guest(host, "deb")
    vs("start", "deb")
    assert vs.exec("deb", "apt-get", "--version").startswith("apt ")
    assert "Seccomp:\t2" in vs.exec("deb", "cat", "/proc/self/status")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the i386 ABI is x86_64's")
def test_32_bit_calls_get_the_same_answer(vs, host, probe):
    _guest(vs, "g1", probe)
    vs("start", "g1")
    got = _errnos(vs.exec("g1", "/bin/probe", "getppid32", "keyctl32"))
    if got["getppid32"] == ENOSYS:
        pytest.skip("this kernel runs no i386 code (IA32_EMULATION off)")
    assert got == {"getppid32": 0, "keyctl32": EPERM}  # refused, not killed


def _run_helper(path: Path, args: list[str], prog: int) -> tuple[int, bytes, bytes]:
    r, w = os.pipe()

    def place() -> None:
        os.dup2(w, 3)
        os.dup2(prog, 4)

    p = subprocess.run(
        [str(path), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        close_fds=False,
        timeout=10,
        preexec_fn=place,
    )
    os.close(w)
    why = os.read(r, 100)
    os.close(r)
    return p.returncode, p.stdout, why


def test_the_helper_installs_the_program_it_is_given_and_refuses_a_bad_one(host, tmp_path):
    path = helper.binary(host.base / "state")
    cmd = ["exec", "--errfd", "3", "--last-cap", "40", "--seccomp", "4", "--"]
    fd = seccomp.program_fd(seccomp.Policy.default())
    try:
        code, out, why = _run_helper(
            path, [*cmd, "/bin/grep", "^Seccomp:", "/proc/self/status"], fd
        )
    finally:
        os.close(fd)
    assert (code, why) == (0, b"") and out.split() == [b"Seccomp:", b"2"]
    for bad in (b"", b"1234567", b"\0" * (8 * 4097)):  # empty, torn, too long
        mfd = os.memfd_create("bad")
        os.write(mfd, bad)
        try:
            code, _, why = _run_helper(path, [*cmd, "/bin/true"], mfd)
        finally:
            os.close(mfd)
        assert (code, why) == (127, b"vsguest:seccomp:22\n"), bad[:8]
    with pytest.raises(ValueError, match="syscall filter"):
        helper.argv("exec", None, ["/bin/true"], seccomp=None)
