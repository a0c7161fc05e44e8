"""What vsstore does with each entry of a guest's configuration directory, util-vserver's
entries included: ``vserver NAME check`` lists them, ``start`` names what it ignores.

A configuration taken from a util-vserver host holds entries that only a Linux-VServer
kernel understood (context capabilities, token-bucket scheduler, disk limits, ...).  They
are not errors, since the guest runs without them, but they are never passed over in
silence either: each is named with the reason.  The walk reads names only (no file is
followed out of the directory: symlinks other than ``vdir`` are listed, not entered)."""

from __future__ import annotations

import enum
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path

from vsstore.config import Guest
from vsstore.errors import EXIT_OK, VsError
from vsstore.names import shown

from . import cgroups, guestconf


class Use(enum.Enum):
    USED = "used"
    IGNORED = "ignored"
    REFUSED = "refused"  # start refuses the configuration for it (check says why)


@dataclass(frozen=True, slots=True)
class Entry:
    path: str  # relative to the configuration directory
    use: Use
    why: str


KERNEL = "a Linux-VServer kernel feature; a mainline kernel has no such thing"

# (pattern over the relative path, use, what is done with it or why not).  The first
# pattern that matches decides; directories are described by their files.
CATALOGUE: list[tuple[str, Use, str]] = [
    ("vdir", Use.USED, "the guest's root tree"),
    ("context", Use.USED, "the guest's number (vserver-stat, names of its host-side veths)"),
    ("name", Use.IGNORED, "vsstore names a guest by its configuration directory"),
    ("uts/nodename", Use.USED, "the host name in the guest's UTS namespace"),
    ("uts/domainname", Use.USED, "the (NIS) domain name in the guest's UTS namespace"),
    (
        "uts/*",
        Use.IGNORED,
        "a mainline kernel reports its own sysname, release, version and machine "
        "to every namespace (only nodename and domainname are per namespace)",
    ),
    ("fstab", Use.USED, "mounted inside the guest at start (targets resolved inside it)"),
    (
        "fstab.remote",
        Use.IGNORED,
        "mounts in the guest's network context are not made; move the lines to fstab",
    ),
    ("interfaces/prefix", Use.USED, "the prefix length of every interface without its own"),
    ("interfaces/mask", Use.USED, "the netmask of every interface without a prefix"),
    ("interfaces/bcast", Use.USED, "the broadcast address of every interface without its own"),
    (
        "interfaces/dev",
        Use.USED,
        "the guest's interface name for every address without its own dev (the host "
        "routes the addresses to a veth pair; none is added to a host device)",
    ),
    ("interfaces/*/ip", Use.USED, "an address of the guest (a veth pair, routed by the host)"),
    ("interfaces/*/prefix", Use.USED, "its prefix length"),
    ("interfaces/*/mask", Use.USED, "its netmask"),
    ("interfaces/*/bcast", Use.USED, "its broadcast address"),
    ("interfaces/*/hostip", Use.USED, "the host side's address (then the guest's default route)"),
    (
        "interfaces/*/dev",
        Use.USED,
        "the name of the guest's interface carrying the address (what the guest saw "
        "under util-vserver); no address is added to the host's device of that name",
    ),
    (
        "interfaces/*/name",
        Use.USED,
        "the guest's interface name (with a dev: util-vserver's address label, unused)",
    ),
    (
        "interfaces/*/nodev",
        Use.USED,
        "accepted: vsstore never puts a guest's address on a host device",
    ),
    ("interfaces/*/disabled", Use.USED, "this address is left out"),
    (
        "interfaces/*",
        Use.IGNORED,
        "not made: util-vserver's vlan devices, scopes and tun/tap devices",
    ),
    ("bcapabilities", Use.USED, "capabilities kept (CAP_X) or dropped (!CAP_X)"),
    ("seccomp", Use.USED, "changes to the default syscall filter: +NAME allows, -NAME refuses"),
    (
        "userns/uid",
        Use.USED,
        "the host uids of the guest's user namespace (START COUNT, or auto)",
    ),
    (
        "userns/gid",
        Use.USED,
        "the host gids of the guest's user namespace (START COUNT, or auto)",
    ),
    ("capabilities", Use.IGNORED, "the 2.4 kernels' file; bcapabilities is read"),
    ("ccapabilities", Use.IGNORED, "context capabilities: " + KERNEL),
    ("ncapabilities", Use.IGNORED, "network context capabilities: " + KERNEL),
    ("cflags", Use.IGNORED, "context flags: " + KERNEL),
    ("flags", Use.IGNORED, "context flags (old name): " + KERNEL),
    ("nflags", Use.IGNORED, "network context flags: " + KERNEL),
    ("umask", Use.IGNORED, "the guest's unshare mask: vsstore always unshares every namespace"),
    ("personality", Use.IGNORED, "personality flags are not set"),
    ("badness", Use.IGNORED, "the OOM bias is not set"),
    ("ncontext", Use.IGNORED, "network context id: " + KERNEL),
    ("tag", Use.IGNORED, "disk tagging: " + KERNEL),
    ("apps/init/style", Use.USED, "how the guest's init runs (systemd, plain, sysv, none)"),
    (
        "apps/init/ttys",
        Use.USED,
        "how many /dev/ttyN ptys the guest gets (vserver NAME console --tty N)",
    ),
    ("apps/init/cmd.start", Use.USED, "the start command"),
    ("apps/init/cmd.stop", Use.USED, "the stop command"),
    ("apps/init/cmd.prepare", Use.IGNORED, "not run; put it in cmd.start"),
    ("apps/init/stop-signal", Use.USED, "what stop sends to init"),
    ("apps/init/stop-timeout", Use.USED, "how long stop waits before killing"),
    (
        "apps/init/killseq",
        Use.USED,
        "its first signal and wait are stop's signal and timeout (a systemd guest keeps "
        "SIGRTMIN+3); then everything left is killed with SIGKILL",
    ),
    ("apps/init/runlevel", Use.USED, "the sysv start runlevel"),
    ("apps/init/runlevel.start", Use.USED, "the sysv start runlevel"),
    ("apps/init/runlevel.stop", Use.USED, "the sysv stop runlevel"),
    ("apps/init/mark", Use.USED, "the guest's mark (vserver-start --mark, the fleet commands)"),
    ("apps/init/depends", Use.USED, "guests started before this one (vserver-start)"),
    ("apps/init/*", Use.IGNORED, "not an init setting vsstore knows"),
    ("apps/vunify/exclude", Use.USED, "vsunify's exclude rules for this guest"),
    ("apps/vunify/*", Use.IGNORED, "vsunify's store is $VSERVERS_ROOT/.hash"),
    ("apps/vshelper/*", Use.IGNORED, "reboot from inside the guest is not supported"),
    (
        "apps/pkgmgmt/*",
        Use.IGNORED,
        "vapt-get and vrpm run the guest's own tools, through the overlay",
    ),
    ("apps/*", Use.IGNORED, "util-vserver's helper programs are not used"),
    ("scripts/*", Use.USED, "hooks run on the host at start and stop"),
    ("cow", Use.USED, "the guest runs through the copy-on-write overlay"),
    ("spaces/hostnet", Use.USED, "the guest shares the host's network namespace"),
    (
        "spaces/*",
        Use.IGNORED,
        "vsstore gives every guest its own mount, pid, uts, ipc and network namespaces",
    ),
    ("namespace*", Use.IGNORED, "vsstore always uses namespaces"),
    ("nonamespace*", Use.IGNORED, "vsstore always uses namespaces"),
    ("rlimits/*.min", Use.IGNORED, "a guaranteed minimum: " + KERNEL),
    ("nice", Use.USED, "the nice level of the guest's processes"),
    ("cgroup/name", Use.IGNORED, "vsstore names the guest's cgroup after the guest"),
    ("sched/*", Use.IGNORED, "the token-bucket scheduler: " + KERNEL + "; use cgroup/cpu.max"),
    ("schedule", Use.IGNORED, "the token-bucket scheduler: " + KERNEL + "; use cgroup/cpu.max"),
    ("dlimits/*", Use.IGNORED, "disk limits per context: " + KERNEL),
    ("ulimits/*", Use.IGNORED, "use rlimits/"),
    ("cpuset/*", Use.IGNORED, "use cgroup/ (cpuset is not set)"),
    ("shell", Use.USED, "the shell 'vserver NAME enter' starts"),
    ("run", Use.IGNORED, "util-vserver's run-time link; vsstore keeps run state in VSSTORE_RUNDIR"),
    ("run.rev", Use.IGNORED, "util-vserver's run-time link (2.4 kernels)"),
    ("cache", Use.IGNORED, "util-vserver's cache directory"),
    ("vhi/*", Use.IGNORED, "the Linux-VServer virtual host information is not set"),
]


