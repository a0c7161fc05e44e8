"""Run the overlay: one FUSE mount serving every guest, in trio.  Teardown mirrors setup
(ExitStack): the mount is always unmounted and the guest trees closed, also on errors."""
from __future__ import annotations

import json
import logging
import os
import signal
from contextlib import ExitStack

import pyfuse3
import trio

from .fs import CowFS

log = logging.getLogger("vsstore.cow")


async def _control(fs: CowFS, path: str, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """Serve ``vscow add/remove`` on a unix socket (root only: 0600 in the run directory).
    One JSON request per connection: {"op": "add", "name": N, "root": R} or {"op":
    "remove", "name": N}; the answer is {"ok": true} or {"ok": false, "error": text}."""
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
            stream = trio.SocketStream(conn)
            try:
                async with stream:
                    await _answer(fs, stream)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.warning("control connection failed: %s", e)  # the client's problem
    finally:
        sock.close()
        if os.path.exists(path):
            os.unlink(path)


async def _answer(fs: CowFS, stream: trio.SocketStream) -> None:
    data = b""
    while not data.endswith(b"\n") and len(data) < 65536:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    try:
        req = json.loads(data)
        if req["op"] == "add":
            fs.add_guest(str(req["name"]), str(req["root"]))
            log.info("guest %s added (%s)", req["name"], req["root"])
        elif req["op"] == "remove":
            fs.remove_guest(str(req["name"]))
            log.info("guest %s removed", req["name"])
        else:
            raise ValueError(f"unknown operation {req['op']!r}")
        answer: dict[str, object] = {"ok": True}
    except Exception as e:  # noqa: BLE001 - no request may end the daemon
        log.warning("control request %r failed: %s", data[:200], e)
        answer = {"ok": False, "error": str(getattr(e, "message", e))}
    await stream.send_all(json.dumps(answer).encode() + b"\n")


def serve(mountpoint: str, guests: dict[str, str], immutable: bool = True,
          ready_fd: int | None = None, control: str | None = None) -> None:
    """Mount at ``mountpoint`` and serve until unmounted or signalled.  ``ready_fd`` is
    written to (and closed) once the mount is up, for a parent waiting to return;
    ``control`` is the unix socket for add/remove."""
    logging.basicConfig(level=logging.DEBUG if os.environ.get("VSCOW_DEBUG") else logging.INFO,
                        format=f"%(asctime)s vscow[{os.getpid()}] %(levelname)s %(message)s")
    with ExitStack() as stack:
        fs = CowFS(guests, immutable=immutable, mountpoint=mountpoint)
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
