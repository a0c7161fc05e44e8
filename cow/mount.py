"""Run the overlay: one FUSE mount serving every guest, in trio.  Teardown mirrors setup
(ExitStack): the mount is always unmounted and the guest trees closed, also on errors."""

from __future__ import annotations

import array
import json
import logging
import os
import signal
import socket
from contextlib import ExitStack
from pathlib import Path

import pyfuse3
import trio

from vsstore.names import shown
from vsstore.runtime import write_cow_state

from .fs import CowFS

log = logging.getLogger("vsstore.cow")


async def _control(
    fs: CowFS, path: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``vscow add/remove/attach`` on a unix socket (root only: 0600 in the run
    directory).  One JSON request per connection: {"op": "add", "name": N, "root": R},
    {"op": "remove", "name": N}, or {"op": "attach", "name": N} with a pid namespace's
    descriptor passed along (SCM_RIGHTS); the answer is {"ok": true} or {"ok": false,
    "error": text}."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(8)
    task_status.started()
    try:
        while True:
            conn, _ = await sock.accept()
            with conn:
                try:
                    await _answer(fs, conn)
                except OSError as e:
                    log.warning("control connection failed: %s", e)  # the client's problem
    finally:
        sock.close()
        if os.path.exists(path):
            os.unlink(path)


async def _receive(conn: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One request line and the descriptors that came with it."""
    data = b""
    fds: list[int] = []
    space = socket.CMSG_SPACE(4 * array.array("i").itemsize)
    while not data.endswith(b"\n") and len(data) < 65536:
        chunk, anc, _flags, _addr = await conn.recvmsg(4096, space)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                fds.extend(a)
        if not chunk:
            break
        data += chunk
    return data, fds


async def _answer(fs: CowFS, conn: trio.socket.SocketType) -> None:
    data, fds = await _receive(conn)
    try:
        req = json.loads(data)
        if req["op"] == "add":
            fs.add_guest(str(req["name"]), str(req["root"]))
            log.info("guest %s added (%s)", shown(req["name"]), shown(req["root"]))
        elif req["op"] == "remove":
            fs.remove_guest(str(req["name"]))
            log.info("guest %s removed", shown(req["name"]))
        elif req["op"] == "attach":
            if len(fds) != 1:
                raise ValueError("attach: pass exactly one pid namespace descriptor")
            fs.attach(str(req["name"]), fds.pop())
            log.info("guest %s: pid namespace attached", shown(req["name"]))
        else:
            raise ValueError(f"unknown operation {req['op']!r}")
        answer: dict[str, object] = {"ok": True}
    except Exception as e:  # noqa: BLE001 - no request may end the daemon
        log.warning("control request %r failed: %s", data[:200], e)
        answer = {"ok": False, "error": str(getattr(e, "message", e))}
    finally:
        for fd in fds:  # not taken over
            os.close(fd)
    await conn.send(json.dumps(answer).encode() + b"\n")


def serve(
    mountpoint: str,
    guests: dict[str, str],
    immutable: bool = True,
    ready_fd: int | None = None,
    control: str | None = None,
    state_file: str | None = None,
    record: dict[str, object] | None = None,
) -> None:
    """Mount at ``mountpoint`` and serve until unmounted or signalled.  ``ready_fd`` is
    written to (and closed) once the mount is up, for a parent waiting to return;
    ``control`` is the unix socket for add/remove; ``record`` (with our pid added) is
    written to ``state_file`` before that, so the mount never exists without its state
    even when the parent is killed meanwhile."""
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get("VSCOW_DEBUG") else logging.INFO,
        format=f"%(asctime)s vscow[{os.getpid()}] %(levelname)s %(message)s",
    )
    with ExitStack() as stack:
        fs = CowFS(guests, immutable=immutable)
        stack.callback(fs.close)
        options = set(pyfuse3.default_options)
        options |= {"fsname=vscow", "subtype=vscow", "default_permissions", "allow_other"}
        pyfuse3.init(fs, mountpoint, options)

        def unmount() -> None:
            pyfuse3.close(unmount=True)
            log.info("unmounted %s", mountpoint)

        stack.callback(unmount)
        fs.mounted = True
        log.info("mounted at %s: %s", mountpoint, ", ".join(f"{g}={r}" for g, r in guests.items()))

        async def ready() -> None:
            if state_file is not None:
                write_cow_state(Path(state_file), {**(record or {}), "pid": os.getpid()})
            if ready_fd is not None:
                os.write(ready_fd, b"ok\n")
                os.close(ready_fd)

        async def until_signalled(cancel: trio.CancelScope) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    cancel.cancel()
                    return

        async def main() -> None:
            # Whichever ends first ends the other: an unmount ends pyfuse3.main, a signal
            # ends the wait; either way the ExitStack unmounts and closes.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_signalled, nursery.cancel_scope)
                if control:
                    await nursery.start(_control, fs, control)
                await ready()
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

        trio.run(main)
