"""The default syscall filter of every guest process, and a guest's changes to it.

Modelled on the published defaults of Docker (moby's ``default.json``) and systemd-nspawn
(``nspawn-seccomp.c``), as a list of refusals rather than their allow lists: a guest is a
whole distribution and its root, and what it may not do is what reaches outside it or opens
kernel surface a container never needs.  Each refusal answers EPERM (what the kernel says
to a guest lacking the capability anyway, so programs that cope with a container cope with
this), never a kill; ``clone3`` answers ENOSYS, as Docker's does, because its flags lie in
memory a filter cannot read and the C library then falls back to ``clone``, whose flags it
can.

``/etc/vservers/NAME/seccomp``, one name a line (``#`` comments), in ``bcapabilities``'
spirit: ``NAME`` or ``+NAME`` lets the guest have the syscall (every rule on it is removed),
``-NAME`` or ``!NAME`` refuses it too.  Names are checked with libseccomp; an unknown one is
an error naming the file, before anything starts.

The host side builds the filter (libseccomp through ``pyseccomp``, ctypes over the host's
libseccomp2) for the native architecture and its 32-bit companions (so a 32-bit syscall
gets the same answer), exports the BPF program into a sealed memfd and hands it to the
static helper (``--seccomp FD``), which installs it just before it cuts the capabilities:
without no_new_privs (setuid programs in guests keep working: sudo, su, passwd), which the
kernel allows because the helper still holds CAP_SYS_ADMIN at that moment.  Nothing of
ours runs under the filter but the helper's last steps, and nothing of the guest runs
without it.
"""

from __future__ import annotations

import errno
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from vsstore.errors import ConfigError, UnsupportedError
from vsstore.syscalls import seal_memfd

CLONE_NEWUSER = 0x10000000

# What a guest is refused, by group, with why.  Names unknown to this architecture (ioperm
# on aarch64, ...) are skipped where the filter is built.
DEFAULT_REFUSED: dict[str, tuple[str, ...]] = {
    # the kernel's keyrings are not namespaced: a guest would see and fill the host's
    "keyring": ("add_key", "keyctl", "request_key"),
    # kernel surface a container never needs, and the source of many escapes
    "bpf": ("bpf",),
    "perf": ("perf_event_open",),
    "userfaultfd": ("userfaultfd",),
    # modules, kexec, reboot (a guest lacks CAP_SYS_MODULE and CAP_SYS_BOOT: same EPERM)
    "module": (
        "init_module",
        "finit_module",
        "delete_module",
        "create_module",
        "query_module",
        "get_kernel_syms",
    ),
    "kexec": ("kexec_load", "kexec_file_load"),
    "reboot": ("reboot",),
    # open_by_handle_at walks any inode of a filesystem, past the guest's root (shocker);
    # name_to_handle_at stays (systemd asks it for mount ids; a handle alone opens nothing)
    "handle": ("open_by_handle_at",),
    # mounts are the host's business, unless the guest has a user namespace of its own
    # (lifecycle.userns): then its mounts are its namespace's (read(in_userns=True))
    "mount": (
        "mount",
        "umount",
        "umount2",
        "pivot_root",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
    ),
    "swap": ("swapon", "swapoff"),
    "rawio": ("iopl", "ioperm"),
    "acct": ("acct",),
    "quota": ("quotactl", "quotactl_fd"),
    # setting the clock; adjtimex and clock_adjtime stay, as in Docker's profile since
    # moby#33403 and #40929: with no mode they read, and CAP_SYS_TIME guards the rest
    "clock": ("settimeofday", "clock_settime", "clock_settime64", "stime"),
    # obsolete, refused by Docker's profile too
    "obsolete": ("uselib", "_sysctl", "nfsservctl", "lookup_dcookie", "ustat", "sysfs"),
}
# unshare(2) and clone(2) with CLONE_NEWUSER: a user namespace would give the guest's
# processes CAP_SYS_ADMIN over new mount, network... namespaces of their own, the kernel
# surface of most recent container escapes.  clone3: ENOSYS (the C library falls back).
NEWUSER = ("unshare", "clone")
ENOSYS = ("clone3",)

# What the helper calls after it installed the filter: a guest cannot have them refused
# (it would never start; say so instead).
HELPER_NEEDS = frozenset(
    {
        "prctl",
        "capget",
        "capset",
        "setgroups",
        "setresuid",
        "setresgid",
        "rt_sigaction",
        "rt_sigprocmask",
        "execve",
        "write",
        "exit_group",
    }
)


