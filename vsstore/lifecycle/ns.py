"""Namespaces, mounts and capability names: the system calls a guest's start needs (ctypes
where Python 3.11's ``os`` lacks them; ``os.*`` where it has them).  Capabilities are cut
by the static helper (lifecycle.helper), never by Python inside a guest."""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

from vsstore.syscalls import _check, _libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 0x2

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36

SYS_pivot_root = 155  # x86_64
SYS_setns = 308

# linux/capability.h, in order (the index is the capability's number).
CAPS = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
]

if os.uname().machine == "aarch64":
    SYS_pivot_root, SYS_setns = 41, 268


def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):
        os.unshare(flags)
    else:
        _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
    else:
        _check(_libc.syscall(SYS_setns, ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    def b(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(
        _libc.mount(b(source), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
        "mount",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(SYS_pivot_root, os.fsencode(new_root), os.fsencode(put_old)),
        "pivot_root",
        new_root,
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "prctl",
    )


def last_cap() -> int:
    """The kernel's highest capability number (the host's /proc; never a guest's).  No
    guess when it cannot be read: a capability the guess missed would stay with the guest."""
    with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
        return int(f.read())


def cap_number(name: str) -> int:
    """CAP_SYS_ADMIN, SYS_ADMIN, sys_admin -> 21; ValueError for unknown names."""
    n = name.strip().upper()
    n = n[4:] if n.startswith("CAP_") else n
    return CAPS.index(n)


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = "16sh22x"  # struct ifreq: the name, then ifr_flags (40 bytes on 64-bit kernels)


def link_up(name: str) -> None:
    """Bring network interface ``name`` of this process's network namespace up (an
    ioctl: no ``ip`` or netlink needed; a new namespace's ``lo`` then gets 127.0.0.1 and
    ::1 from the kernel)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        req = struct.pack(_IFREQ, name.encode(), 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | IFF_UP))


def set_uts(nodename: str, domainname: str | None = None) -> None:
    """The host and (NIS) domain name of this process's UTS namespace (util-vserver's
    ``uts/nodename`` and ``uts/domainname``)."""
    socket.sethostname(nodename)
    if domainname is not None:
        raw = domainname.encode()
        _check(_libc.setdomainname(raw, ctypes.c_size_t(len(raw))), "setdomainname")
