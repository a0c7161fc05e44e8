"""Entering a running guest (``exec``, ``enter``) and ``exec --cow``: the guest's
namespaces joined (or new ones), its root (or its share of the overlay), its cgroup, then
the static helper by descriptor, which does the last steps; on a terminal through a pty of
the guest's own (``relay``)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import ExitStack
from typing import NoReturn

from vsstore import runtime
from vsstore.config import Paths
from vsstore.errors import (
    ConfigError,
    StateError,
    VsError,
    from_wire,
    to_wire,
)
from vsstore.safetree import GuestTree

from . import cgroups, helper, mounts, network, ns, overlay, procdev, relay, seccomp, userns
from .guestconf import GuestConfig
from .users import GuestUser


class CommandError(ConfigError):
    """The command could not be executed inside the guest: exit 127 when it is not found,
    126 when it is found but cannot be executed (as a shell says it)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def _open_guest(cfg: GuestConfig, st: runtime.RunState, kinds: tuple[str, ...]) -> dict[str, int]:
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
        raise StateError(
            f"guest {cfg.name}: cannot join it ({e.strerror}); is it running?"
        ) from None
    return fds


def _ours(kind: str, fd: int) -> bool:
    """Whether namespace descriptor ``fd`` is our own namespace of ``kind``."""
    a, b = os.fstat(fd), os.stat(f"/proc/self/ns/{kind}")
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _join_guest(st: runtime.RunState, fds: dict[str, int]) -> None:  # pragma: no cover - child
    """Join the guest's cgroup (charged to it, ended with it) and then the namespaces in
    ``fds``; pid takes effect for the children."""
    cg = cgroups.of(st.cgroup)
    if cg is not None:
        cg.join()
    for kind in ("ipc", "uts", "net", "pid", "mnt"):
        if kind in fds:
            ns.setns(fds[kind])


def _command_env(user: GuestUser | None = None) -> dict[str, str]:
    env = {
        "PATH": helper.GUEST_PATH,
        "HOME": "/root",
        "container": "vserver",
        "TERM": os.environ.get("TERM", "dumb"),
    }
    if user is not None:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
    return env


def _read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 4096):
        out += chunk
    return out


def _outcome(cfg: GuestConfig, argv: list[str], status: int, ex_r: int) -> int:
    """The command's exit code (128+N for a signal), or the error why it never ran: the
    helper's (a step and an errno) or our forked child's (its class and message)."""
    raw = _read_all(ex_r)
    if raw.startswith(b"{"):
        raise from_wire(json.loads(raw), f"cannot enter guest {cfg.name}: ")
    why = helper.failure(raw)
    if why is not None:
        step, text = why
        if step == "exec":
            raise CommandError(
                f"cannot run {argv[0]} inside guest {cfg.name}: {text}",
                helper.exec_code(raw) or 126,
            )
        raise ConfigError(f"cannot enter guest {cfg.name}: {text}")
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run_in(
    paths: Paths,
    cfg: GuestConfig,
    st: runtime.RunState,
    argv: list[str],
    timeout: float | None = None,
    user: GuestUser | None = None,
) -> int:
    """Run ``argv`` inside the running guest: its namespaces, root and reduced capabilities,
    a new session; as ``user`` of the guest if given (suexec; its home as HOME).  Python
    opens what it needs on the host (namespaces, root, the helper, a pty from the guest's
    devpts when stdin, stdout or stderr is a terminal) and a forked child executes the
    static helper (lifecycle.helper), which enters and runs the command; this process
    relays the pty (lifecycle.relay).  Returns its exit code (128+N for a
    signal)."""
    if not argv:
        raise ConfigError("no command given; vserver NAME exec COMMAND [ARGS...]")
    # cgroup: a booted guest's; user (first: the others belong to it): a guest with a user
    # namespace, joined as its root (host ids START+0), never as the host's
    idmap = userns.IdMap.from_list(st.userns)
    spaces: tuple[str, ...] = ("ipc", "uts", "net", "pid", "cgroup", "mnt")
    if idmap is not None:
        spaces = ("user", *spaces)
    kinds = (*spaces, "root")
    ids = (user.uid, user.gid, user.groups) if user is not None else None
    if idmap is not None and ids is None:
        ids = (0, 0, ())  # the guest's root, not the host's (unmapped) uid 0
    with ExitStack() as stack:
        hfd = helper.load(helper.binary(paths.statedir))
        stack.callback(os.close, hfd)
        sfd = seccomp.program_fd(cfg.seccomp)
        stack.callback(os.close, sfd)
        fds = _open_guest(cfg, st, kinds)
        for fd in fds.values():
            stack.callback(os.close, fd)
        # A namespace the guest shares with us (a cgroup namespace it has none of, the
        # host's net with spaces/hostnet) is not joined: from inside a user namespace we
        # could not join one of the host's, and it would change nothing.
        spaces = tuple(k for k in spaces if not _ours(k, fds[k]))
        kinds = (*spaces, "root")
        stdio = relay.Stdio.probe()
        master = slave = None
        if stdio.any:
            master, slave = relay.open_pty(fds["root"])
            stack.callback(os.close, master)
            if idmap is not None:  # the guest's, not a host file its root cannot use
                os.fchown(slave, idmap.uid + (user.uid if user else 0), -1)
            relay.copy_settings(stdio, slave)
        ex_r, ex_w = os.pipe2(os.O_CLOEXEC)
        stack.callback(os.close, ex_r)
        child = os.fork()
        if child == 0:  # pragma: no cover - child
            try:
                os.setpgid(0, 0)  # signals from the terminal come through us, once
                cg = cgroups.of(st.cgroup)
                if cg is not None:
                    cg.join()  # charged to the guest, ended with it
                std = {i: slave for i in range(3) if stdio.tty[i]} if slave is not None else {}
                prog, placed = helper.place_fds(hfd, std, ex_w, (*(fds[k] for k in kinds), sfd))
                n = len(spaces)
                args = helper.argv(
                    "exec",
                    cfg,
                    argv,
                    setns=tuple(placed[:n]),
                    root=placed[n],
                    ctty=stdio.ctty if std else None,
                    ids=ids,
                    seccomp=placed[n + 1],
                )
                os.execve(prog, args, _command_env(user))
            except BaseException as e:  # noqa: BLE001
                os.write(ex_w, json.dumps(to_wire(e)).encode())
            os._exit(127)
        os.close(ex_w)
        if slave is not None:
            os.close(slave)
        try:
            status = relay.run(child, master, stdio, timeout)
        except relay.Timeout:
            raise StateError(
                f"guest {cfg.name}: {argv[0]} took longer than {timeout:g} s"
            ) from None
        return _outcome(cfg, argv, status, ex_r)
    raise AssertionError("unreachable")


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
    st = runtime.running(paths, cfg.name)
    if st is not None and st.cow:
        return run_in(paths, cfg, st, argv)  # it runs through the overlay already
    if cfg.wants_userns or (st is not None and st.userns):
        raise ConfigError(
            f"guest {cfg.name} has a user namespace (userns/), and the cow overlay cannot "
            f"serve one (FUSE mounts take no idmap with pyfuse3); run the command without "
            f"--cow on the running guest, or 'vserver {cfg.name} userns disable' first"
        )
    cow_at = str(overlay.mountpoint(paths))
    share = f"{cfg.name}~{os.getpid()}"
    with ExitStack() as stack:
        hfd = helper.load(helper.binary(paths.statedir))
        stack.callback(os.close, hfd)
        sfd = seccomp.program_fd(cfg.seccomp)
        stack.callback(os.close, sfd)
        overlay.sweep_temporary(paths, cow_at)
        overlay.add(paths, cow_at, share, str(cfg.guest.root))

        def remove_share() -> None:
            try:
                overlay.remove(paths, cow_at, share)
            except VsError as e:
                print(f"vserver: {e.message}", file=sys.stderr)

        stack.callback(remove_share)
        return _run_temporary(
            cfg,
            st,
            os.path.join(cow_at, share),
            argv,
            (hfd, sfd),
            lambda pid: overlay.attach(paths, cow_at, share, pid),
        )


