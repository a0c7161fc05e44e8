"""A guest's console: /dev/console is a pty of the guest's own devpts, and its master is
held on the host by the guest's monitor (what systemd-nspawn and LXC do).

Init's stdin, stdout and stderr are the pty's slave.  The monitor copies whatever the
guest writes there into the guest's log (``LOGDIR/vserver-NAME.log``, with the pty's CR
LF made LF), and to the one admin attached by ``vserver NAME console``, whose keys go
back into the pty.  The attached client talks to the monitor over a unix socket
(``RUNDIR/guests/NAME.console``, root's only); the admin's terminal is only ever relayed,
never given to the guest (as lifecycle.relay does for exec and enter), and it is in raw
mode while attached.  Ctrl-] three times within a second detaches (nspawn's key); the
guest keeps running.  A second admin is refused while one is attached.

``apps/init/ttys`` N gives the guest /dev/tty1..N as well, each a pty of its devpts (LXC's
``lxc.tty.max``), named to systemd in ``container_ttys`` so that it starts a getty on
each; ``vserver NAME console --tty K`` attaches to /dev/ttyK.  Their output is not logged.

The monitor keeps a slave descriptor of its own open, so the master never reports a hang
up while no guest process has the console open (style none's pid 1 closes it).
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import sys
import time
from pathlib import Path

from vsstore.config import Paths
from vsstore.errors import BusyError, ConfigError, StateError

from . import guestconf, relay

CHUNK = 65536
BUFFER = 1 << 20  # at most this much of the admin's input waits for the guest
DETACH = b"\x1d"  # Ctrl-]
DETACH_TIMES = 3
DETACH_WITHIN = 1.0  # seconds
HELLO_OK = b"ok\n"
HELLO_BUSY = b"busy\n"
HELLO_NOTTY = b"notty\n"


def socket_path(paths: Paths, name: str) -> Path:
    return paths.rundir / "guests" / f"{name}.console"


def send_masters(sock: socket.socket, masters: list[int]) -> None:  # pragma: no cover
    """From the guest's init, before it becomes the guest's: the ptys' masters (console,
    then tty1..N) to the monitor."""
    socket.send_fds(sock, [b"m"], masters)


def receive_masters(sock: socket.socket) -> list[int]:
    """In the monitor: the masters init sent (none: no console)."""
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, guestconf.MAX_TTYS + 1)
    except OSError:
        return []
    return fds


class _Line:
    """One pty: its master, a slave of ours (no hang-up while the guest has none open),
    the attached client and what it typed that the guest has not read yet."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.peer = fcntl.ioctl(master, relay.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        os.set_blocking(master, False)
        self.client: socket.socket | None = None
        self.to_master = bytearray()
        self.hung = False  # EIO: hung up for good (never polled again: no busy loop)

    def drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.to_master.clear()

    def close(self) -> None:
        self.drop_client()
        os.close(self.peer)
        os.close(self.master)


