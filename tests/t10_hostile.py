"""Layer 10: hostile guests.  Each test replays an attack a guest's root mounted against
unified guests (issue 13) and checks that it reaches nothing: no other guest's file, no store
object, no host privilege.  Real guests started with ``vserver``, real overlay, real flags;
attacks are bounded in time and everything is stopped and removed afterwards."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import t7_lifecycle
from conftest import REPO, TEST_TMP, flags, inode
from t7_lifecycle import Vserver

vs = t7_lifecycle.vs  # the fixture: guests built, started, stopped and removed

C_DIR = Path(__file__).parent / "c"
HAMMER_S = float(os.environ.get("VSSTORE_HAMMER_SECONDS", "20"))


def static_binary(name: str) -> Path:
    """tests/c/NAME.c built with gcc -static (cached by its source's hash): a guest program
    that needs no library from the guest's tree."""
    src = C_DIR / f"{name}.c"
    tag = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    out = Path(TEST_TMP) / "vsstore-test-bin" / f"{name}-{tag}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(["gcc", "-static", "-O2", "-o", str(tmp), str(src)], check=True)
        os.replace(tmp, out)
    return out


def install(root: Path, binary: Path, as_name: str) -> None:
    shutil.copy(binary, root / as_name.lstrip("/"))
    os.chmod(root / as_name.lstrip("/"), 0o755)


# -- cow: the writing guest is told by its pid namespace, never by its root -----------------

SHARED = b"shared data of every guest\n" * 64


@pytest.mark.parametrize("form", ["tree", "overlay"])
def test_a_guest_chrooted_to_look_like_another_cannot_write_its_files(vs, host, form):
    """Guest a (through cow) keeps a directory fd, chroots into a directory of its own
    named like guest b's root (its tree's host path, or its path in the overlay) and
    writes through the fd: b's files and the store stay as they were."""
    for g in ("a", "b"):
        vs.guest(g, files={"usr/share/data.txt": SHARED, "bin/probe": SHARED + b"probe"})
        (host.conf / g / "cow").touch()
    host.vsunify("run", "a", "b")
    spoofed = str(host.root / "b") if form == "tree" else str(host.base / "run/cow/b")
    (host.root / "a" / spoofed.lstrip("/")).mkdir(parents=True)
    install(host.root / "a", static_binary("spoof"), "spoof")
    vs("start", "a")
    vs("start", "b")
    for d, f in (("/usr/share", "data.txt"), ("/bin", "probe")):
        p = vs("exec", "a", "/spoof", d, spoofed, f, "EVIL\n", check=False)
        assert p.returncode in (0, 3), p.stderr
    objs = {inode(p): p for p in host.store.rglob("*") if p.is_file()}
    for rel, data in (("usr/share/data.txt", SHARED), ("bin/probe", SHARED + b"probe")):
        assert (host.root / "b" / rel).read_bytes() == data
        assert vs.exec("b", "cat", f"/{rel}").encode() == data
        assert flags(host.root / "b" / rel) == "UIa"
        obj = objs[inode(host.root / "b" / rel)]  # still the store's object
        assert obj.read_bytes() == data and flags(obj) == "UIa"


# -- unseal windows: a guest hammering a shared inode while others' names change -------------

DATA = b"every guest has this file\n" * 100
K = 600  # names per guest of the one shared inode


def _guest_files() -> dict[str, bytes]:
    return {f"usr/share/f{i}": DATA for i in range(K)}


class Hammer:
    """The attack, inside guest a (started directly: its root is a guest root with the
    default capabilities): a static program looping over every way to change the inode of
    a's own name /usr/share/f0, restarted when it is killed, until stopped."""

    def __init__(self, vs: Vserver, host) -> None:  # type: ignore[no-untyped-def]
        self.host = host
        root = host.root / "a"
        install(root, static_binary("hammer"), "hammer")
        self.stop_file = root / "hammer-stop"
        vs("start", "a")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "vsstore.vserver_cli", "a", "exec", "/bin/sh", "-c",
             "while [ ! -e /hammer-stop ]; do /hammer /usr/share/f0 1; done"],
            cwd=REPO, env=vs.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop(self) -> int:
        """Stop it; the number of attempts it made."""
        self.stop_file.touch()
        try:
            out, _ = self.p.communicate(timeout=60)
        finally:
            self.p.kill()
        return sum(int(line.split()[1]) for line in out.splitlines()
                   if line.startswith("tries"))