def _run_temporary(
    cfg: GuestConfig,
    st: runtime.RunState | None,
    source: str,
    argv: list[str],
    progs: tuple[int, int],
    attach: Callable[[int], None],
) -> int:
    """The command in the guest's (or new) namespaces, its root the overlay's share
    ``source``; ``attach(pid)`` tells the overlay that ``pid``'s pid namespace is the
    share's, before anything runs in it; ``progs``: the helper's and the filter's
    descriptors."""
    fds = _open_guest(cfg, st, ("ipc", "uts", "net", "pid")) if st is not None else {}
    stdio = relay.Stdio.probe()
    # On a terminal: the leader opens a pty in the devpts it mounts and hands us the master.
    back, fwd = (
        socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if stdio.any else (None, None)
    )
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
                network.unshare(cfg, ns.CLONE_NEWUTS | ns.CLONE_NEWIPC)
                ns.set_uts(cfg.nodename, cfg.domainname)
                ns.unshare(ns.CLONE_NEWPID)
            ns.unshare(ns.CLONE_NEWNS)
            ns.mount(None, "/", None, ns.MS_REC | ns.MS_SLAVE)
            tree = mounts.bind_root(cfg, source)
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
            leader = os.fork()  # in the guest's pid namespace (or pid 1 of a new one)
            if leader == 0:
                os.close(gate_w)
                if os.read(gate_r, 1) != b"1":  # attached to the overlay first
                    os._exit(127)
                os.close(gate_r)
                _lead(cfg, tree, argv, stdio, fwd, ex_w, progs)
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
                os.write(ex_w, json.dumps(to_wire(e)).encode())
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


def _lead(
    cfg: GuestConfig,
    tree: GuestTree,
    argv: list[str],
    stdio: relay.Stdio,
    sock: socket.socket | None,
    ex_w: int,
    progs: tuple[int, int],
) -> NoReturn:  # pragma: no cover
    """The command's leader, in the guest's pid namespace: a mount namespace of its own (the
    pivot must not move the root of the Python that waits for it), /proc and /dev, on a
    terminal a pty from this devpts (the master to the vserver process), pivot_root, and
    the hfd, which forks the command (never a pid 1, which would ignore signals) and
    waits for it (reaping, as a pid 1)."""
    try:
        tree = mounts.own_mount_ns(tree)
        procdev.mount_proc_and_dev(cfg, tree)
        std: dict[int, int] = {}
        if sock is not None:
            master, slave = relay.open_pty(tree.fd)
            socket.send_fds(sock, [b"pty"], [master])
            os.close(master)
            sock.recv(1)  # the vserver process has set its size and mode
            sock.close()
            std = {i: slave for i in range(3) if stdio.tty[i]}
        prog, placed = helper.place_fds(progs[0], std, ex_w, (progs[1],))
        args = helper.argv(
            "exec",
            cfg,
            argv,
            detach=True,
            ctty=stdio.ctty if std else None,
            seccomp=placed[0],
        )
        helper.pivot_and_exec(tree, prog, args, _command_env())
    except BaseException as e:  # noqa: BLE001
        os.write(ex_w, json.dumps(to_wire(e)).encode())
    os._exit(127)