class Server:
    """The monitor's side: the console (line 0: logged, always read) and tty1..N (read
    only while an admin is attached: what a getty printed waits for them), the listening
    socket, one client per line."""

    def __init__(self, masters: list[int], log: int, path: Path) -> None:
        self.lines = [_Line(m) for m in masters]
        self.log = log
        self.path = path
        path.unlink(missing_ok=True)
        self.listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        old = os.umask(0o077)
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.listener.listen(4)
        self._cr = False  # the last byte logged was a CR (a CR LF split between reads)

    def register(self, p: select.poll) -> None:
        p.register(self.listener, select.POLLIN)
        for n, line in enumerate(self.lines):
            if line.hung:
                continue
            if n == 0 or line.client is not None:
                p.register(line.master, select.POLLIN | (select.POLLOUT if line.to_master else 0))
            if line.client is not None and len(line.to_master) < BUFFER:
                p.register(line.client, select.POLLIN)

    def handle(self, fd: int, ev: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
            return
        for n, line in enumerate(self.lines):
            if fd == line.master:
                if ev & select.POLLOUT and line.to_master:
                    try:
                        del line.to_master[: os.write(line.master, line.to_master)]
                    except BlockingIOError:
                        pass
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.drain(n)
            elif line.client is not None and fd == line.client.fileno():
                try:
                    data = line.client.recv(CHUNK)
                except (BlockingIOError, InterruptedError, TimeoutError):
                    return
                except OSError:
                    data = b""
                if data:
                    line.to_master += data
                else:
                    line.drop_client()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a client that stops reading must not stall the guest for long
        try:
            want = b""
            while not want.endswith(b"\n") and len(want) < 8:
                chunk = conn.recv(1)
                if not chunk:
                    break
                want += chunk
            n = int(want) if want.strip().isdigit() else -1
            if not 0 <= n < len(self.lines):
                conn.sendall(HELLO_NOTTY)
            elif self.lines[n].hung:
                conn.sendall(b"hung up\n")  # the client says: it did not answer
            elif self.lines[n].client is not None:
                conn.sendall(HELLO_BUSY)
            else:
                conn.sendall(HELLO_OK)
                self.lines[n].client = conn
                return
        except OSError:
            pass
        conn.close()

    def drain(self, n: int = 0) -> None:
        """Copy what the guest wrote to line ``n`` to the client (and the console's to
        the log)."""
        line = self.lines[n]
        while True:
            try:
                data = os.read(line.master, CHUNK)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EIO:  # with a slave of ours open: a hang-up
                    line.hung = True
                    line.drop_client()
                    return
                raise
            if not data:
                return
            if n == 0:
                self._to_log(data)
            if line.client is not None:
                try:
                    line.client.sendall(data)
                except OSError:
                    line.drop_client()

    def _to_log(self, data: bytes) -> None:
        text = (b"\r" if self._cr else b"") + data
        self._cr = text.endswith(b"\r")
        if self._cr:
            text = text[:-1]
        text = text.replace(b"\r\n", b"\n")
        view = memoryview(text)
        while view:
            try:
                view = view[os.write(self.log, view) :]
            except OSError:
                return  # a full disk costs log lines, never the guest

    def close(self) -> None:
        self.drain(0)
        for line in self.lines:
            line.close()
        self.listener.close()
        self.path.unlink(missing_ok=True)


# -- the admin's side -------------------------------------------------------------------


def attach(paths: Paths, name: str, tty: int = 0) -> int:
    """``vserver NAME console [--tty N]``: relay the admin's terminal and the guest's
    console (or its /dev/ttyN) until the admin detaches (Ctrl-] three times within a
    second) or the guest stops."""
    what = "console" if tty == 0 else f"/dev/tty{tty}"
    path = socket_path(paths, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise StateError(f"guest {name} is not running (no console at {path})") from None
    with sock:
        sock.sendall(f"{tty}\n".encode())
        hello = b""
        while not hello.endswith(b"\n") and len(hello) < 16:
            chunk = sock.recv(1)
            if not chunk:
                break
            hello += chunk
        if hello == HELLO_BUSY:
            raise BusyError(
                f"the {what} of guest {name} is attached in another session; detach "
                f"there first (Ctrl-] three times)"
            )
        if hello == HELLO_NOTTY:
            raise ConfigError(
                f"guest {name} has no /dev/tty{tty}; write how many it gets to "
                f"apps/init/ttys (it takes effect at the next start)"
            )
        if hello != HELLO_OK:
            raise StateError(f"guest {name}: its console did not answer; is it stopping?")
        tty_in = 0 if os.isatty(0) else None
        print(
            f"Attached to the {what} of guest {name}; press Ctrl-] three times within "
            f"a second to detach.",
            file=sys.stderr,
            flush=True,
        )
        with relay._raw_mode(tty_in, None, None):
            how = _relay(sock, 0, 1)
        print(
            f"\r\n{'Detached from' if how == 'detached' else 'The guest stopped; left'} "
            f"the {what} of guest {name}.",
            file=sys.stderr,
            flush=True,
        )
    return 0


def _relay(sock: socket.socket, src: int, out: int) -> str:
    """Copy keys from ``src`` to the socket and the socket to ``out``; returns why it
    ended: "detached" or "stopped"."""
    presses: list[float] = []
    src_open = True
    while True:
        p = select.poll()
        p.register(sock, select.POLLIN)
        if src_open:
            p.register(src, select.POLLIN)
        for fd, _ev in p.poll():
            if fd == sock.fileno():
                data = sock.recv(CHUNK)
                if not data:
                    return "stopped"
                relay._write_all(out, data)
            elif fd == src:
                try:
                    data = os.read(src, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    src_open = False  # stdin ended: keep showing the console
                    continue
                keep = bytearray()
                for b in data:
                    if b == DETACH[0]:
                        now = time.monotonic()
                        presses = [t for t in presses if now - t < DETACH_WITHIN] + [now]
                        if len(presses) >= DETACH_TIMES:
                            if keep:
                                sock.sendall(keep)
                            return "detached"
                    keep.append(b)
                if keep:
                    sock.sendall(keep)
