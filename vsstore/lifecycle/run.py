"""Start, stop, enter and watch guests: the core behind ``vserver``.

Start (the order nspawn, LXC and bubblewrap agree on)::

    vserver start ── lock, overlay (cow), fork ─▶ monitor (host namespaces, subreaper)
        monitor ── fork ─▶ setup: unshare mnt/uts/ipc/net (lo up; the monitor adds the
                             veths, setup configures them; spaces/hostnet: the
                             host's net instead); / rslave; bind the root; fstab
                             targets resolved in the root (RESOLVE_IN_ROOT) and mounted
                             through their fds; hostname; unshare pid
            setup ── fork ─▶ init (pid 1): its own mount namespace, /proc (masked), /dev,
                             pivot_root, then the static helper by descriptor (lifecycle.helper):
                             setsid, limits, closed fds, capabilities cut to the guest's set,
                             exec the guest's init (sysv/none: the helper stays as pid 1)
        setup exits; init is the monitor's child (subreaper), and the monitor stays to clean
        up (state, overlay) when init ends, by stop or by itself.

The monitor never enters the guest's namespaces, so no host-side process holds them.
No Python runs with a guest's root: exec, enter and exec --cow end in the same helper
(lifecycle.helper), which joins, chroots or finishes the pivot itself; on a terminal the
command gets a pty of the guest's own, relayed by the vserver process (lifecycle.relay).
A run-state file (``$VSSTORE_RUNDIR/guests/NAME.json``) keeps init's pid with its start
time, so a reused pid is never taken for the guest.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, NoReturn

from vsstore import runtime
from vsstore.config import Guest, Paths
from vsstore.errors import (
    BusyError,
    ConfigError,
    StateError,
    UnsupportedError,
    VsError,
    from_wire,
    to_wire,
)
from vsstore.lock import exclusive
from vsstore.safetree import GuestTree

from . import (
    boot,
    cgroups,
    console,
    entering,
    helper,
    hooks,
    mounts,
    network,
    ns,
    overlay,
    procdev,
    relay,
    seccomp,
    userns,
)
from .guestconf import GuestConfig, default_caps

TIOCGPTN = 0x80045430  # a pty master's number in its devpts


def stop_config(st: runtime.RunState) -> GuestConfig:
    """The configuration ``stop`` works with (and ``run_in``, for the stop command): what
    the run state recorded at start, not what the configuration files say now (they may
    have changed, or broken, since)."""
    keep = frozenset(st.keep_caps) if st.keep_caps is not None else default_caps()
    return GuestConfig(
        guest=Guest(st.name, Path(st.root), None),
        context=st.context,
        nodename=st.name,
        keep_caps=keep,
        stop=st.stop,
        stop_signal=st.stop_signal,
        stop_timeout=st.stop_timeout,
        nice=st.nice,
        cgroup_dirs=dict(st.cgroup),
        rlimits={int(k): (int(v[0]), int(v[1])) for k, v in st.rlimits.items()},
        seccomp=seccomp.Policy.from_changes(st.seccomp),
    )


def guest_lock(paths: Paths, name: str) -> AbstractContextManager[None]:
    """One command at a time on a guest: start, stop, delete (BusyError otherwise)."""
    return exclusive(paths.rundir / "guests" / f"{name}.lock", f"command on guest {name}")


def start(paths: Paths, cfg: GuestConfig) -> runtime.RunState:
    """Start the guest; returns once its init runs (or raises, leaving nothing behind)."""
    with guest_lock(paths, cfg.name):
        old = runtime.read_state(paths, cfg.name)
        if old is not None:
            if old.running:
                raise StateError(
                    f"guest {cfg.name} is already running (init pid "
                    f"{old.init_pid}); 'vserver {cfg.name} stop' first"
                )
            if old.monitoring:
                raise BusyError(
                    f"guest {cfg.name} is still stopping (monitor pid "
                    f"{old.monitor_pid}); try again in a moment"
                )
            cleanup(paths, old)
        hooks.run(paths, cfg.name, "initialize", cfg.guest.root)
        hooks.run(paths, cfg.name, "prepre-start", cfg.guest.root)
        if cfg.hostnet:
            print(f"vserver {cfg.name}: warning: {network.HOSTNET_WARNING}", file=sys.stderr)
        root = cfg.guest.root
        if not root.is_dir():
            raise ConfigError(
                f"guest {cfg.name}: its root {root} is not a directory; fix "
                f"{cfg.guest.confdir}/vdir"
            )
        with ExitStack() as undo:
            cow_at = None
            source = str(root)
            if cfg.cow:
                cow_at = str(overlay.mountpoint(paths))
                overlay.add(paths, cow_at, cfg.name, str(root))
                undo.callback(overlay.remove, paths, cow_at, cfg.name)
                source = os.path.join(cow_at, cfg.name)
            cfg = dataclasses.replace(cfg, helper=str(helper.binary(paths.statedir)))
            if cfg.wants_userns:
                assert cfg.guest.confdir is not None
                m = userns.resolve(cfg.guest.confdir.parent, cfg.name)
                cfg = dataclasses.replace(cfg, userns=m)
            cg = _make_cgroup(cfg)
            if cg is not None:
                undo.callback(cg.remove)
                undo.callback(cg.kill)
                cfg = dataclasses.replace(cfg, cgroup_dirs={k: str(v) for k, v in cg.dirs.items()})
            if boot.boots(cfg):  # last: where init ends up (joined last), the namespace's root
                d2 = boot.cgroup2_dir(cfg, cg)
                boot.make_cgroup2(d2)
                undo.callback(boot.remove_cgroup2, d2)
                if cfg.userns is not None:  # delegated to guest root, as nspawn -U does
                    boot.delegate_cgroup2(d2, cfg.userns.uid, cfg.userns.gid)
                cfg = dataclasses.replace(
                    cfg, cgroup_dirs={**cfg.cgroup_dirs, boot.CGROUP2_KEY: str(d2)}
                )
            hooks.run(paths, cfg.name, "pre-start", root)
            st = _spawn(paths, cfg, source, cow_at)
            undo.pop_all()
        hooks.run(paths, cfg.name, "post-start", root, st.init_pid)
        return st


def _make_cgroup(cfg: GuestConfig) -> cgroups.GuestCgroup | None:
    """The guest's cgroup with its settings, or None (with a warning) where the host has
    no usable controller: then rlimits alone apply."""
    layout = cgroups.detect()
    if layout.version == 0:
        print(
            f"vserver {cfg.name}: warning: {layout.why}; starting without a cgroup "
            f"(rlimits only{', cgroup/ settings ignored' if not cfg.cgroup.empty() else ''})",
            file=sys.stderr,
        )
        return None
    old = cgroups.existing(layout, cfg.name, cfg.cgroup_parent)
    if old is not None:  # left by a crash
        if old.pids():
            raise BusyError(
                f"guest {cfg.name}'s cgroup {next(iter(old.dirs.values()))} still "
                f"has processes; stop them first"
            )
        old.remove()
    return cgroups.create(layout, cfg.name, cfg.cgroup_parent, cfg.cgroup)


def _log_file(paths: Paths, name: str) -> Path:
    paths.logdir.mkdir(parents=True, exist_ok=True)
    return paths.logdir / f"vserver-{name}.log"


def _spawn(paths: Paths, cfg: GuestConfig, source: str, cow_at: str | None) -> runtime.RunState:
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
        raise from_wire(msg, f"guest {cfg.name} did not start: ")
    return runtime.RunState(**msg["state"])


def _monitor(
    paths: Paths, cfg: GuestConfig, source: str, cow_at: str | None, report: int, log: Path
) -> None:  # pragma: no cover - runs in a forked child
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

    def fail(e: VsError | dict[str, str]) -> NoReturn:
        wire = e if isinstance(e, dict) else to_wire(e)
        say(f"start failed: {wire['error']}")
        os.write(report, json.dumps(wire).encode() + b"\n")
        os.close(report)
        os._exit(1)

    try:
        sfd = seccomp.program_fd(cfg.seccomp)  # init's syscall filter, made on the host
    except VsError as e:
        fail(e)
    up_r, up_w = os.pipe()  # setup -> monitor: unshared (netns ready for veth); init pid
    go_r, go_w = os.pipe()  # monitor -> setup: network configured
    ex_r, ex_w = os.pipe2(os.O_CLOEXEC)  # init -> monitor: why exec failed (EOF: it ran)
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)  # monitor -> init: go on (the overlay knows it)
    con_m, con_i = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    setup = os.fork()  # init -> monitor (con_i -> con_m): its console's pty master
    if setup == 0:
        for f in (up_r, go_w, ex_r, report, gate_w, con_m.detach()):
            os.close(f)
        _setup(cfg, source, up_w, go_r, ex_w, gate_r, con_i.detach(), sfd)
        os._exit(0)
    for f in (up_w, go_r, ex_w, gate_r, con_i.detach(), sfd):
        os.close(f)
    up = os.fdopen(up_r, "rb")
    first = json.loads(up.readline() or b'{"error": "setup died", "class": "VsError"}')
    if "error" in first:
        os.waitpid(setup, 0)
        fail(first)
    hostside: list[str] = []
    try:
        hostside = network.host_side(cfg, first["pid"])
        os.write(go_w, b"go\n")
    except VsError as e:
        os.kill(first["pid"], signal.SIGKILL)
        os.waitpid(setup, 0)
        fail(e)
    os.close(go_w)
    second = json.loads(up.readline() or b'{"error": "setup died", "class": "VsError"}')
    os.waitpid(setup, 0)
    if "error" in second:
        fail(second)
    init = int(second["init"])
    try:  # init waits at its gate: a cow guest's pid namespace is attached first
        if cow_at is not None:
            overlay.attach(paths, cow_at, cfg.name, init)
        os.write(gate_w, b"1")
    except (OSError, VsError) as e:
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        fail(ConfigError(f"cannot attach it to the overlay: {getattr(e, 'message', None) or e}"))
    finally:
        os.close(gate_w)
    why = b""
    while chunk := os.read(ex_r, 4096):
        why += chunk
    os.close(ex_r)
    if why:
        os.kill(init, signal.SIGKILL)  # a sysv/none pid 1 of ours would wait for ever
        os.waitpid(init, 0)
        fail(ConfigError(_init_failure(cfg, why)))
    masters = console.receive_masters(con_m)
    con_m.close()
    st = runtime.RunState(
        name=cfg.name,
        init_pid=init,
        init_start=runtime.start_time(init) or 0,
        monitor_pid=os.getpid(),
        monitor_start=runtime.start_time(os.getpid()) or 0,
        root=str(cfg.guest.root),
        cow=cow_at,
        started=time.time(),
        context=cfg.context,
        reaper=cfg.style in ("sysv", "none"),
        style=cfg.style,
        cgroup=dict(cfg.cgroup_dirs),
        stop=cfg.stop,
        stop_signal=int(cfg.stop_signal),
        stop_timeout=cfg.stop_timeout,
        keep_caps=sorted(cfg.keep_caps),
        nice=cfg.nice,
        rlimits={str(k): list(v) for k, v in cfg.rlimits.items()},
        seccomp=cfg.seccomp.changes(),
        userns=cfg.userns.to_list() if cfg.userns is not None else None,
    )
    runtime.write_state(paths, st)
    say(f"started: style {cfg.style}, init pid {init} ({' '.join(cfg.init) or 'our reaper'})")
    if cfg.userns is not None:
        say(
            f"user namespace: guest uids 0..{cfg.userns.uid_count - 1} are host uids "
            f"{cfg.userns.uid}..{cfg.userns.uid + cfg.userns.uid_count - 1}"
        )
    if cfg.hostnet:
        say(f"warning: {network.HOSTNET_WARNING}")
    con = None
    if masters:
        try:
            con = console.Server(masters, 1, console.socket_path(paths, cfg.name))
        except OSError as e:
            say(f"warning: no console ({e.strerror}); its output is lost")
            for m in masters:
                os.close(m)
    os.write(report, json.dumps({"state": st.__dict__}).encode() + b"\n")
    os.close(report)
    status = _wait_init(init, con)
    code = os.waitstatus_to_exitcode(status)
    say(f"init ended ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}); cleaning up")
    for dev in hostside:
        subprocess.run(["ip", "link", "del", dev], capture_output=True)
    cleanup(paths, st)
    say("stopped")


def _wait_init(init: int, con: console.Server | None) -> int:  # pragma: no cover - monitor
    """Reap init, and whatever else a subreaper inherits, meanwhile serving the console;
    returns init's wait status."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the poll below
    status = 0
    try:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == init:
                break
            if pid != 0:
                continue  # another one reaped; there may be more
            p = select.poll()
            p.register(wake_r, select.POLLIN)
            if con is not None:
                con.register(p)
            for fd, ev in p.poll():
                if fd == wake_r:
                    while True:
                        try:
                            if not os.read(wake_r, 512):
                                break
                        except BlockingIOError:
                            break
                elif con is not None:
                    con.handle(fd, ev)
    finally:
        signal.set_wakeup_fd(-1)
        if con is not None:
            con.close()  # what init wrote last goes to the log
        os.close(wake_r)
        os.close(wake_w)
    return status


