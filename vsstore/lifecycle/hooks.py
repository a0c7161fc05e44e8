"""util-vserver's hook scripts: the admin's programs around a guest's start and stop.

``/etc/vservers/NAME/scripts/ACTION`` and every entry of ``scripts/ACTION.d/`` (in name
order), ACTION one of ``initialize``, ``prepre-start``, ``pre-start``, ``post-start``,
``pre-stop``, ``post-stop``, ``postpost-stop`` (names starting with a dot are left out, as
util-vserver's shell glob did).  When the guest has none for an action,
``/etc/vservers/.defaults/scripts/`` is looked at the same way (util-vserver's
``execScriptlets``).  They are the host admin's files and run on the host, never anything
of the guest's tree: as ``SCRIPT ACTION NAME``, an executable one directly, another one
with ``/bin/sh`` (util-vserver sourced those into its bash), with the caller's environment
plus ``VSERVER_NAME``, ``VSERVER_DIR`` (the configuration directory), ``VSERVER_ROOT``
(the root tree) and, while the guest runs (post-start, pre-stop), ``VSERVER_INIT_PID``.
``initialize`` and ``prepre-start`` run in the configuration directory, the others in the
guest's root directory, as util-vserver runs them.

When they run: initialize and prepre-start before anything of the guest is made,
pre-start once its cgroup (and overlay share) exist, just before its namespaces are made
and init started; post-start once init runs; pre-stop before the stop command or signal;
post-stop and postpost-stop once every process, mount and its cgroup are gone.  A failing
initialize, prepre-start or pre-start script stops the start (what was made is undone:
HookError, one line naming the script); a failing script of the others is a warning,
since the guest runs (post-start) or is being stopped anyway.  A guest whose init ends by
itself runs no stop scripts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vsstore.config import Paths
from vsstore.errors import HookError

ACTIONS = (
    "initialize",
    "prepre-start",
    "pre-start",
    "post-start",
    "pre-stop",
    "post-stop",
    "postpost-stop",
)
STOPS_START = ("initialize", "prepre-start", "pre-start")  # a failure: the guest is not started
IN_CONFDIR = ("initialize", "prepre-start")  # their working directory; the others: the root


def _runnable(p: Path) -> bool:
    try:
        return p.is_file() and os.access(p, os.R_OK)
    except OSError:
        return False


def scripts(paths: Paths, name: str, action: str) -> list[Path]:
    """The scripts of ``action`` for guest ``name``, in the order they run."""
    if action not in ACTIONS:
        raise ValueError(action)
    for base in (paths.confdir / name / "scripts", paths.defaults / "scripts"):
        found = [base / action] if _runnable(base / action) else []
        d = base / f"{action}.d"
        try:
            entries = sorted(os.listdir(d))
        except OSError:
            entries = []
        found += [d / e for e in entries if not e.startswith(".") and _runnable(d / e)]
        if found:
            return found
    return []


def run(
    paths: Paths,
    name: str,
    action: str,
    root: Path | str,
    init_pid: int | None = None,
) -> None:
    """Run the scripts of ``action``, in order.  A failure raises HookError for the
    actions that stop a start; for the others it is said on stderr and the rest run."""
    found = scripts(paths, name, action)
    if not found:
        return
    confdir = paths.confdir / name
    env = {
        **os.environ,
        "VSERVER_NAME": name,
        "VSERVER_DIR": str(confdir),
        "VSERVER_ROOT": str(root),
    }
    env.pop("VSERVER_INIT_PID", None)
    if init_pid is not None:
        env["VSERVER_INIT_PID"] = str(init_pid)
    cwd = confdir if action in IN_CONFDIR else Path(root)
    for script in found:
        argv = [str(script), action, name]
        if not os.access(script, os.X_OK):
            argv.insert(0, "/bin/sh")
        try:
            code = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL).returncode
            why = f"exited {code}" if code >= 0 else f"was killed by signal {-code}"
        except OSError as e:
            code, why = -1, f"could not run ({e.strerror})"
        if code == 0:
            continue
        if action in STOPS_START:
            raise HookError(
                f"{action} script {script} {why}; guest {name} was not started "
                f"(fix the script, or remove it)"
            )
        print(f"vserver {name}: warning: {action} script {script} {why}", file=sys.stderr)
