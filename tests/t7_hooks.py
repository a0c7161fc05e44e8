"""Layer 7: util-vserver's hook scripts (``scripts/ACTION`` and ``scripts/ACTION.d/``) run
on the host around a real busybox guest's start and stop, in order, with util-vserver's
arguments and environment; a failing pre-start leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

from guests import gone, host_mounts

from vsstore.errors import EXIT_HOOK
from vsstore.lifecycle import cgroups

LAYOUT = cgroups.detect()

RECORD = (
    "#!/bin/sh\n"
    'echo "{tag} $1 $2 $VSERVER_NAME $VSERVER_DIR $VSERVER_ROOT '
    '${{VSERVER_INIT_PID:-none}} $(pwd)" >> {log}\n'
)


def _script(path: Path, tag: str, log: Path, executable: bool = True, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORD.format(tag=tag, log=log) + extra)
    path.chmod(0o755 if executable else 0o644)


def _entries(log: Path) -> list[list[str]]:
    return [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []


def test_hooks_run_in_order_with_their_arguments_and_environment(vs, host):
    root = vs.guest("g1")
    log = host.base / "hooks.log"
    scripts = host.conf / "g1" / "scripts"
    for action in (
        "initialize",
        "prepre-start",
        "pre-start",
        "post-start",
        "pre-stop",
        "post-stop",
        "postpost-stop",
    ):
        _script(scripts / action, action, log)
    _script(scripts / "pre-start.d" / "20-second", "pre-start.d/20", log)
    _script(scripts / "pre-start.d" / "10-first", "pre-start.d/10", log, executable=False)
    (scripts / "pre-start.d" / "30-subdir").mkdir()  # not a file: left alone
    _script(scripts / "pre-start.d" / ".hidden", "hidden", log)  # a dot file: left alone
    # the defaults are only for actions the guest has no script for
    _script(host.conf / ".defaults/scripts/pre-start", "default-pre-start", log)
    vs("start", "g1")
    init = vs.state("g1")["init_pid"]
    vs("stop", "g1")
    conf = str(host.conf / "g1")
    got = _entries(log)
    assert [e[0] for e in got] == [
        "initialize",
        "prepre-start",
        "pre-start",
        "pre-start.d/10",  # not executable: run with /bin/sh
        "pre-start.d/20",
        "post-start",
        "pre-stop",
        "post-stop",
        "postpost-stop",
    ]
    for tag, action, name, env_name, env_dir, env_root, pid, cwd in got:
        assert (action, name, env_name, env_dir) == (
            tag.split("/")[0].split(".")[0],
            "g1",
            "g1",
            conf,
        )
        assert env_root == str(root)
        running = action in ("post-start", "pre-stop")
        assert pid == (str(init) if running else "none")
        # util-vserver: initialize and prepre-start in the configuration, the others in the root
        assert cwd == (conf if action in ("initialize", "prepre-start") else str(root))


def test_default_scripts_run_for_a_guest_without_its_own(vs, host):
    vs.guest("g1")
    log = host.base / "hooks.log"
    _script(host.conf / ".defaults/scripts/post-start", "default", log)
    vs("start", "g1")
    vs("stop", "g1")
    assert [e[:3] for e in _entries(log)] == [["default", "post-start", "g1"]]


def test_a_failing_pre_start_hook_leaves_nothing_behind(vs, host):
    vs.guest("g1", conf={"cow": ""})
    log = host.base / "hooks.log"
    scripts = host.conf / "g1" / "scripts"
    _script(scripts / "prepre-start", "prepre-start", log)
    _script(scripts / "pre-start", "pre-start", log, extra="echo refused >&2; exit 4\n")
    _script(scripts / "post-start", "post-start", log)
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_HOOK, p
    err = [ln for ln in p.stderr.splitlines() if ln != "refused"]
    assert len(err) == 1 and str(scripts / "pre-start") in err[0] and "exited 4" in err[0]
    assert [e[0] for e in _entries(log)] == ["prepre-start", "pre-start"]
    assert vs.state("g1") is None
    assert cgroups.existing(LAYOUT, "g1", None) is None  # no cgroup
    assert not any(str(host.base) in m for m in host_mounts())  # no mount, no overlay
    # fixed, it starts
    os.unlink(scripts / "pre-start")
    vs("start", "g1")
    assert vs("running", "g1").returncode == 0
    st = vs.state("g1")
    vs("stop", "g1")
    assert gone(st["init_pid"])


def test_a_failing_initialize_hook_stops_the_start_and_a_failing_stop_hook_does_not(vs, host):
    vs.guest("g1")
    scripts = host.conf / "g1" / "scripts"
    scripts.mkdir(parents=True)
    (scripts / "initialize").write_text("#!/bin/sh\nexit 1\n")
    (scripts / "initialize").chmod(0o755)
    p = vs("start", "g1", check=False)
    assert p.returncode == EXIT_HOOK and "initialize script" in p.stderr
    assert vs.state("g1") is None
    os.unlink(scripts / "initialize")
    (scripts / "pre-stop").write_text("#!/bin/sh\nexit 2\n")
    (scripts / "pre-stop").chmod(0o755)
    vs("start", "g1")
    st = vs.state("g1")
    p = vs("stop", "g1")  # a warning; the guest stops all the same
    assert "warning: pre-stop script" in p.stderr and "exited 2" in p.stderr
    assert vs.state("g1") is None and gone(st["init_pid"])
