"""Layer 7: operations over many guests: the nightly ``vsunify run --all`` beside a running
cow guest, package commands over ``--all``, ``--running`` and ``--mark`` followed by one
vsunify run over every guest touched."""

from __future__ import annotations

import json
import os

from vsstore.errors import EXIT_OK, EXIT_PARTIAL

SHARED = b"the same data in every guest\n" * 50


def test_run_all_skips_a_running_cow_guest_with_a_warning_and_exit_6(vs, host):
    for g in ("g1", "g2", "g3"):
        vs.guest(g, files={"usr/share/data": SHARED})
    (host.conf / "g1/cow").touch()
    vs("start", "g1")
    p = host.vsunify("run", "--json", "--all", check=False)
    assert p.returncode == EXIT_PARTIAL, p.stderr
    assert "warning: guest 'g1' skipped: the cow overlay" in p.stderr
    assert json.loads(p.stdout)["guests"] == 2  # the others are unified all the same
    assert (
        os.stat(host.root / "g2/usr/share/data").st_ino
        == os.stat(host.root / "g3/usr/share/data").st_ino
    )
    assert os.stat(host.root / "g1/usr/share/data").st_nlink == 1
    # named explicitly, the guest is still refused (the busy code): nothing is done
    p = host.vsunify("run", "g1", "g2", check=False)
    assert p.returncode == 5 and "cow overlay" in p.stderr
    vs("stop", "g1")
    assert host.vsunify("run", "--all").returncode == EXIT_OK
    assert os.stat(host.root / "g1/usr/share/data").st_nlink == 4
