"""vsguest, the one static helper that takes every process into a guest its last steps.

Once a process's root or mount namespace is a guest's, nothing may load or resolve a path
there with host privileges: a Python would import the guest's ``termios.py``, a dynamically
linked program would load the guest's ld.so.  So Python does what needs host paths first
(cgroup, run state, namespace and root descriptors, the pty), and then executes
``data/vsguest.c`` by descriptor: it joins the namespaces, chroots (or finishes a
pivot_root), forks into the guest's pid namespace, and cuts session, terminal, limits,
descriptors and capabilities before it executes the guest's command; its waiting half keeps
neither capabilities nor descriptors.  It also is the pid 1 of sysv/none guests (the
reaper: a few pages instead of a forked Python's 11 MiB).

The program is freestanding (no C library: nothing runs in it that is not in the source),
compiled once with ``gcc -static -nostdlib`` into ``STATEDIR/libexec`` and checked to have
no ELF interpreter; every use executes a sealed memfd copy of it, so no process in a guest
can reach our file through ``/proc/PID/exe`` (runc's CVE-2019-5736).
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import NoReturn

from vsstore.errors import UnsupportedError
from vsstore.safetree import GuestTree
from vsstore.syscalls import seal_memfd

from . import ns
from .guestconf import GuestConfig

SOURCE = Path(__file__).parent / "data" / "vsguest.c"
CFLAGS = [
    "-static",
    "-nostdlib",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-stack-protector",
    "-fno-pie",
    "-no-pie",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-Os",
    "-s",
    "-Wall",
    "-Wextra",
]
ERRFD = 3  # where the forked Python puts the error pipe before executing the helper

_MFD_EXEC = 0x0010  # linux 6.3: an executable memfd (without it newer kernels warn)
_EM = {"x86_64": 62, "aarch64": 183}
PT_INTERP = 3


def binary(statedir: Path) -> Path:
    """The compiled helper (built on first use into ``statedir/libexec``)."""
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:12]
    path = statedir / "libexec" / f"vsguest-{tag}"
    if path.exists():
        return path
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise UnsupportedError(
            "no C compiler to build vsstore's guest helper (vsguest), "
            "which start, exec and enter need: apt-get install gcc "
            "libc6-dev (scripts/setup installs them)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with tempfile.TemporaryDirectory(dir=path.parent) as d:
        src, out = Path(d) / "vsguest.c", Path(d) / "vsguest"
        src.write_bytes(source)
        p = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True)
        if p.returncode != 0:
            raise UnsupportedError(
                f"cannot build vsstore's guest helper with {cc} "
                f"({p.stderr.strip()[-300:]}); apt-get install gcc "
                f"libc6-dev (scripts/setup installs them)"
            )
        check_static(out.read_bytes(), str(out))
        os.chmod(out, 0o500)
        os.replace(out, path)
    return path


def check_static(image: bytes, what: str) -> None:
    """Refuse anything but an ELF executable for this machine without an interpreter: a
    dynamically linked helper would load ld.so, and libraries, from the guest's tree."""

    def bad(why: str) -> UnsupportedError:
        return UnsupportedError(
            f"{what}: not a usable guest helper ({why}); remove it to have it rebuilt"
        )

    if len(image) < 64 or image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise bad("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", image, 16)
    if e_machine != _EM.get(platform.machine()):
        raise bad(f"built for machine {e_machine}")
    (phoff,) = struct.unpack_from("<Q", image, 32)
    phentsize, phnum = struct.unpack_from("<HH", image, 54)
    if phentsize < 56 or phoff + phnum * phentsize > len(image):
        raise bad("truncated program headers")
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", image, phoff + i * phentsize)
        if p_type == PT_INTERP:
            raise bad("it names an ELF interpreter: dynamically linked")
    if e_type != 2:  # ET_EXEC, as -static -no-pie makes it
        raise bad(f"ELF type {e_type}, not a static executable")


def load(path: str | os.PathLike[str], owner: tuple[int, int] | None = None) -> int:
    """A sealed, close-on-exec memfd holding the helper, checked; execute it with
    ``os.execve(fd, argv, env)``.  Call before anything of the guest is in reach.
    ``owner``: the host ids it belongs to (a guest root in a user namespace executes it;
    to host root's own file it has no rights)."""
    with open(path, "rb") as f:
        image = f.read()
    check_static(image, str(path))
    try:
        try:
            fd = os.memfd_create("vsguest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | _MFD_EXEC)
        except OSError as e:
            if e.errno != errno.EINVAL:  # a kernel before 6.3 does not know MFD_EXEC
                raise
            fd = os.memfd_create("vsguest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise UnsupportedError(
            f"cannot make an executable memfd for the guest helper "
            f"({e.strerror}); is vm.memfd_noexec 2? It must be 0 or 1 "
            f"here"
        ) from None
    try:
        view = memoryview(image)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o500)
        if owner is not None:
            os.fchown(fd, *owner)
        seal_memfd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _limit(v: int) -> str:
    return "inf" if v < 0 or v >= 2**64 - 1 else str(v)  # RLIM_INFINITY is -1 in Python


