"""A guest's run-time configuration in util-vserver's layout, read and checked up front.

``/etc/vservers/NAME/``: ``context`` (a number), ``uts/nodename``, ``uts/domainname``,
``fstab`` (fstab(5) lines; targets are paths inside the guest), ``interfaces/N/{ip,prefix|
mask,bcast,dev,name,hostip,nodev,disabled}`` (``interfaces/{dev,prefix,mask,bcast}``: the
defaults), ``bcapabilities`` (one capability per line: ``CAP_X`` keeps one the default set
drops, ``!CAP_X`` drops one more), ``apps/init/style`` (``systemd``, ``plain``, ``sysv`` or
``none``),
``apps/init/cmd.start`` / ``cmd.stop`` (one argument per line), ``apps/init/stop-signal``,
``apps/init/stop-timeout`` (or util-vserver's ``apps/init/killseq``: SIGNAL [WAIT
SIGNAL]...), ``apps/init/runlevel{,.start,.stop}`` (sysv), ``shell`` (what ``enter``
runs), ``cow`` (present: mount the guest through the overlay), ``spaces/hostnet``
(present: the guest shares the host's network namespace; see below), ``seccomp`` (changes
to the default syscall filter: ``+NAME`` allows, ``-NAME`` refuses; lifecycle.seccomp),
``userns/{uid,gid}`` (``START COUNT`` or ``auto``: the guest runs in a user namespace of its
own over an idmapped root; lifecycle.userns).
Everything is read before anything is started, and a bad entry is an error naming its file.
Entries of a util-vserver host that have no meaning here (``rlimits/*.min``, ``cgroup/name``,
``uts/release``, ...) are accepted and left alone; ``vserver NAME check`` (``compat``) lists
each entry and what is done with it.

Network: every guest gets a network namespace of its own, with its loopback up and the
veth pairs of ``interfaces/`` (none: loopback only), so it cannot see the host's
interfaces, open packet sockets on them, reach services bound to the host's 127.0.0.1 or
the host's abstract unix sockets.  ``spaces/hostnet`` (util-vserver's ``nonamespace``
spirit: an explicit per-guest flag file) keeps the host's network instead; it excludes
``interfaces/``, ``start`` warns about it, and such a guest loses CAP_NET_RAW (raw and
packet sockets on the host's interfaces) unless ``bcapabilities`` names it.
"""

from __future__ import annotations

import ipaddress
import resource
import signal
from dataclasses import dataclass, field
from pathlib import Path

from vsstore.config import Guest
from vsstore.errors import ConfigError

from . import ns, userns
from .cgroups import Limits, read_limits
from .seccomp import Policy
from .seccomp import read as read_seccomp

# What a guest may never do by default (util-vserver's reduced set, plus what later
# kernels added): mount, load modules, raw I/O, set the clock, make devices, configure the
# host's network, lift immutable flags (the store's protection), open by handle, reboot...
DEFAULT_DROP = {
    "SYS_ADMIN",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_TIME",
    "MKNOD",
    "NET_ADMIN",
    "LINUX_IMMUTABLE",
    "DAC_READ_SEARCH",
    "SYS_BOOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_TTY_CONFIG",
    "SYS_RESOURCE",
    "SYS_NICE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "BPF",
    "PERFMON",
    "CHECKPOINT_RESTORE",
    "LEASE",
    "IPC_OWNER",
    "NET_BROADCAST",
}

MOUNT_FLAGS = {
    "ro": ns.MS_RDONLY,
    "nosuid": ns.MS_NOSUID,
    "nodev": ns.MS_NODEV,
    "noexec": ns.MS_NOEXEC,
    "bind": ns.MS_BIND,
    "rbind": ns.MS_BIND | ns.MS_REC,
}
IGNORED_OPTIONS = {
    "defaults",
    "rw",
    "auto",
    "noauto",
    "nofail",
    "suid",
    "dev",
    "exec",
    "user",
    "nouser",
    "_netdev",
}


