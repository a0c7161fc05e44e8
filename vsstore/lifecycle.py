"""Start, stop, enter and watch guests: the core behind ``vserver``.

Start (the order nspawn, LXC and bubblewrap agree on)::

    vserver start ── lock, overlay (cow), fork ─▶ monitor (host namespaces, subreaper)
        monitor ── fork ─▶ setup: unshare mnt/uts/ipc/net (lo up; the monitor adds the
                             veths, setup configures them; spaces/hostnet: the
                             host's net instead); / rslave; bind the root; fstab
                             targets resolved in the root (RESOLVE_IN_ROOT) and mounted
                             through their fds; hostname; unshare pid
            setup ── fork ─▶ init (pid 1): its own mount namespace, /proc (masked), /dev,
                             pivot_root, then the static helper by descriptor (vsstore.enter):
                             setsid, limits, closed fds, capabilities cut to the guest's set,
                             exec the guest's init (sysv/none: the helper stays as pid 1)
        setup exits; init is the monitor's child (subreaper), and the monitor stays to clean
        up (state, overlay) when init ends, by stop or by itself.

The monitor never enters the guest's namespaces, so no host-side process holds them.
No Python runs with a guest's root: exec, enter and exec --cow end in the same helper
(vsstore.enter), which joins, chroots or finishes the pivot itself; on a terminal the
command gets a pty of the guest's own, relayed by the vserver process (vsstore.relay).
A run-state file (``$VSSTORE_RUNDIR/guests/NAME.json``) keeps init's pid with its start
time, so a reused pid is never taken for the guest.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import cgroups, enter, ns, relay
from .config import Guest, Paths
from .errors import BusyError, ConfigError, StateError, UnsafeTreeError, VsError
from .guestconf import GuestConfig, default_caps
from .lock import exclusive
from .safetree import GuestTree

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0)]
DEV_LINKS = [("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")]
PROC_MASKED = ["kcore", "keys", "sysrq-trigger", "timer_list", "sched_debug", "latency_stats",
               "kallsyms", "kmsg"]
PROC_READONLY = ["sys", "irq", "bus", "fs"]


# -- run state ---------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None  # ended; only its parent has not collected it yet
    return int(fields[19])


def alive(pid: int, started: int) -> bool:
    """Is ``pid`` still the process that started at ``started`` (and not a zombie)?"""
    t = _start_time(pid)
    return t is not None and t == started


@dataclass
class RunState:
    name: str
    init_pid: int
    init_start: int
    monitor_pid: int
    monitor_start: int
    root: str
    cow: str | None
    started: float
    context: int | None
    reaper: bool = False  # pid 1 is our reaping process (style sysv/none), not the guest's
    cgroup: dict[str, str] = dataclasses.field(default_factory=dict)  # its directories
    # What stop needs, as the guest was started: stop works from the run state alone,
    # whatever the configuration says now (run states written before these fields
    # existed get the defaults).
    stop: list[str] | None = None  # the stop command, run inside; else stop_signal to init
    stop_signal: int = int(signal.SIGTERM)
    stop_timeout: float = 10.0
    keep_caps: list[int] | None = None  # capabilities the stop command keeps (None: default)
    rlimits: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # res: soft, hard
    nice: int | None = None

    @property
    def running(self) -> bool:
        return alive(self.init_pid, self.init_start)

    @property
    def monitoring(self) -> bool:
        return alive(self.monitor_pid, self.monitor_start)


def stop_config(st: RunState) -> GuestConfig:
    """The configuration ``stop`` works with (and ``run_in``, for the stop command): what
    the run state recorded at start, not what the configuration files say now (they may
    have changed, or broken, since)."""
    keep = frozenset(st.keep_caps) if st.keep_caps is not None else default_caps()
    return GuestConfig(
        guest=Guest(st.name, Path(st.root), None), context=st.context, nodename=st.name,
        keep_caps=keep, stop=st.stop, stop_signal=st.stop_signal,
        stop_timeout=st.stop_timeout, nice=st.nice, cgroup_dirs=dict(st.cgroup),
        rlimits={int(k): (int(v[0]), int(v[1])) for k, v in st.rlimits.items()})


def state_file(paths: Paths, name: str) -> Path:
    return paths.rundir / "guests" / f"{name}.json"


def read_state(paths: Paths, name: str) -> RunState | None:
    try:
        return RunState(**json.loads(state_file(paths, name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{state_file(paths, name)}: unreadable run state ({e}); remove "
                          f"it if guest {name} is not running") from None


def write_state(paths: Paths, st: RunState) -> None:
    f = state_file(paths, st.name)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(st.__dict__))
    os.replace(tmp, f)


def running(paths: Paths, name: str) -> RunState | None:
    st = read_state(paths, name)
    return st if st is not None and st.running else None


def guest_pids(st: RunState, own: bool = True) -> list[int]:
    """Every process in the guest's pid namespace (host pids); ``own=False`` leaves out a
    pid 1 of ours (the reaper of sysv/none guests: our code, not the guest's)."""
    want = ns.ns_id(st.init_pid, "pid")
    if want is None or not st.running:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and ns.ns_id(d, "pid") == want:
            out.append(int(d))
    if not own and st.reaper:
        out = [p for p in out if p != st.init_pid]
    return out


def cow_mountpoint(paths: Paths) -> Path:
    """The host's one overlay for guests configured with ``cow``."""
    return paths.rundir / "cow"


# -- start -------------------------------------------------------------------------------

_HOSTNET = ("spaces/hostnet: the guest shares the host's network namespace (its "
            "interfaces, services on 127.0.0.1, abstract unix sockets); remove the file "
            "to give it a network of its own")


def guest_lock(paths: Paths, name: str):  # type: ignore[no-untyped-def]
    """One command at a time on a guest: start, stop, delete (BusyError otherwise)."""
    return exclusive(paths.rundir / "guests" / f"{name}.lock", f"command on guest {name}")


def start(paths: Paths, cfg: GuestConfig) -> RunState:
    """Start the guest; returns once its init runs (or raises, leaving nothing behind)."""
    with guest_lock(paths, cfg.name):
        old = read_state(paths, cfg.name)
        if old is not None:
            if old.running:
                raise StateError(f"guest {cfg.name} is already running (init pid "
                                 f"{old.init_pid}); 'vserver {cfg.name} stop' first")
            if old.monitoring:
                raise BusyError(f"guest {cfg.name} is still stopping (monitor pid "
                                f"{old.monitor_pid}); try again in a moment")
            cleanup(paths, old)
        if cfg.hostnet:
            print(f"vserver {cfg.name}: warning: {_HOSTNET}", file=sys.stderr)
        root = cfg.guest.root
        if not root.is_dir():
            raise ConfigError(f"guest {cfg.name}: its root {root} is not a directory; fix "
                              f"{cfg.guest.confdir}/vdir")
        with ExitStack() as undo:
            cow_at = None
            source = str(root)
            if cfg.cow:
                cow_at = str(cow_mountpoint(paths))
                _cow_add(paths, cow_at, cfg.name, str(root))
                undo.callback(_cow_remove, paths, cow_at, cfg.name)
                source = os.path.join(cow_at, cfg.name)
            cfg = dataclasses.replace(cfg, helper=str(enter.binary(paths.statedir)))
            cg = _make_cgroup(cfg)
            if cg is not None:
                undo.callback(cg.remove)
                undo.callback(cg.kill)
                cfg = dataclasses.replace(cfg, cgroup_dirs={k: str(v) for k, v in
                                                            cg.dirs.items()})
            st = _spawn(paths, cfg, source, cow_at)
            undo.pop_all()
        return st


def _make_cgroup(cfg: GuestConfig) -> cgroups.GuestCgroup | None:
    """The guest's cgroup with its settings, or None (with a warning) where the host has
    no usable controller: then rlimits alone apply."""
    layout = cgroups.detect()
    if layout.version == 0:
        print(f"vserver {cfg.name}: warning: {layout.why}; starting without a cgroup "
              f"(rlimits only{', cgroup/ settings ignored' if not cfg.cgroup.empty() else ''})",
              file=sys.stderr)
        return None
    old = cgroups.existing(layout, cfg.name, cfg.cgroup_parent)
    if old is not None:  # left by a crash
        if old.pids():
            raise BusyError(f"guest {cfg.name}'s cgroup {next(iter(old.dirs.values()))} still "
                            f"has processes; stop them first")
        old.remove()
    return cgroups.create(layout, cfg.name, cfg.cgroup_parent, cfg.cgroup)


def guest_cgroup(dirs: dict[str, str]) -> cgroups.GuestCgroup | None:
    if not dirs:
        return None
    return cgroups.GuestCgroup({k: Path(v) for k, v in dirs.items()})


def _cow_add(paths: Paths, at: str, name: str, root: str) -> None:
    from cow import control
    if control.is_mounted(at):
        control.add(paths, at, name, root)
    else:
        os.makedirs(at, exist_ok=True)
        control.mount(paths, at, {name: root})


def _cow_attach(paths: Paths, at: str, name: str, pid: int) -> None:
    """Tell the overlay that the processes of ``pid``'s pid namespace are guest ``name``'s:
    the overlay tells the writing guest by nothing else.  ``pid`` is held at a gate, so it
    is still the process we forked."""
    from cow import control
    fd = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        control.attach(paths, at, name, fd)
    finally:
        os.close(fd)


def _cow_remove(paths: Paths, at: str, name: str) -> None:
    """Stop serving the guest; unmount the overlay once it serves nobody."""
    from cow import control
    if not control.is_mounted(at):
        return
    try:
        left = control.remove(paths, at, name)
    except ConfigError:
        st = control.state(paths, at) or {}
        left = {g: r for g, r in st.get("guests", {}).items() if g != name}
    if not left:
        control.umount(paths, at)


def _log_file(paths: Paths, name: str) -> Path:
    paths.logdir.mkdir(parents=True, exist_ok=True)
    return paths.logdir / f"vserver-{name}.log"


def _spawn(paths: Paths, cfg: GuestConfig, source: str, cow_at: str | None) -> RunState:
    """Fork the monitor (detached), and wait for its report: init runs, or why not."""
    log = _log_file(paths, cfg.name)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _monitor(paths, cfg, source, cow_at, w, log)
        except BaseException:
            traceback.print_exc()
        os._exit(1)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        report = f.readline()
    try:
        msg = json.loads(report)
    except ValueError:
        raise VsError(f"guest {cfg.name} did not start; see {log}") from None
    if "error" in msg:
        cls = {"config": ConfigError, "unsafe": UnsafeTreeError}.get(msg.get("kind"), VsError)
        raise cls(f"guest {cfg.name} did not start: {msg['error']}")
    return RunState(**msg["state"])


def _monitor(paths: Paths, cfg: GuestConfig, source: str, cow_at: str | None, report: int,
             log: Path) -> None:  # pragma: no cover - runs in a forked child
    """The guest's host-side parent: starts it, reports, waits for init, cleans up."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _close_fds_but(report)  # the caller's locks and files are not ours
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = sys.stdout
    ns.prctl(ns.PR_SET_CHILD_SUBREAPER, 1)

    def say(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} vserver {cfg.name}: {text}", flush=True)

    def fail(kind: str, text: str) -> None:
        say(f"start failed: {text}")
        os.write(report, json.dumps({"error": text, "kind": kind}).encode() + b"\n")
        os.close(report)
        os._exit(1)

    up_r, up_w = os.pipe()      # setup -> monitor: unshared (netns ready for veth); init pid
    go_r, go_w = os.pipe()      # monitor -> setup: network configured
    ex_r, ex_w = os.pipe2(os.O_CLOEXEC)  # init -> monitor: why exec failed (EOF: it ran)
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)  # monitor -> init: go on (the overlay knows it)
    setup = os.fork()
    if setup == 0:
        for f in (up_r, go_w, ex_r, report, gate_w):
            os.close(f)
        _setup(cfg, source, up_w, go_r, ex_w, gate_r)
        os._exit(0)
    for f in (up_w, go_r, ex_w, gate_r):
        os.close(f)
    up = os.fdopen(up_r, "rb")
    first = json.loads(up.readline() or b'{"error": "setup died"}')
    if "error" in first:
        os.waitpid(setup, 0)
        fail(first.get("kind", "config"), first["error"])
    hostside: list[str] = []
    try:
        hostside = _network_host(cfg, first["pid"])
        os.write(go_w, b"go\n")
    except VsError as e:
        os.kill(first["pid"], signal.SIGKILL)
        os.waitpid(setup, 0)
        fail("config", e.message)
    os.close(go_w)
    second = json.loads(up.readline() or b'{"error": "setup died"}')
    os.waitpid(setup, 0)
    if "error" in second:
        fail(second.get("kind", "config"), second["error"])
    init = int(second["init"])
    try:  # init waits at its gate: a cow guest's pid namespace is attached first
        if cow_at is not None:
            _cow_attach(paths, cow_at, cfg.name, init)
        os.write(gate_w, b"1")
    except (OSError, VsError) as e:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        fail("config", f"cannot attach it to the overlay: "
                       f"{getattr(e, 'message', None) or e}")
    finally:
        os.close(gate_w)
    why = b""
    while chunk := os.read(ex_r, 4096):
        why += chunk
    os.close(ex_r)
    if why:
        os.kill(init, signal.SIGKILL)  # a sysv/none pid 1 of ours would wait for ever
        os.waitpid(init, 0)
        fail("config", _init_failure(cfg, why))
    st = RunState(name=cfg.name, init_pid=init, init_start=_start_time(init) or 0,
                  monitor_pid=os.getpid(), monitor_start=_start_time(os.getpid()) or 0,
                  root=str(cfg.guest.root), cow=cow_at, started=time.time(),
                  context=cfg.context, reaper=cfg.style in ("sysv", "none"),
                  cgroup=dict(cfg.cgroup_dirs), stop=cfg.stop,
                  stop_signal=int(cfg.stop_signal), stop_timeout=cfg.stop_timeout,
                  keep_caps=sorted(cfg.keep_caps), nice=cfg.nice,
                  rlimits={str(k): list(v) for k, v in cfg.rlimits.items()})
    write_state(paths, st)
    say(f"started: init pid {init} ({' '.join(cfg.init)})")
    if cfg.hostnet:
        say(f"warning: {_HOSTNET}")
    os.write(report, json.dumps({"state": st.__dict__}).encode() + b"\n")
    os.close(report)
    status = 0
    while True:  # reap: init, and whatever else a subreaper inherits
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == init:
            break
    code = os.waitstatus_to_exitcode(status)
    say(f"init ended ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}); "
        f"cleaning up")
    for dev in hostside:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
    cleanup(paths, st)
    say("stopped")


def _setup(cfg: GuestConfig, source: str, up: int, go: int, exec_fd: int, gate: int,
           ) -> None:  # pragma: no cover - runs in a forked child
    """In new namespaces: mounts, network, hostname; then fork init."""
    def tell(msg: dict[str, Any]) -> None:
        os.write(up, json.dumps(msg).encode() + b"\n")

    # The pid namespace comes last, just before init is forked: the first child forked
    # after it becomes its pid 1 (the network set-up runs the host's ip before that).
    try:
        _unshare(cfg, ns.CLONE_NEWNS | ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
        ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
    except OSError as e:
        tell({"error": f"cannot create namespaces: {e}", "kind": "unsupported"})
        return
    tell({"pid": os.getpid()})
    if os.read(go, 16) != b"go\n":
        return  # the monitor gave up
    try:
        _network_guest(cfg)
        tree = _bind_root(cfg, source)
        socket.sethostname(cfg.nodename)
        cg = guest_cgroup(cfg.cgroup_dirs)
        if cg is not None:
            cg.join()  # init and everything it starts are charged to the guest
        ns.unshare(ns.CLONE_NEWPID)
    except (OSError, VsError) as e:
        tell({"error": getattr(e, "message", None) or str(e),
              "kind": "unsafe" if isinstance(e, UnsafeTreeError) else "config"})
        return
    init = os.fork()
    if init == 0:
        os.close(up)
        if os.read(gate, 1) != b"1":  # the monitor attaches our pid namespace first
            os._exit(127)
        os.close(gate)
        try:
            _init(cfg, tree, exec_fd)
        except BaseException as e:  # noqa: BLE001 - reported to the monitor
            os.write(exec_fd, (getattr(e, "message", None) or str(e)).encode())
        os._exit(127)
    tell({"init": init})


def _unshare(cfg: GuestConfig, flags: int) -> None:  # pragma: no cover - in a child
    """Unshare ``flags`` and a network namespace of the guest's own, its loopback up
    (interfaces come later), unless the configuration asks for the host's network
    (spaces/hostnet)."""
    if cfg.hostnet:
        ns.unshare(flags)
        return
    ns.unshare(flags | ns.CLONE_NEWNET)
    ns.link_up("lo")


def _bind_root(cfg: GuestConfig, source: str) -> GuestTree:
    """In a new mount namespace: the guest's root bound onto itself (a mount point for
    pivot_root) and its fstab entries mounted in it."""
    ns.mount(source, source, None, ns.MS_BIND | ns.MS_REC)
    tree = GuestTree(source, cfg.name)
    for e in cfg.fstab:
        _mount_in(tree, e.source, e.target, e.fstype, e.flags, e.data, e.where)
    return tree


def _mount_in(tree: GuestTree, source: str | None, target: str, fstype: str | None,
              flags: int, data: str, where: str) -> None:
    """Mount on ``target`` as the guest sees it: symlinks resolved inside its root, never
    out of it; the mount goes through an fd of what was resolved, so nothing can swap the
    path in between."""
    try:
        fd = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        raise ConfigError(f"{where}: mount target {target} in guest {tree.name}: "
                          f"{e.strerror}; create it inside the guest") from None
    try:
        remount = flags & ns.MS_RDONLY and flags & ns.MS_BIND
        ns.mount(source, f"/proc/self/fd/{fd}", fstype,
                 flags & ~ns.MS_RDONLY if remount else flags, data or None)
        if remount:  # a bind mount takes ro only on a remount, of the new mount itself
            os.close(fd)
            fd = tree.open_in_root(target, os.O_PATH | os.O_DIRECTORY)
            ns.mount(None, f"/proc/self/fd/{fd}", None,
                     ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY |
                     (flags & (ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC)), None)
    except OSError as e:
        raise ConfigError(f"{where}: cannot mount {source} on {target}: {e.strerror}") from None
    finally:
        os.close(fd)


def _init(cfg: GuestConfig, tree: GuestTree, exec_fd: int) -> None:  # pragma: no cover
    """pid 1 of the guest until the helper takes over: its own mount namespace (the pivot
    must move no other process's root: setup's Python still runs), /proc, /dev,
    pivot_root, and the helper by descriptor, which becomes the guest's init (sysv/none:
    forks it, or not, and stays as the reaping pid 1 without capabilities)."""
    assert cfg.helper is not None
    helper = enter.load(cfg.helper)
    ns.prctl(ns.PR_SET_DUMPABLE, 0)
    mode = cfg.style if cfg.style in ("sysv", "none") else "init"
    args = enter.argv(mode, cfg, cfg.init, detach=True)
    env = {"PATH": GUEST_PATH, "container": "vserver", "HOME": "/", "TERM": "linux"}
    tree = _own_mount_ns(tree)
    _mount_guest_fs(cfg, tree)
    helper, _ = _place_fds(helper, {}, exec_fd)
    _pivot_and_exec(tree, helper, args, env)


def _own_mount_ns(tree: GuestTree) -> GuestTree:  # pragma: no cover - child
    """A mount namespace of this process's own (a copy), and the tree opened again in it
    (a descriptor of the old one names mounts we can no longer mount on)."""
    ns.unshare(ns.CLONE_NEWNS)
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
    again = GuestTree(tree.root, tree.name)
    if (os.fstat(again.fd).st_dev, os.fstat(again.fd).st_ino) != (tree.dev, tree.ino):
        raise UnsafeTreeError(f"guest {tree.name}: its root changed while starting")
    tree.close()
    return again


def _init_failure(cfg: GuestConfig, raw: bytes) -> str:
    step, text = enter.failure(raw) or ("enter", "")
    if step == "exec":
        return (f"cannot run {cfg.init[0]} inside the guest: {text}; fix apps/init/cmd.start "
                f"or apps/init/style")
    return text


def _mount_guest_fs(cfg: GuestConfig, tree: GuestTree) -> None:  # pragma: no cover
    """For a process in the guest's pid namespace and a mount namespace of its own: /proc
    (masked) and a minimal /dev in the tree, through descriptors resolved inside it."""
    for d in ("proc", "dev"):
        try:
            fd = tree.open_beneath(d, os.O_PATH | os.O_DIRECTORY)
            os.close(fd)
        except FileNotFoundError:
            os.mkdir(d, 0o755, dir_fd=tree.fd)
        except OSError as e:
            raise UnsafeTreeError(f"/{d} in guest {cfg.name}: {e.strerror} (a symlink or "
                                  f"not a directory?); make it a plain directory") from None
    _mount_in(tree, "proc", "/proc", "proc", ns.MS_NOSUID | ns.MS_NODEV | ns.MS_NOEXEC, "",
              "/proc")
    proc = tree.open_in_root("proc", os.O_PATH | os.O_DIRECTORY)
    for name in PROC_MASKED:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=proc)
        except OSError:
            continue
        ns.mount("/dev/null", f"/proc/self/fd/{fd}", None, ns.MS_BIND)
        os.close(fd)
    for name in PROC_READONLY:
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=proc)
        except OSError:
            continue
        ns.mount(f"/proc/self/fd/{fd}", f"/proc/self/fd/{fd}", None, ns.MS_BIND | ns.MS_REC)
        os.close(fd)
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY, dir_fd=proc)  # the bind
        ns.mount(None, f"/proc/self/fd/{fd}", None,
                 ns.MS_BIND | ns.MS_REMOUNT | ns.MS_RDONLY | ns.MS_NOSUID | ns.MS_NODEV |
                 ns.MS_NOEXEC)
        os.close(fd)
    os.close(proc)
    _mount_in(tree, "tmpfs", "/dev", "tmpfs", ns.MS_NOSUID | ns.MS_NOEXEC, "mode=755,size=64k",
              "/dev")
    dev = tree.open_in_root("dev", os.O_RDONLY | os.O_DIRECTORY)
    for name, major, minor in DEVICES:
        os.mknod(name, 0o666 | 0o020000, os.makedev(major, minor), dir_fd=dev)
        os.chmod(name, 0o666, dir_fd=dev)
    for name, target in DEV_LINKS:
        os.symlink(target, name, dir_fd=dev)
    for d in ("pts", "shm"):
        os.mkdir(d, 0o755, dir_fd=dev)
    os.close(dev)
    _mount_in(tree, "devpts", "/dev/pts", "devpts", ns.MS_NOSUID | ns.MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=620,gid=5", "/dev/pts")
    _mount_in(tree, "shm", "/dev/shm", "tmpfs", ns.MS_NOSUID | ns.MS_NODEV,
              "mode=1777", "/dev/shm")


def _place_fds(helper: int, std: dict[int, int], err: int, keep: tuple[int, ...] = (),
               ) -> tuple[int, list[int]]:  # pragma: no cover - child
    """In a forked child about to execute the helper: ``std`` (target -> source) onto
    0-2, the error pipe ``err`` onto enter.ERRFD, ``keep`` inheritable; returns the new
    numbers of ``helper`` (still close-on-exec) and of ``keep`` (all above 9).  Every other
    descriptor stays close-on-exec or is the caller's stdio; the helper closes all but 0-2
    and the error pipe before the command runs."""
    helper = fcntl.fcntl(helper, fcntl.F_DUPFD_CLOEXEC, 10)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in keep]
    src = {t: fcntl.fcntl(s, fcntl.F_DUPFD_CLOEXEC, 10) for t, s in std.items()}
    e = fcntl.fcntl(err, fcntl.F_DUPFD_CLOEXEC, 10)
    for t, s in src.items():
        os.dup2(s, t)
    os.dup2(e, enter.ERRFD)
    for fd in moved:
        os.set_inheritable(fd, True)
    return helper, moved


def _pivot_and_exec(tree: GuestTree, helper: int, args: list[str],
                    env: dict[str, str]) -> NoReturn:  # pragma: no cover - child
    """pivot_root into the tree and execute the helper by descriptor.  After the pivot this
    process's root is the guest's, so Python does nothing else, and could not import
    anything if it tried (enter.seal_python); the helper detaches the old root."""
    os.fchdir(tree.fd)
    tree.close()
    enter.seal_python()
    ns.pivot_root(".", ".")
    os.execve(helper, args, env)
    raise AssertionError("execve returned")


def _close_fds_but(*keep: int) -> None:
    """(The monitor's, on the host: it lists the host's /proc.)"""
    for n in os.listdir("/proc/self/fd"):
        fd = int(n)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


# -- network -----------------------------------------------------------------------------

def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise ConfigError(f"ip {' '.join(args)}: {p.stderr.strip()}")


def _host_dev(cfg: GuestConfig, i: int) -> str:
    base = f"vs{cfg.context or ''}{cfg.name}"[:11]
    return f"{base}.{i}"


def _network_host(cfg: GuestConfig, pid: int) -> list[str]:
    """The host's side of each configured interface: a veth pair, its peer moved into the
    guest's network namespace, a route to the guest's address (and the host address)."""
    made = []
    try:
        for i, itf in enumerate(cfg.interfaces):
            host, peer = _host_dev(cfg, i), f"vsp{pid}.{i}"[:15]
            _ip("link", "add", host, "type", "veth", "peer", "name", peer)
            made.append(host)
            _ip("link", "set", peer, "netns", str(pid))
            if itf.host_ip is not None:
                _ip("addr", "add", f"{itf.host_ip}/{itf.ip.network.prefixlen}", "dev", host)
            _ip("link", "set", host, "up")
            if itf.host_ip is None:
                _ip("route", "add", str(itf.ip.ip), "dev", host)
    except ConfigError:
        for d in made:
            subprocess.run(["ip", "link", "del", d], capture_output=True)
        raise
    return made


def _network_guest(cfg: GuestConfig) -> None:
    """Inside the new network namespace (the host's ``ip``, never the guest's)."""
    for i, itf in enumerate(cfg.interfaces):
        peer = f"vsp{os.getpid()}.{i}"[:15]
        _ip("link", "set", peer, "name", itf.name)
        _ip("addr", "add", str(itf.ip), "dev", itf.name)
        _ip("link", "set", itf.name, "up")
        if itf.host_ip is not None and i == 0:
            _ip("route", "add", "default", "via", str(itf.host_ip))


# -- stop --------------------------------------------------------------------------------

def _wait_gone(pid: int, started: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for a process (not our child) to end."""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not alive(pid, started):
            return True
        select.select([pfd], [], [], timeout)
        return not alive(pid, started)
    finally:
        os.close(pfd)