def argv(
    mode: str,
    cfg: GuestConfig | None,
    command: list[str],
    *,
    setns: tuple[int, ...] = (),
    root: int | None = None,
    detach: bool = False,
    ctty: int | None = None,
    ids: tuple[int, int, tuple[int, ...]] | None = None,
    seccomp: int | None,
) -> list[str]:
    """The helper's command line: MODE (exec, init, sysv, none), its steps, and for a
    command the guest's limits and capabilities from ``cfg`` (None: keep none); ``ids``:
    the command's uid, gid and supplementary groups (suexec; exec mode only); ``seccomp``:
    a descriptor of the command's syscall filter (lifecycle.seccomp.program_fd): required,
    so that nothing of a guest runs unfiltered (None only for mode none: no command)."""
    if seccomp is None and mode != "none":
        raise ValueError("a guest's command needs its syscall filter")
    a = ["vsguest", mode, "--errfd", str(ERRFD), "--last-cap", str(ns.last_cap())]
    for fd in setns:
        a += ["--setns", str(fd)]
    if root is not None:
        a += ["--root", str(root)]
    if detach:
        a.append("--detach-old-root")
    if ctty is not None:
        a += ["--ctty", str(ctty)]
    if seccomp is not None:
        a += ["--seccomp", str(seccomp)]
    if ids is not None:
        a += ["--uid", str(ids[0]), "--gid", str(ids[1])]
        if ids[2]:
            a += ["--groups", ",".join(str(g) for g in ids[2])]
    if cfg is not None:
        a += ["--caps", f"{sum(1 << c for c in cfg.keep_caps):x}"]
        for res, (soft, hard) in sorted(cfg.rlimits.items()):
            a += ["--rlimit", f"{res}:{_limit(soft)}:{_limit(hard)}"]
        if cfg.nice is not None:
            a += ["--nice", str(cfg.nice)]
    if mode != "none":
        a += ["--", *command]
    return a


STEPS = {
    "args": "bad helper arguments (a bug)",
    "setns": "joining its namespaces",
    "root": "changing to its root",
    "detach": "detaching the host's root",
    "fork": "forking into it",
    "setsid": "starting a session",
    "ctty": "taking the terminal",
    "rlimit": "setting rlimits",
    "nice": "setting nice",
    "close": "closing descriptors",
    "caps": "cutting capabilities",
    "ids": "setting the user and groups",
    "seccomp": "installing the syscall filter",
    "waiter": "securing the waiting process",
}


def failure(raw: bytes) -> tuple[str, str] | None:
    """What the error pipe said: None (the command runs), else (step, why): step "exec"
    when the command itself could not be executed (why: the system's message), "enter"
    for anything before (why: the step and the system's message; or the forked Python's
    own text, from before the helper ran)."""
    if not raw:
        return None
    text = raw.decode(errors="replace").strip()
    parts = (text.splitlines() or [""])[0].split(":")
    if len(parts) == 3 and parts[0] == "vsguest" and parts[2].isdigit():
        err = os.strerror(int(parts[2]))
        if parts[1] == "exec":
            return "exec", err
        return "enter", f"{STEPS.get(parts[1], parts[1])}: {err}"
    return "enter", text


NOT_FOUND = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)


def exec_code(raw: bytes) -> int | None:
    """The shell's exit code for a command that could not be executed, from what the
    error pipe said: 127 not found, 126 found but not executable (EACCES, ENOEXEC, ...);
    None when the failure was not the command's exec."""
    parts = (raw.decode(errors="replace").strip().splitlines() or [""])[0].split(":")
    if len(parts) != 3 or parts[:2] != ["vsguest", "exec"] or not parts[2].isdigit():
        return None
    return 127 if int(parts[2]) in NOT_FOUND else 126


def seal_python() -> None:  # pragma: no cover - in a forked child
    """Defence in depth for a forked Python whose next steps are pivot_root and executing
    the helper: from here on it can import nothing, not even a module loaded already (no
    finder, no path, ``__import__`` refuses), so a lazy import on some error path fails
    instead of loading a file from the guest's tree with our privileges."""

    def refuse(name: str, *args: object, **kwargs: object) -> types.ModuleType:
        raise ImportError(f"no import once a guest's root is ours ({name})")

    sys.meta_path.clear()
    sys.path_hooks.clear()
    sys.path.clear()
    sys.path_importer_cache.clear()
    builtins.__import__ = refuse


# -- executing it ---------------------------------------------------------------------

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def place_fds(
    helper: int,
    std: dict[int, int],
    err: int,
    keep: tuple[int, ...] = (),
) -> tuple[int, list[int]]:  # pragma: no cover - child
    """In a forked child about to execute the helper: ``std`` (target -> source) onto
    0-2, the error pipe ``err`` onto ERRFD, ``keep`` inheritable; returns the new
    numbers of ``helper`` (still close-on-exec) and of ``keep`` (all above 9).  Every other
    descriptor stays close-on-exec or is the caller's stdio; the helper closes all but 0-2
    and the error pipe before the command runs."""
    helper = fcntl.fcntl(helper, fcntl.F_DUPFD_CLOEXEC, 10)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in keep]
    src = {t: fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, 10) for t, s in std.items()}
    e = fcntl.fcntl(err, fcntl.F_DUPFD_CLOEXEC, 10)
    for t, s in src.items():
        os.dup2(s, t)
    os.dup2(e, ERRFD)
    for fd in moved:
        os.set_inheritable(fd, True)
    return helper, moved


def pivot_and_exec(
    tree: GuestTree, helper: int, args: list[str], env: dict[str, str]
) -> NoReturn:  # pragma: no cover - child
    """pivot_root into the tree and execute the helper by descriptor.  After the pivot this
    process's root is the guest's, so Python does nothing else, and could not import
    anything if it tried (helper.seal_python); the helper detaches the old root."""
    os.fchdir(tree.fd)
    tree.close()
    seal_python()
    ns.pivot_root(".", ".")
    os.execve(helper, args, env)
    raise AssertionError("execve returned")
