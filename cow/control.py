"""Start, stop and steer overlay daemons: the Python API that ``vscow`` and the lifecycle
share.  Each mount has a state file in the run directory (pid, mount point, guests, control
socket; see ``vsstore.runtime``), so any later command finds the daemon serving it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from vsstore.config import Paths
from vsstore.errors import ConfigError
from vsstore.runtime import cow_state_file, write_cow_state


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, source) of every vscow mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, source = right.split()[:2]
            if fstype == "fuse.vscow":
                out.append((left.split()[4], source))
    return out


def is_mounted(at: str) -> bool:
    at = os.path.abspath(at)
    return any(m == at for m, _ in mounts())


def state(paths: Paths, at: str) -> dict[str, Any] | None:
    """The state file of the overlay at ``at``, or None when it has none."""
    try:
        return json.loads(cow_state_file(paths, os.path.abspath(at)).read_text())
    except (OSError, ValueError):
        return None


_held: dict[str, int] = {}


@contextlib.contextmanager
def state_lock(paths: Paths, at: str) -> Iterator[None]:
    """Serialise changes to one overlay between commands: its state file's
    read-modify-write (two ``exec --cow`` at once must not lose each other's guest) and
    the choice between mounting it and adding to it.  Re-entrant within a process."""
    lock = str(cow_state_file(paths, os.path.abspath(at)).with_suffix(".lock"))
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[lock] = 1
        yield
    finally:
        _held.pop(lock, None)
        os.close(fd)


def mount(paths: Paths, at: str, guests: dict[str, str], log: str | None = None) -> dict[str, Any]:
    """Mount one overlay at ``at`` serving ``guests`` (name -> root) and return once it is
    ready; the daemon stays in the background, logging to ``log`` (default: vscow.log in
    the log directory).  Returns the state written for it."""
    at = os.path.abspath(at)
    if not os.path.isdir(at):
        raise ConfigError(f"--at {at}: not a directory; create the mount point first")
    if is_mounted(at):
        raise ConfigError(f"{at}: a vscow overlay is mounted there already")
    if log is None:
        paths.logdir.mkdir(parents=True, exist_ok=True)
        log = str(paths.logdir / "vscow.log")
    immutable = os.geteuid() == 0
    r, w = os.pipe()
    state_file = cow_state_file(paths, at)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    control = str(state_file.with_suffix(".sock"))
    record = {"mountpoint": at, "guests": guests, "control": control, "log": log}
    cmd = [
        sys.executable,
        "-c",
        "import sys, json; from cow.mount import serve; "
        "serve(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == '1', int(sys.argv[4]), "
        "sys.argv[5], sys.argv[6], json.loads(sys.argv[7]))",
        at,
        json.dumps(guests),
        "1" if immutable else "0",
        str(w),
        control,
        str(state_file),
        json.dumps(record),
    ]
    try:
        logf = open(log, "ab")
    except OSError as e:
        raise ConfigError(f"--log {log}: {e.strerror}; give a writable file") from None
    with logf:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            cwd="/",
        )
    os.close(w)
    ready = os.read(r, 16)
    os.close(r)
    if ready != b"ok\n":
        proc.wait(timeout=10)
        raise ConfigError(
            f"the overlay did not come up at {at} (exit {proc.returncode}); see its log {log}"
        )
    # the daemon wrote the state file itself before saying ok: it exists whenever the
    # mount does, even if this command is killed right now
    return {**record, "pid": proc.pid}


def _ask(
    paths: Paths, at: str, request: dict[str, str], fds: tuple[int, ...] = ()
) -> dict[str, Any]:
    """Send one request to the daemon serving ``at`` (with ``fds`` passed along); its state
    file says where."""
    st = state(paths, at)
    if st is None:
        raise ConfigError(f"{at}: no vscow overlay of ours is mounted there")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        try:
            s.connect(st["control"])
            line = json.dumps(request).encode() + b"\n"
            if fds:
                socket.send_fds(s, [line], list(fds))
            else:
                s.sendall(line)
            answer = json.loads(s.makefile("rb").readline())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{at}: the overlay's daemon does not answer ({e})") from None
    if not answer.get("ok"):
        raise ConfigError(f"{at}: {answer.get('error')}")
    return st


def attach(paths: Paths, at: str, name: str, pidns_fd: int) -> None:
    """Tell the overlay at ``at`` that processes in the pid namespace ``pidns_fd`` (and
    in namespaces nested in it) are guest ``name``'s: the only thing by which it tells
    guests apart (a path a process reports can be shaped by the guest)."""
    _ask(paths, at, {"op": "attach", "name": name}, (pidns_fd,))


def add(paths: Paths, at: str, name: str, root: str) -> None:
    """Serve one more guest in the running overlay at ``at``."""
    with state_lock(paths, os.path.abspath(at)):
        st = _ask(paths, at, {"op": "add", "name": name, "root": root})
        st["guests"][name] = root
        write_cow_state(cow_state_file(paths, os.path.abspath(at)), st)


def remove(paths: Paths, at: str, name: str) -> dict[str, str]:
    """Stop serving guest ``name``; returns the guests still served."""
    with state_lock(paths, os.path.abspath(at)):
        st = _ask(paths, at, {"op": "remove", "name": name})
        st["guests"].pop(name, None)
        write_cow_state(cow_state_file(paths, os.path.abspath(at)), st)
    return dict(st["guests"])


def umount(paths: Paths, at: str, lazy: bool = False) -> None:
    """Unmount the overlay at ``at`` and wait for its daemon to end."""
    at = os.path.abspath(at)
    if not is_mounted(at):
        raise ConfigError(f"{at}: no vscow overlay is mounted there")
    p = subprocess.run(
        ["fusermount3", "-u", *(["-z"] if lazy else []), at], capture_output=True, text=True
    )
    if p.returncode != 0:
        raise ConfigError(
            f"{at}: cannot unmount ({p.stderr.strip()}); is something using it? (fuser -vm {at})"
        )
    st = state(paths, at)
    pid = int(st.get("pid", 0)) if st else 0
    for _ in range(200):  # the daemon ends once the kernel has let go of the mount
        if not is_mounted(at) and (not pid or _ended(pid)):
            cow_state_file(paths, at).unlink(missing_ok=True)
            return
        time.sleep(0.05)
    raise ConfigError(
        f"{at}: still mounted or its daemon (pid {pid}) still running; is something using it?"
    )


def _ended(pid: int) -> bool:
    """Has the daemon ended?  It may be our own child (mounted by this process, as
    ``vserver`` does): then collect it, or it would stay a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not ours
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