@dataclass(frozen=True, slots=True)
class FstabEntry:
    source: str
    target: str  # inside the guest
    fstype: str
    flags: int
    data: str
    where: str  # "file:line", for messages


@dataclass(frozen=True, slots=True)
class Interface:
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    name: str  # inside the guest; addresses with the same name share one veth pair
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    where: str
    broadcast: ipaddress.IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class GuestConfig:
    guest: Guest
    context: int | None
    nodename: str
    domainname: str | None = None  # uts/domainname
    shell: str = "/bin/sh"  # what 'enter' runs (util-vserver's 'shell' file)
    fstab: list[FstabEntry] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    keep_caps: frozenset[int] = frozenset()
    init: list[str] = field(default_factory=list)
    stop: list[str] | None = None  # a command run inside, else stop_signal to init
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0
    cow: bool = False
    hostnet: bool = False  # spaces/hostnet: the host's network namespace, not its own
    style: str = "plain"  # STYLES: systemd and plain: the start command is pid 1; sysv: it
    # runs under a pid 1 of ours (and may exit); none: that pid 1 alone
    helper: str | None = None  # the static helper that enters (lifecycle.helper), set by start
    ttys: int = 0  # apps/init/ttys: /dev/tty1..N, ptys of the guest's devpts (lifecycle.console)
    rlimits: dict[int, tuple[int, int]] = field(default_factory=dict)  # resource -> soft, hard
    nice: int | None = None
    cgroup: Limits = field(default_factory=Limits)
    cgroup_parent: str | None = None  # beneath which the guest's cgroup is made
    cgroup_dirs: dict[str, str] = field(default_factory=dict)  # the guest's cgroup, by start
    seccomp: Policy = field(default_factory=Policy.default)  # its syscall filter
    wants_userns: bool = False  # userns/ is configured (its ranges are resolved by start)
    userns: userns.IdMap | None = None  # the guest's id ranges, set by start

    @property
    def name(self) -> str:
        return self.guest.name


def _read(p: Path, limit: int = 1 << 16) -> str | None:
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{p}: longer than {limit} bytes; is it the right file?")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None


def _lines(p: Path) -> list[str] | None:
    text = _read(p)
    if text is None:
        return None
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def _number(p: Path, default: float | None, what: str) -> float | None:
    text = _read(p)
    if text is None or not text.strip():
        return default
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{p}: {text.strip()!r} is not a number; write {what}") from None


def parse_mount_options(opts: str, where: str) -> tuple[int, str]:
    flags, data = 0, []
    for o in opts.split(","):
        if o in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[o]
        elif o in IGNORED_OPTIONS or not o:
            continue
        else:
            data.append(o)
    return flags, ",".join(data)


# What start mounts itself (procdev): an fstab line for it (util-vserver's default fstab
# has both) is left out, never mounted over ours (a /proc without the masks, the host's
# devpts instance).  ``vserver NAME check`` names such lines.
OWN_MOUNTS = {
    "/proc": "start mounts /proc itself (with its masks)",
    "/dev/pts": "start mounts a devpts instance of the guest's own",
}


def own_mount(target: str) -> str | None:
    """Why an fstab line for ``target`` is left out (None: it is mounted)."""
    return OWN_MOUNTS.get("/" + target.strip("/"))


def _fstab(p: Path) -> list[FstabEntry]:
    out = []
    text = _read(p)
    for i, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{p}:{i}"
        parts = line.split()
        if len(parts) < 3:
            raise ConfigError(f"{where}: {line!r}: want 'SOURCE TARGET TYPE [OPTIONS]'")
        src, target, fstype = (s.replace("\\040", " ") for s in parts[:3])
        if not target.startswith("/"):
            raise ConfigError(
                f"{where}: target {target!r} must be an absolute path inside the guest"
            )
        if any(c in ("..",) for c in target.split("/")):
            raise ConfigError(f"{where}: target {target!r} must not contain '..'")
        if own_mount(target) is not None:
            continue
        flags, data = parse_mount_options(parts[3] if len(parts) > 3 else "defaults", where)
        if fstype in ("none", "bind") and not flags & ns.MS_BIND:
            flags |= ns.MS_BIND
        out.append(FstabEntry(src, target, fstype, flags, data, where))
    return out


