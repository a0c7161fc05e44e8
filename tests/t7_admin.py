"""Layer 7: the admin's daily commands on real busybox guests: ``vserver list [--json]``
(every configured guest, running or not) and ``vserver NAME suexec USER CMD...``."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def _list(vs, *args: str) -> str:
    """``vserver list ARGS``"""
    return subprocess.run(
        [sys.executable, "-m", "vsstore.lifecycle.cli", "list", *args],
        cwd=REPO,
        env=vs.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_list_shows_every_configured_guest_with_its_state(vs, host):
    vs.guest("web", conf={"apps/init/mark": "default\n", "context": "42\n"})
    vs.guest(
        "db",
        conf={
            "interfaces/0/ip": "10.9.8.7\n",
            "interfaces/0/prefix": "24\n",
            "cow": "",
            "apps/init/style": "none\n",
            "context": "7\n",
        },
    )
    (host.conf / "db/apps/init/cmd.start").unlink()
    vs.guest("broken", conf={"context": "nonsense\n"})
    vs("start", "web")
    st = vs.state("web")
    got = json.loads(_list(vs, "--json"))["guests"]
    assert [g["name"] for g in got] == ["broken", "db", "web"]
    keys = [
        "name",
        "state",
        "context",
        "style",
        "ips",
        "mark",
        "cow",
        "uptime_s",
        "init_pid",
        "root",
        "error",
    ]
    assert all(list(g) == keys for g in got)  # stable: every key, in this order
    broken, db, web = got
    assert web["state"] == "running" and web["context"] == 42 and web["mark"] == "default"
    assert web["style"] == "plain" and web["cow"] is False and web["ips"] == []
    assert web["init_pid"] == st["init_pid"] and web["uptime_s"] >= 0 and web["error"] is None
    assert web["root"] == str(host.root / "web")
    assert db == {
        "name": "db",
        "state": "stopped",
        "context": 7,
        "style": "none",
        "ips": ["10.9.8.7/24"],
        "mark": None,
        "cow": True,
        "uptime_s": None,
        "init_pid": None,
        "root": str(host.root / "db"),
        "error": None,
    }
    assert broken["state"] == "stopped" and "context" in broken["error"]  # listed all the same

    lines = _list(vs).splitlines()
    head = lines[0]
    assert head.split() == ["NAME", "STATE", "CTX", "STYLE", "MARK", "COW", "UPTIME", "IPS"]
    rows = {ln.split()[0]: ln for ln in lines[1:4]}
    assert rows["web"].split()[1:6] == ["running", "42", "plain", "default", "no"]
    assert rows["db"].split()[1:] == ["stopped", "7", "none", "-", "yes", "-", "10.9.8.7/24"]
    for col in ("STATE", "STYLE", "MARK", "COW", "IPS"):  # left-aligned under their heads
        at = head.index(col)
        for ln in rows.values():
            assert ln[at - 2 : at] == "  " and ln[at] != " ", (col, ln)
    ctx_end = head.index("CTX") + 3  # numbers: right-aligned
    assert rows["web"][ctx_end - 2 : ctx_end] == "42" and rows["db"][ctx_end - 1] == "7"
    assert any(ln.startswith("broken: ") and "context" in ln for ln in lines[4:])


def test_list_of_a_host_without_guests_is_empty(vs, host):
    assert json.loads(_list(vs, "--json")) == {"guests": []}
    assert _list(vs).split() == ["NAME", "STATE", "CTX", "STYLE", "MARK", "COW", "UPTIME", "IPS"]