def default_refused() -> frozenset[str]:
    names = {n for group in DEFAULT_REFUSED.values() for n in group}
    return frozenset(names | set(NEWUSER) | set(ENOSYS))


@dataclass(frozen=True, slots=True)
class Policy:
    """What a guest's processes are refused: syscall names, every rule on each (EPERM;
    NEWUSER's only with CLONE_NEWUSER, ENOSYS's with ENOSYS)."""

    refused: frozenset[str]

    @classmethod
    def default(cls) -> Policy:
        return cls(default_refused())

    def changes(self) -> list[str]:
        """This policy as ``+NAME``/``-NAME`` lines against the default (the run state)."""
        d = default_refused()
        return sorted(f"+{n}" for n in d - self.refused) + sorted(f"-{n}" for n in self.refused - d)

    @classmethod
    def from_changes(cls, lines: list[str] | None) -> Policy:
        refused = set(default_refused())
        for line in lines or []:
            (refused.discard if line[0] == "+" else refused.add)(line[1:])
        return cls(frozenset(refused))


def _lib() -> ModuleType:
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as e:
        raise UnsupportedError(
            f"cannot use libseccomp ({e}), which every guest's syscall filter needs: "
            f"apt-get install libseccomp2 (and pip install pyseccomp)"
        ) from None
    return pyseccomp


def known(name: str) -> bool:
    """libseccomp knows the syscall (on some architecture)."""
    lib = _lib()
    return bool(lib.resolve_syscall(lib.Arch.NATIVE, name) != -1)


def read(p: Path, text: str | None, in_userns: bool = False) -> Policy:
    """The policy of a guest whose ``seccomp`` file ``p`` holds ``text`` (None: absent);
    ``in_userns``: the guest has a user namespace of its own, whose root may mount in its
    own mount namespace (if granted CAP_SYS_ADMIN), as with systemd-nspawn -U."""
    refused = set(default_refused())
    if in_userns:
        refused -= set(DEFAULT_REFUSED["mount"])
    for n, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        refuse = line[0] in "-!"
        name = line[1:].strip() if line[0] in "+-!" else line
        if not name.replace("_", "").isalnum() or not known(name):
            raise ConfigError(
                f"{p}:{n}: unknown system call {name!r}; write +NAME (allow) or -NAME "
                f"(refuse) with names as in syscalls(2)"
            )
        if refuse and name in HELPER_NEEDS:
            raise ConfigError(
                f"{p}:{n}: {name} cannot be refused: the guest could not be entered without it"
            )
        (refused.add if refuse else refused.discard)(name)
    return Policy(frozenset(refused))


_COMPANIONS = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",)}


def _filter(policy: Policy) -> Any:
    """libseccomp's filter for the policy, on this machine's architectures."""
    lib = _lib()
    f = lib.SyscallFilter(lib.ALLOW)
    for arch in _COMPANIONS.get(platform.machine(), ()):
        try:
            f.add_arch(getattr(lib.Arch, arch))
        except OSError:
            pass  # already there, or unknown to this libseccomp
    eperm = lib.ERRNO(errno.EPERM)
    for name in sorted(policy.refused):
        if lib.resolve_syscall(lib.Arch.NATIVE, name) == -1:
            continue
        if name in NEWUSER:
            f.add_rule(eperm, name, lib.Arg(0, lib.MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER))
        elif name in ENOSYS:
            f.add_rule(lib.ERRNO(errno.ENOSYS), name)
        else:
            f.add_rule(eperm, name)
    return f


class _Fd:
    """What libseccomp's export asks of a file: its descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


def program_fd(policy: Policy) -> int:
    """A sealed, close-on-exec memfd holding the policy's BPF program (struct
    sock_filter[], as ``seccomp_export_bpf`` writes it), for the helper's ``--seccomp``."""
    f = _filter(policy)
    fd = os.memfd_create("vsseccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        f.export_bpf(_Fd(fd))
        size = os.fstat(fd).st_size
        if not size or size % 8 or size > 4096 * 8:
            raise UnsupportedError(f"libseccomp made a filter of {size} bytes; cannot use it")
        seal_memfd(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def build(policy: Policy) -> bytes:
    """The policy's BPF program (what ``program_fd`` holds)."""
    fd = program_fd(policy)
    try:
        return os.pread(fd, 4096 * 8 + 1, 0)
    finally:
        os.close(fd)