def _interfaces(d: Path) -> list[Interface]:
    """``interfaces/N/`` one address each; ``interfaces/{dev,prefix,mask,bcast}`` are the
    defaults of every N (util-vserver's layout).  ``dev`` (the host device the address
    lived on under util-vserver, and so the name the guest saw it under) names the
    guest's interface, ``name`` does when there is no ``dev`` (with one, it was only an
    address label); several addresses on one name share one veth pair.  ``disabled``
    leaves the entry out; ``nodev`` changes nothing (no address is ever put on a host
    device: the host routes the address to the guest's veth)."""
    if not d.is_dir():
        return []
    default = {k: (_read(d / k) or "").strip() for k in ("prefix", "mask", "bcast", "dev")}
    out: list[Interface] = []
    names: list[str] = []
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        if (sub / "disabled").exists():
            continue
        ip = (_read(sub / "ip") or "").strip()
        if not ip:
            raise ConfigError(f"{sub}/ip: missing; each interface needs its address")

        def get(k: str, sub: Path = sub) -> str:
            return (_read(sub / k) or "").strip() or default[k]

        own = (_read(sub / "prefix") or "").strip() or (_read(sub / "mask") or "").strip()
        length = own or default["prefix"] or default["mask"]
        try:
            addr = ipaddress.ip_interface(f"{ip}/{length or ('24' if ':' not in ip else '64')}")
        except ValueError as e:
            raise ConfigError(
                f"{sub}: {e}; write an address to ip and a prefix length to prefix"
            ) from None
        host_ip = (_read(sub / "hostip") or "").strip()
        try:
            hip = ipaddress.ip_address(host_ip) if host_ip else None
        except ValueError as e:
            raise ConfigError(f"{sub}/hostip: {e}") from None
        bcast = get("bcast")
        try:
            bc = ipaddress.IPv4Address(bcast) if bcast else None
        except ValueError as e:
            raise ConfigError(f"{sub}/bcast: {e}; write an IPv4 broadcast address") from None
        dev = get("dev")
        name = dev or (_read(sub / "name") or "").strip()
        if not name:
            name = next(f"eth{i}" for i in range(len(out) + 1) if f"eth{i}" not in names)
        if len(name) > 15 or "/" in name or " " in name or ":" in name:
            raise ConfigError(
                f"{sub}/{'dev' if dev else 'name'}: {name!r} is not a valid interface name"
            )
        names.append(name)
        out.append(Interface(addr, name, hip, str(sub), bc))
    return out


def default_caps() -> frozenset[int]:
    """The capabilities a guest keeps when its bcapabilities say nothing."""
    return frozenset(i for i, n in enumerate(ns.CAPS) if n not in DEFAULT_DROP)


def _caps(p: Path, hostnet: bool = False) -> frozenset[int]:
    keep = set(default_caps())
    if hostnet:  # no raw or packet sockets on the host's interfaces, unless named below
        keep.discard(ns.cap_number("NET_RAW"))
    for line in _lines(p) or []:
        drop = line[0] in "!~^"
        name = line[1:] if drop else line
        try:
            n = ns.cap_number(name)
        except ValueError:
            raise ConfigError(
                f"{p}: unknown capability {name!r}; use names like "
                f"CAP_NET_ADMIN (see capabilities(7))"
            ) from None
        (keep.discard if drop else keep.add)(n)
    return frozenset(keep)


def _signal(p: Path, default: int | None = None) -> int:
    text = (_read(p) or "").strip()
    if not text:
        return default if default is not None else signal.SIGTERM
    return _signal_name(text, p)