def _rlimit(rel: str) -> tuple[Use, str] | None:
    name = rel.removeprefix("rlimits/")
    base, _, kind = name.partition(".")
    if kind == "min":
        return None
    if kind not in ("", "soft", "hard"):
        return Use.REFUSED, f"write {base}, {base}.soft or {base}.hard"
    if base in guestconf.VSERVER_RLIMITS:
        return Use.IGNORED, f"the {base} limit: " + KERNEL
    if base not in guestconf.RLIMITS:
        return Use.REFUSED, "not a resource limit; use one of " + ", ".join(
            sorted(guestconf.RLIMITS)
        )
    return Use.USED, f"the {base} resource limit ({kind or 'soft and hard'})"


def _cgroup(rel: str) -> tuple[Use, str] | None:
    name = rel.removeprefix("cgroup/")
    if name in cgroups.V2_SETTINGS or name in cgroups.V1_NAMES:
        return Use.USED, "a cgroup limit (translated to the host's cgroup version)"
    if name == "parent" or name == "name":
        return None
    return Use.REFUSED, (
        "not a cgroup setting vsstore can apply; use one of "
        + ", ".join([*cgroups.V2_SETTINGS, *cgroups.V1_NAMES])
    )


def describe(rel: str) -> tuple[Use, str]:
    """What is done with the entry at ``rel`` (relative to a configuration directory)."""
    r = None
    if rel.startswith("rlimits/"):
        r = _rlimit(rel)
    elif rel.startswith("cgroup/"):
        r = _cgroup(rel)
    if r is not None:
        return r
    for pattern, use, why in CATALOGUE:
        if fnmatch.fnmatchcase(rel, pattern):
            return use, why
    return Use.IGNORED, "not a setting vsstore knows"