def _signal(pid: int, started: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``started``
    (through a pidfd: a pid that ended and was reused meanwhile is never signalled)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if alive(pid, started):
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass  # ended just now
    finally:
        os.close(fd)


def _catches(pid: int, sig: int) -> bool:
    """Has process ``pid`` a handler for ``sig`` (SigCgt in /proc/PID/status)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _wait_handler(pid: int, started: int, sig: int, deadline: float) -> None:
    """Wait (up to ``deadline``) until init has a handler for ``sig``: a pid namespace's
    init never gets a signal it has no handler for, not even from the host, and right
    after start it may not have installed it yet (a signal sent then would be lost, and
    stop would wait for its whole timeout).  SIGKILL and SIGSTOP need no handler."""
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        return
    while alive(pid, started) and not _catches(pid, sig) and time.monotonic() < deadline:
        time.sleep(0.01)


def stop(paths: Paths, name: str) -> None:
    """Stop the guest: its stop command or signal, then after the timeout SIGKILL to its
    init (which takes every process of the pid namespace with it); then the monitor's
    clean-up (its cgroup ends whatever is left; done here if the monitor is gone).
    Everything comes from the run state, so a configuration changed or broken since the
    start never keeps a running guest from stopping."""
    with guest_lock(paths, name):
        st = read_state(paths, name)
        if st is None or not st.running:
            if st is not None and not st.monitoring:
                cleanup(paths, st)
            raise StateError(f"guest {name} is not running")
        cfg = stop_config(st)
        deadline = time.monotonic() + cfg.stop_timeout
        if cfg.stop:
            try:
                run_in(paths, cfg, st, cfg.stop, timeout=cfg.stop_timeout)
            except VsError:
                pass  # a failing stop command: the signal and the kill still follow
        _wait_handler(st.init_pid, st.init_start, cfg.stop_signal, deadline)
        _signal(st.init_pid, st.init_start, cfg.stop_signal)
        if not _wait_gone(st.init_pid, st.init_start, max(0.0, deadline - time.monotonic())):
            cg = guest_cgroup(st.cgroup)
            if cg is not None:
                cg.kill()  # every process of the guest, wherever it went
            _signal(st.init_pid, st.init_start, signal.SIGKILL)
            _wait_gone(st.init_pid, st.init_start, 30)
        # The monitor reaps init and cleans up: its cgroup's kill ends whatever outlived
        # init (one killer at a time: the monitor's, or ours below when it is gone).
        if not _wait_gone(st.monitor_pid, st.monitor_start, 30):
            _signal(st.monitor_pid, st.monitor_start, signal.SIGKILL)
            _wait_gone(st.monitor_pid, st.monitor_start, 5)
        if read_state(paths, name) is not None:
            cleanup(paths, st)


def cleanup(paths: Paths, st: RunState) -> None:
    """What is left of a guest whose init has ended: its processes (by its cgroup), its
    cgroup, its overlay share and run state."""
    cg = guest_cgroup(st.cgroup)
    if cg is not None:
        try:
            cg.kill()
            cg.remove()
        except OSError as e:
            print(f"vserver {st.name}: cannot remove its cgroup: {e}", file=sys.stderr)
    if st.cow:
        try:
            _cow_remove(paths, st.cow, st.name)
        except VsError as e:
            print(f"vserver {st.name}: {e.message}", file=sys.stderr)
    cur = read_state(paths, st.name)
    if cur is not None and cur.init_pid == st.init_pid:
        state_file(paths, st.name).unlink(missing_ok=True)


# -- exec / enter ------------------------------------------------------------------------

def _open_guest(cfg: GuestConfig, st: RunState, kinds: tuple[str, ...]) -> dict[str, int]:
    """Descriptors of the running guest's namespaces ``kinds`` (and "root": its root
    directory), opened before forking and checked to be its still (a pid may be reused)."""
    fds: dict[str, int] = {}
    try:
        for kind in kinds:
            where = "root" if kind == "root" else f"ns/{kind}"
            fds[kind] = os.open(f"/proc/{st.init_pid}/{where}", os.O_RDONLY | os.O_CLOEXEC)
        if not st.running:
            raise ProcessLookupError(errno.ESRCH, "its init is gone")
    except OSError as e:
        for fd in fds.values():
            os.close(fd)
        raise StateError(f"guest {cfg.name}: cannot join it ({e.strerror}); is it "
                         f"running?") from None
    return fds


def _join_guest(st: RunState, fds: dict[str, int]) -> None:  # pragma: no cover - child
    """Join the guest's cgroup (charged to it, ended with it) and then the namespaces in
    ``fds``; pid takes effect for the children."""
    cg = guest_cgroup(st.cgroup)
    if cg is not None:
        cg.join()
    for kind in ("ipc", "uts", "net", "pid", "mnt"):
        if kind in fds:
            ns.setns(fds[kind])


def _command_env() -> dict[str, str]:
    return {"PATH": GUEST_PATH, "HOME": "/root", "container": "vserver",
            "TERM": os.environ.get("TERM", "dumb")}


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


def _outcome(cfg: GuestConfig, argv: list[str], status: int, ex_r: int) -> int:
    """The command's exit code (128+N for a signal), or the error why it never ran."""
    why = enter.failure(_read_all(ex_r))
    if why is not None:
        step, text = why
        if step == "exec":
            raise ConfigError(f"cannot run {argv[0]} inside guest {cfg.name}: {text}")
        raise ConfigError(f"cannot enter guest {cfg.name}: {text}")
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_in(paths: Paths, cfg: GuestConfig, st: RunState, argv: list[str],
           timeout: float | None = None) -> int:
    """Run ``argv`` inside the running guest: its namespaces, root and reduced capabilities,
    a new session.  Python opens what it needs on the host (namespaces, root, the helper,
    a pty from the guest's devpts when stdin, stdout or stderr is a terminal) and a forked
    child executes the static helper (vsstore.enter), which enters and runs the command;
    this process relays the pty (vsstore.relay).  Returns its exit code (128+N for a
    signal)."""
    if not argv:
        raise ConfigError("no command given; vserver NAME exec COMMAND [ARGS...]")
    kinds = ("ipc", "uts", "net", "pid", "mnt", "root")
    with ExitStack() as stack:
        helper = enter.load(enter.binary(paths.statedir))
        stack.callback(os.close, helper)
        fds = _open_guest(cfg, st, kinds)
        for fd in fds.values():
            stack.callback(os.close, fd)
        stdio = relay.Stdio.probe()
        master = slave = None
        if stdio.any:
            master, slave = relay.open_pty(fds["root"])
            stack.callback(os.close, master)
            relay.copy_settings(stdio, slave)
        ex_r, ex_w = os.pipe2(os.O_CLOEXEC)
        stack.callback(os.close, ex_r)
        child = os.fork()
        if child == 0:  # pragma: no cover - child
            try:
                os.setpgid(0, 0)  # signals from the terminal come through us, once
                cg = guest_cgroup(st.cgroup)
                if cg is not None:
                    cg.join()  # charged to the guest, ended with it
                std = {i: slave for i in range(3) if stdio.tty[i]} if slave is not None else {}
                prog, placed = _place_fds(helper, std, ex_w, tuple(fds[k] for k in kinds))
                args = enter.argv("exec", cfg, argv, setns=tuple(placed[:5]), root=placed[5],
                                  ctty=stdio.ctty if std else None)
                os.execve(prog, args, _command_env())
            except BaseException as e:  # noqa: BLE001
                os.write(ex_w, (getattr(e, "message", None) or str(e)).encode())
            os._exit(127)
        os.close(ex_w)
        if slave is not None:
            os.close(slave)
        try:
            status = relay.run(child, master, stdio, timeout)
        except relay.Timeout:
            raise StateError(f"guest {cfg.name}: {argv[0]} took longer than "
                             f"{timeout:g} s") from None
        return _outcome(cfg, argv, status, ex_r)
    raise AssertionError("unreachable")


