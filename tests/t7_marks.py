"""Layer 7: ``vserver-start --mark`` / ``vserver-stop --mark`` on real busybox guests:
three guests with ``apps/init/depends`` start in dependency order and stop in reverse (the
order recorded by host-side hooks, never by timing); a dependency that fails keeps its
dependants down while the others start."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from vsstore.errors import EXIT_PARTIAL


def _marks(vs, cmd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from vsstore.lifecycle.marks import {cmd}_main; "
            f"sys.exit({cmd}_main(sys.argv[1:]))",
            *args,
        ],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _sequence(vs, host, guests: dict[str, list[str]]) -> None:
    """Busybox guests of mark ``default`` with their depends; hooks of the host's
    defaults append 'start NAME' once a guest's init runs and 'stop NAME' before it stops."""
    for name, deps in guests.items():
        vs.guest(
            name,
            conf={
                "apps/init/mark": "default\n",
                "apps/init/depends": "".join(f"{d}\n" for d in deps),
            },
        )
    scripts = host.conf / ".defaults" / "scripts"
    scripts.mkdir(parents=True)
    for action, word in (("post-start", "start"), ("pre-stop", "stop")):
        (scripts / action).write_text(f'#!/bin/sh\necho "{word} $2" >> {host.base}/sequence\n')
        (scripts / action).chmod(0o755)


def test_a_mark_starts_in_dependency_order_and_stops_in_reverse(vs, host):
    _sequence(vs, host, {"web": ["app", "db"], "app": ["db"], "db": []})
    vs.guest("spare")  # no mark: left alone
    p = _marks(vs, "start", "--mark", "default", "-j", "3")
    assert p.returncode == 0, p
    for g in ("web", "app", "db"):
        assert vs("running", g, check=False).returncode == 0
    assert vs("running", "spare", check=False).returncode == 1
    p = _marks(vs, "start", "--mark", "default")  # again: all running already
    assert p.returncode == 0 and "already running" in p.stdout
    p = _marks(vs, "stop", "--mark", "default", "-j", "3")
    assert p.returncode == 0, p
    seq = (host.base / "sequence").read_text().splitlines()
    assert seq == ["start db", "start app", "start web", "stop web", "stop app", "stop db"]
    for g in ("web", "app", "db"):
        assert vs.state(g) is None


def test_a_failing_dependency_keeps_its_dependants_down_and_the_others_start(vs, host):
    _sequence(vs, host, {"web": ["db"], "db": [], "lone": []})
    failing = host.conf / "db" / "scripts" / "pre-start"
    failing.parent.mkdir(parents=True)
    failing.write_text("#!/bin/sh\nexit 1\n")
    failing.chmod(0o755)
    p = _marks(vs, "start", "--mark", "default", "-j", "2")
    assert p.returncode == EXIT_PARTIAL, p
    assert "web: not started: it depends on db, which did not start" in p.stderr
    assert "pre-start script" in p.stderr and "not started: db, web" in p.stderr
    assert vs("running", "lone", check=False).returncode == 0
    assert vs.state("db") is None and vs.state("web") is None


def test_a_dependency_cycle_starts_nothing(vs, host):
    _sequence(vs, host, {"a": ["b"], "b": ["a"]})
    p = _marks(vs, "start", "--mark", "default")
    assert p.returncode == 3 and "a -> b -> a" in p.stderr
    assert vs.state("a") is None and vs.state("b") is None
