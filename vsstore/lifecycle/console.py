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
from vsstore.errors import BusyError, StateError

from . import relay

CHUNK = 65536
BUFFER = 1 << 20  # at most this much of the admin's input waits for the guest
DETACH = b"\x1d"  # Ctrl-]
DETACH_TIMES = 3
DETACH_WITHIN = 1.0  # seconds
HELLO_OK = b"ok\n"
HELLO_BUSY = b"busy\n"


def socket_path(paths: Paths, name: str) -> Path:
    return paths.rundir / "guests" / f"{name}.console"


def send_master(sock: socket.socket, master: int) -> None:  # pragma: no cover - in init
    """From the guest's init, before it becomes the guest's: the pty's master to the
    monitor."""
    socket.send_fds(sock, [b"m"], [master])


def receive_master(sock: socket.socket) -> int | None:
    """In the monitor: the master init sent, or None (it sent none: no console)."""
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
    except OSError:
        return None
    return fds[0] if fds else None


class Server:
    """The monitor's side: the master, the log, the listening socket, one client."""

    def __init__(self, master: int, log: int, path: Path) -> None:
        self.master = master
        self.log = log
        self.path = path
        self.peer = fcntl.ioctl(master, relay.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        os.set_blocking(master, False)
        self.client: socket.socket | None = None
        self.to_master = bytearray()
        path.unlink(missing_ok=True)
        self.listener = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        old = os.umask(0o077)
        try:
            self.listener.bind(str(path))
        finally:
            os.umask(old)
        self.listener.listen(2)
        self._cr = False  # the last byte logged was a CR (a CR LF split between reads)

    def register(self, p: select.poll) -> None:
        p.register(self.master, select.POLLIN | (select.POLLOUT if self.to_master else 0))
        p.register(self.listener, select.POLLIN)
        if self.client is not None and len(self.to_master) < BUFFER:
            p.register(self.client, select.POLLIN)

    def handle(self, fd: int, ev: int) -> None:
        if fd == self.master:
            if ev & select.POLLOUT and self.to_master:
                try:
                    del self.to_master[: os.write(self.master, self.to_master)]
                except BlockingIOError:
                    pass
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.drain()
        elif fd == self.listener.fileno():
            self._accept()
        elif self.client is not None and fd == self.client.fileno():
            try:
                data = self.client.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self.to_master += data
            else:
                self._drop_client()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self.client is not None:
            try:
                conn.sendall(HELLO_BUSY)
            except OSError:
                pass
            conn.close()
            return
        conn.setblocking(True)
        conn.settimeout(5.0)  # a client that stops reading must not stall the guest for long
        try:
            conn.sendall(HELLO_OK)
        except OSError:
            conn.close()
            return
        self.client = conn

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.to_master.clear()

    def drain(self) -> None:
        """Copy what the guest wrote to its console to the log and the client."""
        while True:
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EIO:
                    return
                raise
            if not data:
                return
            self._to_log(data)
            if self.client is not None:
                try:
                    self.client.sendall(data)
                except OSError:
                    self._drop_client()

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
        self.drain()
        self._drop_client()
        self.listener.close()
        self.path.unlink(missing_ok=True)
        os.close(self.peer)
        os.close(self.master)


# -- the admin's side -------------------------------------------------------------------


def attach(paths: Paths, name: str) -> int:
    """``vserver NAME console``: relay the admin's terminal and the guest's console until
    the admin detaches (Ctrl-] three times within a second) or the guest stops."""
    path = socket_path(paths, name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise StateError(f"guest {name} is not running (no console at {path})") from None
    with sock:
        hello = b""
        while not hello.endswith(b"\n") and len(hello) < 16:
            chunk = sock.recv(1)
            if not chunk:
                break
            hello += chunk
        if hello == HELLO_BUSY:
            raise BusyError(
                f"the console of guest {name} is attached in another session; detach "
                f"there first (Ctrl-] three times)"
            )
        if hello != HELLO_OK:
            raise StateError(f"guest {name}: its console did not answer; is it stopping?")
        tty_in = 0 if os.isatty(0) else None
        print(
            f"Attached to the console of guest {name}; press Ctrl-] three times within "
            f"a second to detach.",
            file=sys.stderr,
            flush=True,
        )
        with relay._raw_mode(tty_in, None, None):
            how = _relay(sock, 0, 1)
        print(
            f"\r\n{'Detached from' if how == 'detached' else 'The guest stopped; left'} "
            f"the console of guest {name}.",
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