def _signal_name(text: str, p: Path) -> int:
    if text.upper().removeprefix("SIG").startswith("RTMIN+"):  # systemd's SIGRTMIN+3
        n = text.upper().removeprefix("SIG")[len("RTMIN+") :]
        if n.isdigit() and signal.SIGRTMIN + int(n) <= signal.SIGRTMAX:
            return int(signal.SIGRTMIN) + int(n)
    try:
        return (
            int(text)
            if text.isdigit()
            else int(
                signal.Signals[
                    text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
                ]
            )
        )
    except KeyError:
        raise ConfigError(f"{p}: {text!r} is not a signal; write e.g. SIGTERM or SIGPWR") from None


RLIMITS = {
    "as": resource.RLIMIT_AS,
    "core": resource.RLIMIT_CORE,
    "cpu": resource.RLIMIT_CPU,
    "data": resource.RLIMIT_DATA,
    "fsize": resource.RLIMIT_FSIZE,
    "locks": getattr(resource, "RLIMIT_LOCKS", 10),
    "memlock": resource.RLIMIT_MEMLOCK,
    "msgqueue": resource.RLIMIT_MSGQUEUE,
    "nice": resource.RLIMIT_NICE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
    "rss": resource.RLIMIT_RSS,
    "rtprio": resource.RLIMIT_RTPRIO,
    "rttime": resource.RLIMIT_RTTIME,
    "sigpending": resource.RLIMIT_SIGPENDING,
    "stack": resource.RLIMIT_STACK,
}


# Limits only a Linux-VServer kernel has (util-vserver's rlimits/): left alone here.
VSERVER_RLIMITS = {"anon", "dentry", "openfd", "shmem", "semary", "nsems", "nsock"}


def _rlimits(d: Path) -> dict[int, tuple[int, int]]:
    """``rlimits/NAME`` (soft and hard), ``NAME.soft``, ``NAME.hard``: a number or inf."""
    if not d.is_dir():
        return {}
    vals: dict[str, dict[str, int]] = {}
    for f in sorted(d.iterdir()):
        base, _, kind = f.name.partition(".")
        if kind == "min" or (base in VSERVER_RLIMITS and kind in ("", "soft", "hard")):
            continue  # a Linux-VServer kernel's own: 'vserver NAME check' says so
        if base not in RLIMITS or kind not in ("", "soft", "hard"):
            raise ConfigError(
                f"{f}: unknown resource limit; use one of "
                f"{', '.join(sorted(RLIMITS))}, optionally with .soft or .hard"
            )
        text = (_read(f) or "").strip()
        if text in ("inf", "infinity", "unlimited", "-1"):
            v = resource.RLIM_INFINITY
        else:
            try:
                v = int(text)
                if v < 0:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{f}: {text!r} is not a limit; write a number or inf") from None
        for k in ("soft", "hard") if not kind else (kind,):
            vals.setdefault(base, {})[k] = v
    inf = resource.RLIM_INFINITY

    def key(x: int) -> float:
        return float("inf") if x == inf else x

    out: dict[int, tuple[int, int]] = {}
    for base, given in vals.items():
        cur_soft, cur_hard = resource.getrlimit(RLIMITS[base])
        soft, hard = given.get("soft"), given.get("hard")
        if hard is None:
            hard = cur_hard if soft is None or key(soft) <= key(cur_hard) else soft
        if soft is None:
            soft = cur_soft if key(cur_soft) <= key(hard) else hard
        if key(soft) > key(hard):
            raise ConfigError(f"{d}/{base}.soft: {soft} is above the hard limit {hard}")
        out[RLIMITS[base]] = (soft, hard)
    return out


def _runlevel(d: Path, which: str, default: str) -> str:
    """util-vserver's sysv ``apps/init/runlevel.start`` / ``.stop`` (``runlevel`` alone:
    the start runlevel)."""
    text = (_read(d / f"runlevel.{which}") or "").strip()
    if not text and which == "start":
        text = (_read(d / "runlevel") or "").strip()
    if not text:
        return default
    if len(text) != 1 or text not in "0123456sS":
        raise ConfigError(f"{d}/runlevel.{which}: {text!r} is not a runlevel (0-6 or S)")
    return text


