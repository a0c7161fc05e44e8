"""Layer 1: util-vserver's configuration entries as the loader reads them (runlevels,
killseq, interface defaults, uts, shell), what ``check`` says of an entry, marks and the
fleet selection on the command line."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from vsstore.config import Guest, Paths
from vsstore.errors import ConfigError
from vsstore.lifecycle import compat, fleet, guestconf, marks
from vsstore.lifecycle.cli import FLEET_NAME, fleet_selection


def _guest(tmp_path: Path, files: dict[str, str]) -> Guest:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    for rel, text in files.items():
        (conf / rel).parent.mkdir(parents=True, exist_ok=True)
        (conf / rel).write_text(text)
    return Guest("g", tmp_path, conf)


def _conf(g: Guest) -> Path:
    assert g.confdir is not None
    return g.confdir


def test_sysv_runlevels(tmp_path):
    g = _guest(
        tmp_path,
        {
            "apps/init/style": "sysv\n",
            "apps/init/runlevel.start": "2\n",
            "apps/init/runlevel.stop": "1\n",
        },
    )
    cfg = guestconf.load(g)
    assert cfg.init == ["/etc/init.d/rc", "2"] and cfg.stop == ["/etc/init.d/rc", "1"]
    (_conf(g) / "apps/init/runlevel.start").write_text("9\n")
    with pytest.raises(ConfigError, match="runlevel.start: '9' is not a runlevel"):
        guestconf.load(g)


def test_killseq_gives_signal_and_wait_unless_stop_signal_says_otherwise(tmp_path):
    g = _guest(tmp_path, {"apps/init/killseq": "SIGINT 7 SIGKILL\n"})
    cfg = guestconf.load(g)
    assert (cfg.stop_signal, cfg.stop_timeout) == (signal.SIGINT, 7.0)
    (_conf(g) / "apps/init/stop-signal").write_text("SIGPWR\n")
    assert guestconf.load(g).stop_signal == signal.SIGPWR
    (_conf(g) / "apps/init/killseq").write_text("SIGINT soon\n")
    with pytest.raises(ConfigError, match="killseq: 'soon' is not a wait in seconds"):
        guestconf.load(g)


def test_interface_defaults_and_own_values(tmp_path):
    g = _guest(
        tmp_path,
        {
            "interfaces/mask": "255.255.254.0\n",
            "interfaces/0/ip": "10.1.0.5\n",
            "interfaces/1/ip": "10.2.0.5\n",
            "interfaces/1/prefix": "16\n",
            "interfaces/1/name": "lan\n",
            "interfaces/2/ip": "fd00::5\n",
            "interfaces/2/prefix": "64\n",
        },
    )
    itfs = guestconf.load(g).interfaces
    assert [(str(i.ip), i.name) for i in itfs] == [
        ("10.1.0.5/23", "eth0"),
        ("10.2.0.5/16", "lan"),
        ("fd00::5/64", "eth1"),
    ]
    (_conf(g) / "interfaces/1/bcast").write_text("10.2.300.1\n")
    with pytest.raises(ConfigError, match="interfaces/1/bcast"):
        guestconf.load(g)


def test_uts_domainname_and_shell(tmp_path):
    g = _guest(tmp_path, {"uts/domainname": "example.org\n", "shell": "/bin/bash\n"})
    cfg = guestconf.load(g)
    assert (cfg.domainname, cfg.shell) == ("example.org", "/bin/bash")
    (_conf(g) / "shell").write_text("bash\n")
    with pytest.raises(ConfigError, match="shell: 'bash': write the absolute path"):
        guestconf.load(g)


def test_what_check_says_of_entries():
    assert compat.describe("rlimits/nofile.hard")[0] is compat.Use.USED
    assert compat.describe("rlimits/nofile.min")[0] is compat.Use.IGNORED
    assert compat.describe("rlimits/shmem")[0] is compat.Use.IGNORED
    assert compat.describe("rlimits/nofiles")[0] is compat.Use.REFUSED
    assert compat.describe("cgroup/memory.limit_in_bytes")[0] is compat.Use.USED
    assert compat.describe("cgroup/name")[0] is compat.Use.IGNORED
    assert compat.describe("cgroup/cpuset.cpus")[0] is compat.Use.REFUSED
    assert compat.describe("uts/sysname")[0] is compat.Use.IGNORED
    assert compat.describe("interfaces/3/novlandev")[0] is compat.Use.IGNORED
    assert compat.describe("something/else") == (
        compat.Use.IGNORED,
        "not a setting vsstore knows",
    )


def test_marks_and_the_fleet_selection(tmp_path):
    g = _guest(tmp_path, {"apps/init/mark": "web  \n"})
    paths = Paths.from_env({"VSERVERS_CONFDIR": str(tmp_path)})
    assert marks.mark_of(paths, _conf(g).name) == "web"
    assert marks.mark_of(paths, "nothing") is None
    assert fleet_selection(["g1", "pkg", "upgrade"]) == (
        fleet.Selection(),
        ["g1", "pkg", "upgrade"],
    )
    assert fleet_selection(["--debug", "--mark", "web", "pkg", "update"]) == (
        fleet.Selection(mark="web"),
        ["--debug", FLEET_NAME, "pkg", "update"],
    )
    assert fleet_selection(["--no-unify", "--all", "--", "update"]) == (
        fleet.Selection(all=True),
        ["--no-unify", FLEET_NAME, "--", "update"],
    )
    assert fleet_selection(["--running", "rpm", "-qa"])[0].text == "--running"
