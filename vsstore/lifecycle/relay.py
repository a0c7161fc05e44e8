"""The admin's terminal and a command in a guest: a new pty, relayed on the host side.

A guest process that holds a descriptor of the admin's terminal can push input into it
(TIOCSTI: ``exit`` and then any command for the host's shell) or read what is typed.  So
the admin's terminal never goes into a guest: when any of stdin, stdout, stderr is a
terminal, the command gets a pty pair allocated from the guest's own devpts instance for
those, and the ``vserver`` process copies bytes between the pty's master and the terminal
(what ``machinectl shell`` and util-vserver's vlogin do).  With stdin on the terminal, the
terminal goes to raw mode for the duration, so Ctrl-C and friends travel as bytes and the
guest's line discipline turns them into signals for its own foreground process group;
window size follows SIGWINCH.  The terminal's mode is restored on every way out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import stat
import struct
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeAlias

from vsstore import syscalls
from vsstore.errors import UnsafeTreeError, UnsupportedError

DEVPTS_SUPER_MAGIC = 0x1CD1
TIOCSPTLCK = 0x40045431  # lock or unlock a pty slave (unlockpt)
TIOCGPTPEER = 0x5441  # open the slave of this master without a path lookup (Linux 4.13)
PTMX = os.makedev(5, 2)
FORWARDED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
CHUNK = 65536

Handler: TypeAlias = Callable[[int, FrameType | None], Any]  # a signal handler


@dataclass(frozen=True)
class Stdio:
    """Which of the descriptors the command would get as 0, 1, 2 is a terminal."""

    fds: tuple[int, int, int]
    tty: tuple[bool, bool, bool]

    @classmethod
    def probe(cls, fds: tuple[int, int, int] = (0, 1, 2)) -> Stdio:
        return cls(fds, (os.isatty(fds[0]), os.isatty(fds[1]), os.isatty(fds[2])))

    @property
    def any(self) -> bool:
        return any(self.tty)

    @property
    def ctty(self) -> int | None:
        """The command's descriptor that gets the pty as its controlling terminal."""
        return next((i for i in range(3) if self.tty[i]), None)

    @property
    def input(self) -> int | None:
        """The admin's terminal we read keys from (and set to raw mode), if stdin is one."""
        return self.fds[0] if self.tty[0] else None

    @property
    def output(self) -> int | None:
        """Where the pty's output goes: stdout or stderr if a terminal, else the input
        terminal itself when it is open for writing (echo), else nowhere."""
        for i in (1, 2):
            if self.tty[i]:
                return self.fds[i]
        if self.tty[0] and fcntl.fcntl(self.fds[0], fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
            return self.fds[0]
        return None

    @property
    def size_from(self) -> int | None:
        return next((self.fds[i] for i in range(3) if self.tty[i]), None)


def open_pty(dirfd: int, ptmx: str = "dev/pts/ptmx") -> tuple[int, int]:
    """(master, slave) of a new pty from the devpts instance at ``ptmx`` below the root
    ``dirfd`` (a guest's root: resolved inside it, no symlinks; it must be a devpts ptmx,
    so a guest cannot hand us a FIFO, a device of its choosing or a FUSE file).  The slave
    comes from the master (TIOCGPTPEER), not from a path.  Both close-on-exec."""
    if not syscalls.have_openat2():
        raise UnsupportedError(
            "this kernel lacks openat2 (Linux 5.6), needed to open a guest's pty safely"
        )
    try:
        ref = syscalls.openat2(
            dirfd,
            ptmx,
            os.O_PATH,
            syscalls.RESOLVE_IN_ROOT
            | syscalls.RESOLVE_NO_SYMLINKS
            | syscalls.RESOLVE_NO_MAGICLINKS,
        )
    except OSError as e:
        raise UnsafeTreeError(
            f"the guest's /{ptmx}: {e.strerror}; is its /dev/pts mounted?"
        ) from None
    try:
        st = os.fstat(ref)
        if (
            syscalls.fs_type(ref) != DEVPTS_SUPER_MAGIC
            or not stat.S_ISCHR(st.st_mode)
            or st.st_rdev != PTMX
        ):
            raise UnsafeTreeError(
                f"the guest's /{ptmx} is not the ptmx of a devpts instance; not using it"
            )
        master = os.open(f"/proc/self/fd/{ref}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(ref)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def copy_settings(stdio: Stdio, pty: int) -> None:
    """The admin's terminal settings (when stdin is one) and window size onto the pty
    (``pty``: its master or its slave)."""
    if stdio.input is not None:
        try:
            termios.tcsetattr(pty, termios.TCSANOW, termios.tcgetattr(stdio.input))
        except termios.error:
            pass
    _copy_size(stdio, pty)


def _copy_size(stdio: Stdio, pty: int) -> None:
    src = stdio.size_from
    if src is None:
        return
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(pty, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def _raw(attrs: list[Any]) -> list[Any]:
    """cfmakeraw(3)."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(
        termios.IGNBRK
        | termios.BRKINT
        | termios.PARMRK
        | termios.ISTRIP
        | termios.INLCR
        | termios.IGNCR
        | termios.ICRNL
        | termios.IXON
    )
    oflag &= ~termios.OPOST
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


@contextmanager
def _signals(handlers: dict[int, Handler]) -> Iterator[None]:
    old = {sig: signal.signal(sig, h) for sig, h in handlers.items()}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


ANSWER_QUIET = 0.1  # after the command: input is dropped until the terminal is this quiet
ANSWER_MAX = 1.0  # (seconds), at most this long


def _drop_answers(fd: int) -> None:
    """Read and drop what the terminal still sends: its answers to queries the guest printed
    last (cursor position, device attributes, a title report...) arrive after the command
    has ended and would otherwise be read by the host's shell as typed input."""
    end = time.monotonic() + ANSWER_MAX
    while (left := end - time.monotonic()) > 0:
        if not select.select([fd], [], [], min(ANSWER_QUIET, left))[0]:
            return
        try:
            if not os.read(fd, CHUNK):
                return
        except OSError:
            return


@contextmanager
def _raw_mode(fd: int | None, master: int | None, stdio: Stdio | None) -> Iterator[None]:
    """The input terminal in raw mode until the block ends (also by an exception or a
    forwarded signal); input left unread then (typed ahead, or a terminal's answer to an
    escape sequence the guest printed) is dropped, never passed to the host's shell."""
    if fd is None:
        yield
        return
    saved = termios.tcgetattr(fd)

    def again(signum: int, frame: object) -> None:  # SIGCONT: after a stop, the shell
        try:  # may have reset the terminal
            termios.tcsetattr(fd, termios.TCSADRAIN, _raw(saved))
            if master is not None and stdio is not None:
                _copy_size(stdio, master)
        except termios.error:
            pass

    termios.tcsetattr(fd, termios.TCSADRAIN, _raw(saved))
    try:
        with _signals({signal.SIGCONT: again}):
            yield
    finally:
        try:
            _drop_answers(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            termios.tcflush(fd, termios.TCIFLUSH)
        except termios.error:
            pass


def _write_all(fd: int | None, data: bytes) -> None:
    if fd is None:
        return
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return  # the admin's side is gone; the command still ends normally


class Timeout(Exception):
    """The command ran past its deadline (and was killed)."""


def run(
    pid: int, master: int | None = None, stdio: Stdio | None = None, timeout: float | None = None
) -> int:
    """Wait for our child ``pid`` (the helper's waiting half), passing HUP, INT, QUIT and
    TERM on to it; with a pty ``master``, relay between it and the admin's terminal
    (``stdio``) until the child is gone and the master drained.  Returns its wait status;
    raises Timeout after ``timeout`` seconds (the child killed)."""
    pidfd = os.pidfd_open(pid)

    def forward(signum: int, frame: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signum)
        except ProcessLookupError:
            pass

    handlers: dict[int, Handler] = {sig: forward for sig in FORWARDED}
    if master is not None and stdio is not None:
        handlers[signal.SIGWINCH] = lambda signum, frame: _copy_size(stdio, master)
    deadline = None if timeout is None else time.monotonic() + timeout
    relaying = master is not None and stdio is not None
    try:
        with (
            _signals(handlers),
            _raw_mode(stdio.input if relaying and stdio else None, master, stdio),
        ):
            return _loop(pid, pidfd, master if relaying else None, stdio, deadline)
    finally:
        os.close(pidfd)


def _loop(
    pid: int, pidfd: int, master: int | None, stdio: Stdio | None, deadline: float | None
) -> int:
    src = stdio.input if master is not None and stdio is not None else None
    out = stdio.output if master is not None and stdio is not None else None
    if master is not None:
        os.set_blocking(master, False)
    to_master = bytearray()
    while True:
        p = select.poll()
        p.register(pidfd, select.POLLIN)
        if src is not None and len(to_master) < CHUNK:
            p.register(src, select.POLLIN)
        if master is not None:
            p.register(master, select.POLLIN | (select.POLLOUT if to_master else 0))
        wait = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
        ready = p.poll(wait)
        ended = any(fd == pidfd for fd, _ in ready)
        if not ended and deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise Timeout()
        for fd, ev in ready:
            if fd == src:
                try:
                    data = os.read(src, CHUNK)
                except OSError:
                    data = b""
                if data:
                    to_master += data
                else:  # the admin's terminal hung up: SIGHUP follows
                    src = None
            elif fd == master:
                if ev & select.POLLOUT and to_master:
                    try:
                        del to_master[: os.write(master, to_master)]
                    except BlockingIOError:
                        pass
                    except OSError:
                        to_master.clear()
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    if not _drain(master, out):
                        master = None  # every slave is closed
        if ended:
            _, status = os.waitpid(pid, 0)
            if master is not None:
                _drain(master, out, until_empty=True)
            return status


def _drain(master: int, out: int | None, until_empty: bool = False) -> bool:
    """Copy what the master has to ``out``; False once it reports that no slave is open
    (EIO).  ``until_empty``: read until nothing is left (the command has ended)."""
    while True:
        try:
            data = os.read(master, CHUNK)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno == errno.EIO:
                return False
            raise
        if not data:
            return False
        _write_all(out, data)
        if not until_empty:
            return True
