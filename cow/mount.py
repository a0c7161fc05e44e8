"""Run the overlay: one FUSE mount serving every guest, in trio.  Teardown mirrors setup
(ExitStack): the mount is always unmounted and the guest trees closed, also on errors."""
from __future__ import annotations

import logging
import os
import signal
from contextlib import ExitStack

import pyfuse3
import trio

from .fs import CowFS

log = logging.getLogger("vsstore.cow")


def serve(mountpoint: str, guests: dict[str, str], immutable: bool = True,
          ready_fd: int | None = None) -> None:
    """Mount at ``mountpoint`` and serve until unmounted or signalled.  ``ready_fd`` is
    written to (and closed) once the mount is up, for a parent waiting to return."""
    if os.environ.get("VSCOW_DEBUG"):
        logging.basicConfig(level=logging.DEBUG, format="vscow: %(message)s")
    with ExitStack() as stack:
        fs = CowFS(guests, immutable=immutable, mountpoint=mountpoint)
        stack.callback(fs.close)
        options = set(pyfuse3.default_options)
        options |= {"fsname=vscow", "subtype=vscow", "default_permissions", "allow_other"}
        pyfuse3.init(fs, mountpoint, options)
        stack.callback(pyfuse3.close, unmount=True)
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
                await pyfuse3.main()
                nursery.cancel_scope.cancel()

        trio.run(main)
