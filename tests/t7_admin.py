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
        "userns",
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
        "userns": None,
    }
    assert broken["state"] == "stopped" and "context" in broken["error"]  # listed all the same

    lines = _list(vs).splitlines()
    head = lines[0]
    assert head.split() == ["NAME", "STATE", "CTX", "STYLE", "MARK", "COW", "ROOT", "UPTIME", "IPS"]
    rows = {ln.split()[0]: ln for ln in lines[1:4]}
    assert rows["web"].split()[1:6] == ["running", "42", "plain", "default", "no"]
    assert rows["db"].split()[1:] == [
        "stopped",
        "7",
        "none",
        "-",
        "yes",
        "host",
        "-",
        "10.9.8.7/24",
    ]
    for col in ("STATE", "STYLE", "MARK", "COW", "IPS"):  # left-aligned under their heads
        at = head.index(col)
        for ln in rows.values():
            assert ln[at - 2 : at] == "  " and ln[at] != " ", (col, ln)
    ctx_end = head.index("CTX") + 3  # numbers: right-aligned
    assert rows["web"][ctx_end - 2 : ctx_end] == "42" and rows["db"][ctx_end - 1] == "7"
    assert any(ln.startswith("broken: ") and "context" in ln for ln in lines[4:])


def test_list_of_a_host_without_guests_is_empty(vs, host):
    assert json.loads(_list(vs, "--json")) == {"guests": []}
    assert _list(vs).split() == [
        "NAME",
        "STATE",
        "CTX",
        "STYLE",
        "MARK",
        "COW",
        "ROOT",
        "UPTIME",
        "IPS",
    ]


PASSWD = b"""root:x:0:0:root:/root:/bin/sh
# a comment, and a broken line below
broken:x:notanumber:1::/:/bin/sh
www:x:33:33:web server:/var/www:/bin/sh
"""
GROUP = b"""root:x:0:
adm:x:4:www,other
www:x:33:
web:x:1000:someone,www
"""


def test_suexec_runs_the_command_as_a_user_of_the_guest(vs, host):
    root = vs.guest("g1", files={"etc/passwd": PASSWD, "etc/group": GROUP})
    vs("start", "g1")

    def suexec(user: str, *cmd: str) -> str:
        return vs("suexec", "g1", user, *cmd).stdout.strip()

    assert suexec("www", "id", "-u") == "33"
    assert suexec("www", "id", "-g") == "33"
    assert sorted(suexec("www", "id", "-G").split()) == ["1000", "33", "4"]
    assert suexec("www", "sh", "-c", "echo $HOME $USER $LOGNAME") == "/var/www www www"
    caps = dict(
        ln.split(":\t")
        for ln in suexec("www", "cat", "/proc/self/status").splitlines()
        if ":\t" in ln
    )
    assert int(caps["CapEff"], 16) == 0 and int(caps["CapPrm"], 16) == 0
    assert suexec("4242", "id", "-u") == "4242"  # a number the guest does not know
    assert suexec("4242", "id", "-g") == "4242"
    assert suexec("root", "id", "-u") == "0"
    p = vs("suexec", "g1", "www", "sh", "-c", "exit 9", check=False)
    assert p.returncode == 9  # the exit code passes through
    assert vs("suexec", "g1", "www", "/nosuch", check=False).returncode == 127
    p = vs("suexec", "g1", "nobody", "id", check=False)
    assert p.returncode == 3 and "no user 'nobody'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    # the guest's passwd is the guest's: a symlink out of it is refused, never followed
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("/etc/passwd")
    p = vs("suexec", "g1", "root", "id", check=False)
    assert p.returncode == 3 and "/etc/passwd" in p.stderr and "symlink" in p.stderr
    vs("stop", "g1")
    p = vs("suexec", "g1", "www", "id", check=False)
    assert p.returncode == 8 and "not running" in p.stderr