def _setup(
    cfg: GuestConfig,
    source: str,
    up: int,
    go: int,
    exec_fd: int,
    gate: int,
    con: int,
    sfd: int,
) -> None:  # pragma: no cover - runs in a forked child
    """In new namespaces: mounts, network, hostname; then fork init (``sfd``: its syscall
    filter, lifecycle.seccomp)."""

    def tell(msg: dict[str, Any]) -> None:
        os.write(up, json.dumps(msg).encode() + b"\n")

    # The pid namespace comes last, just before init is forked: the first child forked
    # after it becomes its pid 1 (the network set-up runs the host's ip before that).
    # In a user namespace (cfg.userns) the mounts are made first, with the host's rights
    # (an idmapped root needs them), then we become the guest's root and make the uts, ipc,
    # net and pid namespaces, so they belong to the guest's user namespace.
    tree = None
    try:
        owner = (cfg.userns.uid, cfg.userns.gid) if cfg.userns is not None else None
        assert cfg.helper is not None
        hfd = helper.load(cfg.helper, owner)  # a guest root could not read our copy
        if cfg.userns is None:
            network.unshare(cfg, ns.CLONE_NEWNS | ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
            ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
        else:
            ufd = userns.create(cfg.userns)
            ns.unshare(ns.CLONE_NEWNS)
            ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
            tree = mounts.bind_root(cfg, source, ufd)
            cg = cgroups.of(cfg.cgroup_dirs)
            if cg is not None:
                cg.join()  # with the host's rights, while we have them
            userns.enter(ufd)
            os.close(ufd)
            network.unshare(cfg, ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
    except VsError as e:
        tell(to_wire(e))
        return
    except OSError as e:
        tell(
            to_wire(
                UnsupportedError(
                    f"cannot create namespaces: {e.strerror}; this kernel "
                    f"or our privileges lack them"
                )
            )
        )
        return
    tell({"pid": os.getpid()})
    if os.read(go, 16) != b"go\n":
        return  # the monitor gave up
    try:
        network.guest_side(cfg)
        if tree is None:
            tree = mounts.bind_root(cfg, source)
            cg = cgroups.of(cfg.cgroup_dirs)
            if cg is not None:
                cg.join()  # init and everything it starts are charged to the guest
        ns.set_uts(cfg.nodename, cfg.domainname)
        ns.unshare(ns.CLONE_NEWPID | (boot.CLONE_NEWCGROUP if boot.boots(cfg) else 0))
    except (OSError, VsError) as e:
        tell(to_wire(e if isinstance(e, VsError) else ConfigError(str(e))))
        return
    init = os.fork()
    if init == 0:
        os.close(up)
        if os.read(gate, 1) != b"1":  # the monitor attaches our pid namespace first
            os._exit(127)
        os.close(gate)
        try:
            _init(cfg, tree, hfd, exec_fd, con, sfd)
        except BaseException as e:  # noqa: BLE001 - reported to the monitor
            os.write(exec_fd, (getattr(e, "message", None) or str(e)).encode())
        os._exit(127)
    os.close(con)
    tell({"init": init})


def _init(
    cfg: GuestConfig, tree: GuestTree, hfd: int, exec_fd: int, con: int, sfd: int
) -> None:  # pragma: no cover
    """pid 1 of the guest until the helper takes over: its own mount namespace (the pivot
    must move no other process's root: setup's Python still runs), /proc, /dev,
    pivot_root, and the helper by descriptor, which becomes the guest's init (sysv/none:
    forks it, or not, and stays as the reaping pid 1 without capabilities)."""
    ns.prctl(ns.PR_SET_DUMPABLE, 0)
    mode = cfg.style if cfg.style in ("sysv", "none") else "init"
    env = {"PATH": helper.GUEST_PATH, "container": "vserver", "HOME": "/", "TERM": "linux"}
    tree = mounts.own_mount_ns(tree, cfg.userns is not None)
    procdev.mount_proc_and_dev(cfg, tree)
    slave, ttys = _consoles(tree, con, cfg.ttys)
    if ttys:  # systemd starts a getty on each (container-getty@N)
        env["container_ttys"] = " ".join(ttys)
    if boot.boots(cfg):
        boot.prepare(cfg, tree)
    hfd, placed = helper.place_fds(hfd, {0: slave, 1: slave, 2: slave}, exec_fd, (sfd,))
    args = helper.argv(mode, cfg, cfg.init, detach=True, seccomp=placed[0])
    helper.pivot_and_exec(tree, hfd, args, env)


def _consoles(tree: GuestTree, con: int, ttys: int) -> tuple[int, list[str]]:  # pragma: no cover
    """/dev/console and /dev/tty1..``ttys``: new ptys of the guest's devpts, each slave
    bound over an empty file on our /dev (tmpfs); the masters go to the monitor.  Returns
    the console's slave (init's stdin, stdout and stderr) and the ttys' names in devpts
    (pts/N, for systemd's container_ttys)."""
    masters: list[int] = []
    names: list[str] = []
    dev = tree.open_in_root("dev", os.O_RDONLY | os.O_DIRECTORY)  # our tmpfs, just mounted
    try:
        for i in range(ttys + 1):
            master, slave = relay.open_pty(tree.fd)
            masters.append(master)
            name = "console" if i == 0 else f"tty{i}"
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dev,
            )
            try:
                ns.mount(f"/proc/self/fd/{slave}", f"/proc/self/fd/{fd}", None, ns.MS_BIND)
            finally:
                os.close(fd)
            if i == 0:
                console_slave = slave
            else:
                n = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
                names.append(f"pts/{n}")
                os.close(slave)
    finally:
        os.close(dev)
    with socket.socket(fileno=con) as s:
        console.send_masters(s, masters)
    for m in masters:
        os.close(m)
    return console_slave, names


def _init_failure(cfg: GuestConfig, raw: bytes) -> str:
    step, text = helper.failure(raw) or ("enter", "")
    if step == "exec":
        return (
            f"cannot run {cfg.init[0]} inside the guest: {text}; fix apps/init/cmd.start "
            f"or apps/init/style"
        )
    return text


def _close_fds_but(*keep: int) -> None:
    """(The monitor's, on the host: it lists the host's /proc.)"""
    for n in os.listdir("/proc/self/fd"):
        fd = int(n)
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _wait_gone(pid: int, started: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for a process (not our child) to end."""
    try:
        pfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if not runtime.alive(pid, started):
            return True
        select.select([pfd], [], [], timeout)
        return not runtime.alive(pid, started)
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
        if runtime.alive(pid, started):
            signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        pass  # ended just now
    finally:
        os.close(fd)


def _catches(pid: int, sig: int, blocked: bool = False) -> bool:
    """Has process ``pid`` a handler for ``sig`` (SigCgt in /proc/PID/status)?  With
    ``blocked``, a blocked ``sig`` counts too: an init that takes its signals from a
    signalfd (systemd, our reaper) blocks them for good, and a blocked signal is queued.
    (Not for any init: a shell blocks signals for a moment while it forks, and a signal
    queued then with no handler is dropped when unblocked.)"""
    want = ("SigCgt:", "SigBlk:") if blocked else ("SigCgt:",)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(want) and int(line.split()[1], 16) >> (sig - 1) & 1:
                    return True
    except OSError:
        pass
    return False


def _wait_handler(pid: int, started: int, sig: int, deadline: float, blocked: bool) -> None:
    """Wait (up to ``deadline``) until init has a handler for ``sig``: a pid namespace's
    init never gets a signal it has no handler for, not even from the host, and right
    after start it may not have installed it yet (a signal sent then would be lost, and
    stop would wait for its whole timeout).  SIGKILL and SIGSTOP need no handler."""
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        return
    while (
        runtime.alive(pid, started)
        and not _catches(pid, sig, blocked)
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)


def stop(paths: Paths, name: str) -> None:
    """Stop the guest: its stop command or signal, then after the timeout SIGKILL to its
    init (which takes every process of the pid namespace with it); then the monitor's
    clean-up (its cgroup ends whatever is left; done here if the monitor is gone).
    Everything comes from the run state, so a configuration changed or broken since the
    start never keeps a running guest from stopping."""
    with guest_lock(paths, name):
        st = runtime.read_state(paths, name)
        if st is None or not st.running:
            if st is not None and not st.monitoring:
                cleanup(paths, st)
            raise StateError(f"guest {name} is not running")
        hooks.run(paths, name, "pre-stop", st.root, st.init_pid)
        cfg = stop_config(st)
        deadline = time.monotonic() + cfg.stop_timeout
        if cfg.stop:
            try:
                entering.run_in(paths, cfg, st, cfg.stop, timeout=cfg.stop_timeout)
            except VsError:
                pass  # a failing stop command: the signal and the kill still follow
        _wait_handler(
            st.init_pid,
            st.init_start,
            cfg.stop_signal,
            deadline,
            blocked=st.reaper or st.style == "systemd",
        )
        _signal(st.init_pid, st.init_start, cfg.stop_signal)
        if not _wait_gone(st.init_pid, st.init_start, max(0.0, deadline - time.monotonic())):
            cg = cgroups.of(st.cgroup)
            if cg is not None:
                cg.kill()  # every process of the guest, wherever it went
            _signal(st.init_pid, st.init_start, signal.SIGKILL)
            _wait_gone(st.init_pid, st.init_start, 30)
        # The monitor reaps init and cleans up: its cgroup's kill ends whatever outlived
        # init (one killer at a time: the monitor's, or ours below when it is gone).
        if not _wait_gone(st.monitor_pid, st.monitor_start, 30):
            _signal(st.monitor_pid, st.monitor_start, signal.SIGKILL)
            _wait_gone(st.monitor_pid, st.monitor_start, 5)
        if runtime.read_state(paths, name) is not None:
            cleanup(paths, st)
        hooks.run(paths, name, "post-stop", st.root)
        hooks.run(paths, name, "postpost-stop", st.root)


def cleanup(paths: Paths, st: runtime.RunState) -> None:
    """What is left of a guest whose init has ended: its processes (by its cgroup), its
    cgroup, its overlay share and run state."""
    cg = cgroups.of(st.cgroup)
    if cg is not None:
        try:
            cg.kill()
            cg.remove()
        except OSError as e:
            print(f"vserver {st.name}: cannot remove its cgroup: {e}", file=sys.stderr)
    if st.cow:
        try:
            overlay.remove(paths, st.cow, st.name)
        except VsError as e:
            print(f"vserver {st.name}: {e.message}", file=sys.stderr)
    cur = runtime.read_state(paths, st.name)
    if cur is not None and cur.init_pid == st.init_pid:
        console.socket_path(paths, st.name).unlink(missing_ok=True)
        runtime.state_file(paths, st.name).unlink(missing_ok=True)