def _check_untouched(host, obj: Path, guests: list[str]) -> None:  # type: ignore[no-untyped-def]
    """The store's object and every name of every guest: exact bytes and metadata."""
    for o in [obj]:
        assert o.read_bytes() == DATA, o
        st = os.stat(o)
        assert (st.st_mode, st.st_uid, st.st_gid) == (0o100644, 0, 0)
        assert st.st_mtime == 1_600_000_000
        assert [x for x in os.listxattr(o) if ".vsstore." not in x] == []
        assert flags(o) == "UIa"
    for g in guests:
        for f in (host.root / g / "usr/share").glob("f*"):
            assert f.read_bytes() == DATA, f
            st = os.stat(f)
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o644, 0, 0), f
            assert [x for x in os.listxattr(f) if ".vsstore." not in x] == [], f


def _until(seconds: float, step) -> int:  # type: ignore[no-untyped-def]
    """Run ``step(i)`` for i = 0, 1, ... until ``seconds`` passed; the number of steps."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        step(i)
        i += 1
    return i


def _cow_victim(vs: Vserver, host) -> Path:  # type: ignore[no-untyped-def]
    """Guest b started through the overlay; its tree as the host sees it there."""
    (host.conf / "b" / "cow").touch()
    vs("start", "b")
    return host.base / "run/cow/b/usr/share"


def _rename(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)

    def step(i: int) -> None:
        f = d / f"f{i % K}"
        os.rename(f, d / "moved")
        os.rename(d / "moved", f)
    return _until(HAMMER_S, step)


def _link_unlink(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)

    def step(i: int) -> None:
        os.link(d / f"f{i % K}", d / "another")
        os.unlink(d / "another")
    return _until(HAMMER_S, step)


def _copy_up(vs, host) -> int:  # type: ignore[no-untyped-def]
    d = _cow_victim(vs, host)
    end = time.monotonic() + HAMMER_S
    n = 0
    for i in range(K):  # each name once: its own copy afterwards
        with open(d / f"f{i}", "ab"):
            n += 1
        if time.monotonic() > end:
            break
    return n


def _deunify(vs, host) -> int:  # type: ignore[no-untyped-def]
    def step(i: int) -> None:
        host.vsunify("deunify", "b")
        host.vsunify("run", "a", "b")
    return _until(HAMMER_S, step) * K


def _delete(vs, host) -> int:  # type: ignore[no-untyped-def]
    def step(i: int) -> None:
        name = f"d{i}"
        vs("build", name, "-m", "skeleton")
        for rel, data in _guest_files().items():
            p = host.root / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            os.utime(p, (1_600_000_000, 1_600_000_000))
        host.vsunify("run", "a", name)
        vs("delete", name, "--force")
    return _until(HAMMER_S, step) * K


OPERATIONS = {"rename": _rename, "link+unlink": _link_unlink, "copy-up": _copy_up,
              "deunify+link": _deunify, "delete": _delete}


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_a_guest_hammering_a_shared_inode_changes_nothing_others_see(vs, host, op):
    """Every window in which a shared inode's seal is lifted (for another guest's rename,
    link, unlink, copy-up, for deunify and re-linking, for delete) is leased and verified:
    guest a opening it for writing, truncating it, chmod-ing, chown-ing, setxattr-ing and
    touching it meanwhile changes no byte and no mode bit anywhere."""
    for g in ("a", "b", "c"):
        vs.guest(g, files=_guest_files())
    host.vsunify("run", "a", "b", "c")
    shared = {inode(host.root / g / "usr/share/f0") for g in "abc"}
    assert len(shared) == 1
    obj = next(p for p in host.store.rglob("*") if p.is_file() and inode(p) in shared)
    hammer = Hammer(vs, host)
    try:
        windows = OPERATIONS[op](vs, host)
    finally:
        tries = hammer.stop()
    assert tries > 0 and windows > 0
    _check_untouched(host, obj, ["a", "b", "c"])
