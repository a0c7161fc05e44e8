"""Layer 5: kill -9 a real run at every point of the link protocol and at random moments;
every guest path must hold its own content and metadata afterwards, and the next run must
tidy up (no temporary names, empty journal, everything sealed and shared)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3

import pytest
from fsimages import physical, reflink_host

from conftest import flags, snapshot

POINTS = ["verified", "journaled", "linked", "swapped", "sealed", "unlinked"]


def make_guests(host, n=3, files=60):
    rnd = random.Random(1)
    common = {f"usr/lib/f{i}": rnd.randbytes(rnd.randint(20, 40_000)) for i in range(files)}
    for g in range(n):
        host.guest(f"g{g}", {**common, f"usr/own/x{g}": b"own" * 20})
    return {f"g{g}": snapshot(host.root / f"g{g}") for g in range(n)}


def check_nothing_lost(host, before):
    for g, snap in before.items():
        now = snapshot(host.root / g)
        now = {k: v for k, v in now.items() if ".vsu~" not in k}
        assert now == snap, g


def check_tidy(host):
    assert not list(host.root.rglob(".vsu~*"))
    db = sqlite3.connect(host.index)
    assert db.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
    db.close()
    for obj in host.store.rglob("*"):
        if obj.is_file():
            assert flags(obj) == "UIa", obj
    inodes = {os.stat(g / "usr/lib/f0").st_ino for g in host.root.glob("g*")}
    assert len(inodes) == 1


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("nth", [1, 7])
def test_kill_at_every_point_of_the_protocol(host, point, nth):
    before = make_guests(host)
    p = host.vsunify("run", "--all", check=False, env={"VSSTORE_CRASH_AT": f"{point}:{nth}"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    check_nothing_lost(host, before)
    host.vsunify("run", "--all")
    check_nothing_lost(host, before)
    check_tidy(host)


def test_kill_at_random_positions_again_and_again(host):
    """Eight runs in a row, each killed at a random point of the protocol on a random pass
    (seeded, so a failure can be replayed), each resuming what the last one left."""
    before = make_guests(host, n=4, files=600)  # 600 objects: more batches than 8 x 40
    rnd = random.Random(2)
    for _ in range(8):
        point, nth = rnd.choice(POINTS), rnd.randint(1, 40)
        p = host.vsunify(
            "run", "--all", "-q", check=False, env={"VSSTORE_CRASH_AT": f"{point}:{nth}"}
        )
        assert p.returncode == -signal.SIGKILL, (point, nth, p.returncode, p.stderr)
        check_nothing_lost(host, before)
    host.vsunify("run", "--all")
    check_nothing_lost(host, before)
    check_tidy(host)


HOSTILE = [os.fsdecode(b"\xff\xfe"), "new\nline", "tab\tx", "-rf"]


@pytest.mark.parametrize("point", ["linked", "swapped", "sealed"])
def test_kill_with_hostile_names_in_flight(host, point):
    """The journal holds names that are not UTF-8 (or hold a newline) as bytes, so the next
    run finds and resolves exactly those names."""
    rnd = random.Random(3)
    common = {f"usr/lib/{n}": rnd.randbytes(3000) for n in HOSTILE}
    for g in ("g0", "g1"):
        host.guest(g, common)
    before = {g: snapshot(host.root / g) for g in ("g0", "g1")}
    p = host.vsunify("run", "--all", check=False, env={"VSSTORE_CRASH_AT": point})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    db = sqlite3.connect(host.index)
    names = {r[0] for r in db.execute("SELECT name FROM journal WHERE kind='join'")}
    db.close()
    assert names == {os.fsencode(n) for n in HOSTILE}
    assert list(host.root.rglob(".vsu~*"))  # the crash left temporary names
    check_nothing_lost(host, before)
    host.vsunify("run", "--all")
    check_nothing_lost(host, before)
    assert not list(host.root.rglob(".vsu~*"))
    for n in HOSTILE:
        assert (
            os.stat(host.root / "g0/usr/lib" / n).st_ino
            == os.stat(host.root / "g1/usr/lib" / n).st_ino
        )
        assert flags(host.root / "g0/usr/lib" / n) == "UIa"


@pytest.fixture
def xfs_host(monkeypatch):

    with reflink_host("xfs", monkeypatch) as h:
        yield h


@pytest.mark.parametrize("nth", [1, 3])
def test_kill_in_the_extent_phase(xfs_host, nth):
    """On XFS, killed just before a FIDEDUPERANGE call: nothing of any guest changed, and
    the next run shares what is left (the kernel's call is the only step: no journal)."""
    host = xfs_host
    rnd = random.Random(2)
    etc = {f"etc/conf{i}": rnd.randbytes(rnd.randint(5000, 90_000)) for i in range(8)}
    for g in range(3):
        host.guest(f"g{g}", {**etc, "usr/lib/f0": b"shared" * 100})
    before = {f"g{g}": snapshot(host.root / f"g{g}") for g in range(3)}
    p = host.vsunify("run", "--all", check=False, env={"VSSTORE_CRASH_AT": f"dedupe:{nth}"})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    check_nothing_lost(host, before)
    out = host.run_json("--all")
    assert out["errors"] == 0 and out["files_deduped"] >= 16 - (nth - 1) * 2
    check_nothing_lost(host, before)
    check_tidy(host)
    for rel in etc:
        assert len({tuple(physical(host.root / f"g{g}" / rel)) for g in range(3)}) == 1, rel
