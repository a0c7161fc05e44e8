"""Layer 4: what scripts/setup does that can be tried without changing the machine: its apt
calls wait for another apt's lock instead of failing (scripts/apt-wait.sh)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time

import pytest

from conftest import REPO

FRONTEND = "/var/lib/dpkg/lock-frontend"


@pytest.mark.skipif(
    shutil.which("apt-get") is None or os.geteuid() != 0, reason="needs apt-get and root"
)
def test_apt_waits_for_a_held_dpkg_lock() -> None:
    """Another 'apt' (this test) holds dpkg's frontend lock as dpkg does (a fcntl lock);
    setup's apt_get, installing what is installed already (attr: setup's own list), waits
    and then succeeds, where plain apt-get fails at once."""
    with open(FRONTEND, "w") as held:
        fcntl.lockf(held, fcntl.LOCK_EX)
        p = subprocess.Popen(
            [
                "bash",
                "-c",
                "source scripts/apt-wait.sh && apt_get install -y -qq --no-install-recommends attr",
            ],
            cwd=REPO,
            env={**os.environ, "VSSTORE_APT_LOCK_WAIT": "120", "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Give it time to try (plain apt-get fails at once); a slow machine only makes the
        # test weaker, never fail: with the lock held, apt_get cannot have finished.
        time.sleep(2)
        assert p.poll() is None, p.stdout.read() if p.stdout else ""  # still waiting
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