def _walk(confdir: Path, limit: int = 10000) -> list[str]:
    """The entries below ``confdir`` (files, symlinks and empty directories), relative,
    sorted; symlinks are never followed."""
    out: list[str] = []
    for dirpath, dirs, files in os.walk(confdir, followlinks=False):
        rel = os.path.relpath(dirpath, confdir)
        rel = "" if rel == "." else rel + "/"
        for d in list(dirs):
            if os.path.islink(os.path.join(dirpath, d)):
                files.append(d)
                dirs.remove(d)
        if not files and not dirs and rel:
            out.append(rel.rstrip("/"))
        out.extend(rel + f for f in files)
        if len(out) > limit:
            break
    return sorted(out[:limit])


def _fstab_lines(fstab: Path) -> list[Entry]:
    """The fstab lines start leaves out (what it mounts itself), as ``fstab:LINE``."""
    try:
        text = fstab.read_text(errors="replace")
    except OSError:
        return []
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if len(parts) >= 3 and not parts[0].startswith("#"):
            why = guestconf.own_mount(parts[1])
            if why is not None:
                out.append(Entry(f"fstab:{i}", Use.IGNORED, f"{parts[1]}: {why}"))
    return out


def entries(guest: Guest) -> list[Entry]:
    """Every entry of the guest's configuration directory and what is done with it (an
    fstab line start leaves out is an entry of its own)."""
    if guest.confdir is None:
        return []
    out = []
    for rel in _walk(guest.confdir):
        use, why = describe(rel)
        if rel == "vdir":
            why = f"{why}: {shown(str(guest.root))}"
        out.append(Entry(rel, use, why))
        if rel == "fstab":
            out.extend(_fstab_lines(guest.confdir / rel))
    return out


def ignored(guest: Guest) -> list[Entry]:
    return [e for e in entries(guest) if e.use is Use.IGNORED]


@dataclass(frozen=True, slots=True)
class Check:
    entries: list[Entry]
    error: VsError | None  # why the guest cannot start (None: it can)

    @property
    def code(self) -> int:
        return self.error.exit_code if self.error is not None else EXIT_OK


def check(guest: Guest) -> Check:
    """The entries, and whether the configuration lets the guest start (what ``start``
    reads first: a bad entry is its error)."""
    err: VsError | None = None
    try:
        guestconf.load(guest)
    except VsError as e:
        err = e
    return Check(entries(guest), err)