def _killseq(p: Path) -> tuple[int | None, float | None]:
    """util-vserver's ``apps/init/killseq``: ``SIGNAL [WAIT SIGNAL]...``, as stop-signal
    (the first signal) and stop-timeout (the first wait); the rest is what stop does
    anyway: everything left in the guest is killed with SIGKILL."""
    words = (_read(p) or "").split()
    if not words:
        return None, None
    sig = _signal_name(words[0], p)
    wait = None
    if len(words) > 1:
        try:
            wait = float(words[1])
        except ValueError:
            raise ConfigError(
                f"{p}: {words[1]!r} is not a wait in seconds; write SIGNAL [WAIT SIGNAL]..., "
                f"e.g. 'SIGTERM 10 SIGKILL'"
            ) from None
    return sig, wait


def _domainname(p: Path) -> str | None:
    text = (_read(p) or "").strip()
    if not text:
        return None
    if len(text) > 64:
        raise ConfigError(f"{p}: longer than 64 characters")
    return text


def _shell(p: Path) -> str:
    text = (_read(p) or "").strip()
    if not text:
        return "/bin/sh"
    if not text.startswith("/") or "\n" in text:
        raise ConfigError(f"{p}: {text!r}: write the absolute path of a shell inside the guest")
    return text


# apps/init/style: what runs as the guest's pid 1.
STYLES = {
    "systemd": "the guest's systemd is pid 1 and boots its default target",
    "plain": "the start command (default /sbin/init) is pid 1",
    "sysv": "the start command (default /etc/init.d/rc 3) runs under a pid 1 of ours",
    "none": "a pid 1 of ours alone; services come by 'vserver NAME exec'",
}
DEFAULT_START = {
    "systemd": ["/sbin/init"],
    "plain": ["/sbin/init"],
    "sysv": ["/etc/init.d/rc", "3"],  # the runlevel: apps/init/runlevel{,.start}
}
# systemd powers off on SIGRTMIN+3 (what nspawn and machinectl send), and takes its time
# stopping its units.
STOP_SIGNAL = {"systemd": int(signal.SIGRTMIN) + 3}
STOP_TIMEOUT = {"systemd": 30.0}
MAX_TTYS = 12


def _init_commands(
    c: Path, style: str, start: list[str] | None, stop: list[str] | None
) -> tuple[list[str], list[str] | None]:
    """The start and stop commands of ``style``: what cmd.start and cmd.stop say, or the
    style's defaults.  An unknown style, or a cmd.start the style would not run, is an
    error naming the file: nothing is silently ignored."""
    if style not in STYLES:
        raise ConfigError(
            f"{c / 'apps/init/style'}: unknown style {style!r}; use one of "
            f"{', '.join(STYLES)} (README: Booting a guest)"
        )
    if style == "none":
        if start:
            raise ConfigError(
                f"{c / 'apps/init/cmd.start'}: style none runs no start command; write "
                f"plain (the command is pid 1) or sysv (it runs under our pid 1) to "
                f"{c / 'apps/init/style'}, or remove cmd.start"
            )
        return [], stop  # pid 1 is ours and runs nothing; services come by 'exec'
    if start is None:
        start = DEFAULT_START[style]
        if style == "sysv":
            start = ["/etc/init.d/rc", _runlevel(c / "apps" / "init", "start", "3")]
            if stop is None:
                stop = ["/etc/init.d/rc", _runlevel(c / "apps" / "init", "stop", "0")]
    if not start:
        raise ConfigError(f"{c / 'apps/init/cmd.start'}: empty; one argument per line")
    return start, stop