# -- exec --cow ----------------------------------------------------------------------------

_TEMP_SHARE = re.compile(r"^(?P<guest>.+)~(?P<pid>\d+)$")


def _sweep_temporary(paths: Paths, cow_at: str) -> None:
    """Remove overlay shares of earlier ``exec --cow`` runs whose vserver process is gone
    (killed before it could clean up)."""
    from cow import control
    st = control.state(paths, cow_at) if control.is_mounted(cow_at) else None
    for name in list((st or {}).get("guests", {})):
        m = _TEMP_SHARE.match(name)
        if m and not os.path.exists(f"/proc/{m['pid']}"):
            try:
                _cow_remove(paths, cow_at, name)
            except VsError as e:
                print(f"vserver: {e.message}", file=sys.stderr)


def run_cow(paths: Paths, cfg: GuestConfig, argv: list[str]) -> int:
    """Run ``argv`` in the guest with its root seen through the cow overlay for the
    duration: every shared file it writes, replaces, removes or links becomes the guest's
    own (or loses only the guest's name), and nothing else changes.  The changes land in
    the guest's own tree.  A running guest lends its ipc, uts, net and pid namespaces; a
    stopped one gets new ones (a network of its own with loopback only, unless
    spaces/hostnet asks for the host's).  The temporary share in the
    overlay is removed afterwards, also when the command fails or is killed."""
    if not argv:
        raise ConfigError("no command given; vserver NAME exec --cow COMMAND [ARGS...]")
    st = running(paths, cfg.name)
    if st is not None and st.cow:
        return run_in(paths, cfg, st, argv)  # it runs through the overlay already
    cow_at = str(cow_mountpoint(paths))
    share = f"{cfg.name}~{os.getpid()}"
    with ExitStack() as stack:
        helper = enter.load(enter.binary(paths.statedir))
        stack.callback(os.close, helper)
        _sweep_temporary(paths, cow_at)
        _cow_add(paths, cow_at, share, str(cfg.guest.root))

        def remove_share() -> None:
            try:
                _cow_remove(paths, cow_at, share)
            except VsError as e:
                print(f"vserver: {e.message}", file=sys.stderr)
        stack.callback(remove_share)
        return _run_temporary(cfg, st, os.path.join(cow_at, share), argv, helper,
                              lambda pid: _cow_attach(paths, cow_at, share, pid))