def load(guest: Guest) -> GuestConfig:
    """Read and check everything ``start`` and ``stop`` will need."""
    c = guest.confdir
    if c is None:
        raise ConfigError(
            f"guest {guest.name!r} has no configuration directory; build it "
            f"with 'vserver {guest.name} build' first"
        )
    ctx = _number(c / "context", None, "the guest's context number")
    if ctx is not None and (ctx != int(ctx) or not 1 < ctx < 65535):
        raise ConfigError(f"{c / 'context'}: {ctx:g} is not a context number (2..65534)")
    nodename = (_read(c / "uts" / "nodename") or "").strip() or guest.name
    if len(nodename) > 64:
        raise ConfigError(f"{c / 'uts' / 'nodename'}: longer than 64 characters")
    style = (_read(c / "apps" / "init" / "style") or "plain").strip()
    start = _lines(c / "apps" / "init" / "cmd.start")
    stop = _lines(c / "apps" / "init" / "cmd.stop")
    start, stop = _init_commands(c, style, start, stop)
    kill_signal, kill_wait = _killseq(c / "apps" / "init" / "killseq")
    if style == "systemd":  # util-vserver's killseq predates it: SIGTERM only re-executes it
        kill_signal = None
    timeout = _number(
        c / "apps" / "init" / "stop-timeout", kill_wait or STOP_TIMEOUT.get(style, 10.0), "seconds"
    )
    nice = _number(c / "nice", None, "a nice level, -20..19")
    ttys = _number(c / "apps" / "init" / "ttys", 0, f"how many /dev/ttyN, 0..{MAX_TTYS}")
    if ttys is None or ttys != int(ttys) or not 0 <= ttys <= MAX_TTYS:
        raise ConfigError(f"{c / 'apps/init/ttys'}: {ttys:g} is not a count (0..{MAX_TTYS})")
    if nice is not None and (nice != int(nice) or not -20 <= nice <= 19):
        raise ConfigError(f"{c / 'nice'}: {nice:g} is not a nice level (-20..19)")
    parent = (_read(c.parent / ".defaults" / "cgroup" / "parent") or "").strip() or None
    hostnet = (c / "spaces" / "hostnet").exists()
    interfaces = _interfaces(c / "interfaces")
    if hostnet and interfaces:
        raise ConfigError(
            f"{c / 'spaces/hostnet'} (share the host's network) and "
            f"{c / 'interfaces'}/ (veth pairs in the guest's own network) "
            f"exclude each other; remove one of them"
        )
    wants_userns = userns.read(c) is not None
    cow = (c / "cow").exists()
    clash = {
        "cow": (cow, "FUSE mounts take no idmap with pyfuse3"),
        "spaces/hostnet": (hostnet, "guest root would have no rights in the host's network"),
    }
    for what, (flag, why) in clash.items():
        if wants_userns and flag:
            raise ConfigError(
                f"{c / 'userns'}/ (a user namespace of the guest's own) and {c / what} "
                f"exclude each other ({why}); remove one of them (vserver {guest.name} "
                f"userns disable removes the first)"
            )
    return GuestConfig(
        guest=guest,
        context=int(ctx) if ctx is not None else None,
        nodename=nodename,
        domainname=_domainname(c / "uts" / "domainname"),
        shell=_shell(c / "shell"),
        fstab=_fstab(c / "fstab"),
        interfaces=interfaces,
        hostnet=hostnet,
        keep_caps=_caps(c / "bcapabilities", hostnet),
        init=start,
        stop=stop or None,
        stop_signal=(
            _signal(c / "apps" / "init" / "stop-signal", STOP_SIGNAL.get(style))
            if kill_signal is None or (c / "apps" / "init" / "stop-signal").exists()
            else kill_signal
        ),
        stop_timeout=float(timeout or 10.0),
        cow=cow,
        style=style,
        rlimits=_rlimits(c / "rlimits"),
        nice=int(nice) if nice is not None else None,
        ttys=int(ttys),
        cgroup=read_limits(c / "cgroup"),
        cgroup_parent=parent,
        seccomp=read_seccomp(c / "seccomp", _read(c / "seccomp"), wants_userns),
        wants_userns=wants_userns,
    )