def _run_temporary(cfg: GuestConfig, st: RunState | None, source: str, argv: list[str],
                   helper: int, attach: Callable[[int], None]) -> int:
    """The command in the guest's (or new) namespaces, its root the overlay's share
    ``source``; ``attach(pid)`` tells the overlay that ``pid``'s pid namespace is the
    share's, before anything runs in it."""
    fds = _open_guest(cfg, st, ("ipc", "uts", "net", "pid")) if st is not None else {}
    stdio = relay.Stdio.probe()
    # On a terminal: the leader opens a pty in the devpts it mounts and hands us the master.
    back, fwd = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if stdio.any \
        else (None, None)
    ex_r, ex_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        try:
            os.close(ex_r)
            if back is not None:
                back.close()
            os.setpgid(0, 0)  # signals from the terminal come through the vserver process
            ns.prctl(ns.PR_SET_DUMPABLE, 0)
            if st is not None:
                _join_guest(st, fds)
            else:
                _unshare(cfg, ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
                socket.sethostname(cfg.nodename)
                ns.unshare(ns.CLONE_NEWPID)
            ns.unshare(ns.CLONE_NEWNS)
            ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
            tree = _bind_root(cfg, source)
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            leader = os.fork()  # in the guest's pid namespace (or pid 1 of a new one)
            if leader == 0:
                os.close(gate_w)
                if os.read(gate_r, 1) != b"1":  # attached to the overlay first
                    os._exit(127)
                os.close(gate_r)
                _lead(cfg, tree, argv, stdio, fwd, ex_w, helper)
            os.close(gate_r)
            try:
                attach(leader)
                os.write(gate_w, b"1")
            finally:
                os.close(gate_w)
            os.close(ex_w)
            tree.close()
            if fwd is not None:
                fwd.close()
            os._exit(_wait_passing_signals(leader))
        except BaseException as e:  # noqa: BLE001
            try:
                os.write(ex_w, (getattr(e, "message", None) or str(e)).encode())
            finally:
                os._exit(127)
    for fd in (*fds.values(), ex_w):
        os.close(fd)
    master = None
    try:
        if back is not None and fwd is not None:
            fwd.close()
            master = _receive_pty(back, stdio)
        status = relay.run(child, master, stdio)
    finally:
        if master is not None:
            os.close(master)
        if back is not None:
            back.close()
    try:
        return _outcome(cfg, argv, status, ex_r)
    finally:
        os.close(ex_r)


def _receive_pty(sock: socket.socket, stdio: relay.Stdio) -> int | None:
    """The pty master the leader sends (None if it failed first); its size and mode set
    before the leader goes on to run the command."""
    try:
        _msg, got, _flags, _addr = socket.recv_fds(sock, 16, 1)
    except OSError:
        return None
    if not got:
        return None
    relay.copy_settings(stdio, got[0])  # termios and winsize ioctls on a master set the slave's
    try:
        sock.send(b"k")
    except OSError:
        pass
    return got[0]


def _wait_passing_signals(pid: int) -> int:  # pragma: no cover - in a forked child
    """Wait for child ``pid`` while passing SIGTERM/SIGINT/SIGHUP/SIGQUIT on to it; its
    exit code (128+N for a signal)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda signum, _f: os.kill(pid, signum))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code


def _lead(cfg: GuestConfig, tree: GuestTree, argv: list[str], stdio: relay.Stdio,
          sock: socket.socket | None, ex_w: int, helper: int) -> NoReturn:  # pragma: no cover
    """The command's leader, in the guest's pid namespace: a mount namespace of its own (the
    pivot must not move the root of the Python that waits for it), /proc and /dev, on a
    terminal a pty from this devpts (the master to the vserver process), pivot_root, and
    the helper, which forks the command (never a pid 1, which would ignore signals) and
    waits for it (reaping, as a pid 1)."""
    try:
        tree = _own_mount_ns(tree)
        _mount_guest_fs(cfg, tree)
        std: dict[int, int] = {}
        if sock is not None:
            master, slave = relay.open_pty(tree.fd)
            socket.send_fds(sock, [b"pty"], [master])
            os.close(master)
            sock.recv(1)  # the vserver process has set its size and mode
            sock.close()
            std = {i: slave for i in range(3) if stdio.tty[i]}
        prog, _ = _place_fds(helper, std, ex_w)
        args = enter.argv("exec", cfg, argv, detach=True, ctty=stdio.ctty if std else None)
        _pivot_and_exec(tree, prog, args, _command_env())
    except BaseException as e:  # noqa: BLE001
        os.write(ex_w, (getattr(e, "message", None) or str(e)).encode())
    os._exit(127)
