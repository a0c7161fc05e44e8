"""Layer 4: the commands as a user runs them (subprocesses): output, exit codes, errors."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections import Counter

from conftest import REPO, fill, flags, inode, small_fs, snapshot
from vsstore.errors import EXIT_BUSY, EXIT_CONFIG, EXIT_NOSPACE, EXIT_NOTGUEST, EXIT_PARTIAL

BIN = bytes(range(256)) * 64
LIB = b"\x7fELF" + bytes(reversed(range(256))) * 100


def distro(extra: bytes = b"") -> dict[str, bytes]:
    return {
        "usr/bin/tool": BIN,
        "usr/lib/libx.so": LIB,
        "etc/config": BIN + b"conf",
        "usr/share/doc/readme": b"read me " * 10 + extra,
    }


def test_run_json_reports_what_it_did(host):
    for g in "ab":
        host.guest(g, distro())
    out = host.run_json("--all")
    for k in ("files_scanned", "files_hashed", "files_linked", "bytes_saved", "errors"):
        assert k in out
    assert out["files_scanned"] == 6  # /etc/config is excluded by default
    assert out["files_linked"] == 3 and out["errors"] == 0
    assert out["bytes_saved"] == len(BIN) + len(LIB) + 80
    assert os.stat(host.root / "a/etc/config").st_nlink == 1
    again = host.run_json("a", "b")
    assert (again["files_hashed"], again["files_linked"]) == (0, 0)


def test_report_matches_an_independent_count(host):
    for g in "abc":
        host.guest(g, distro(g.encode()))
    host.vsunify("run", "--all")
    rep = json.loads(host.vsunify("report", "--json", "--all").stdout)
    holders: dict[tuple[int, int], set[str]] = {}
    blocks: dict[tuple[int, int], int] = {}
    apparent = {}
    for g in "abc":
        apparent[g] = 0
        for dirpath, _d, files in os.walk(host.root / g):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                apparent[g] += st.st_size
                blocks[(st.st_dev, st.st_ino)] = st.st_blocks * 512
                holders.setdefault((st.st_dev, st.st_ino), set()).add(g)
    # the files' part only: t4_report checks every inode (directories, symlinks) against du
    files = {g: sum(b for k, b in blocks.items() if g in holders[k]) for g in "abc"}
    for g in "abc":
        assert rep["guests"][g]["apparent_bytes"] == apparent[g]
        assert rep["guests"][g]["alone_bytes"] >= files[g]
    saved = sum(files.values()) - sum(blocks.values())
    assert rep["total"]["saved_bytes"] == saved > 0  # directories are never shared
    assert sum(rep["guests"][g]["saved_bytes"] for g in "abc") == rep["total"]["saved_bytes"]
    assert rep["store"]["objects"] == 2  # tool and lib; each readme differs
    table = host.vsunify("report", "--all").stdout
    assert "TOTAL" in table and "store" in table


def test_deunify_gives_private_copies_and_gc_removes_unused_objects(host):
    for g in "ab":
        host.guest(g, distro())
    host.vsunify("run", "a", "b")
    before = snapshot(host.root / "a")
    out = json.loads(host.vsunify("deunify", "--json", "a").stdout)
    assert out == {"files": 3, "bytes": len(BIN) + len(LIB) + 80, "errors": 0}
    assert snapshot(host.root / "a") == before
    for rel in ("usr/bin/tool", "usr/lib/libx.so"):
        p = host.root / "a" / rel
        assert os.stat(p).st_nlink == 1
        assert flags(p) == "uia"
        with open(p, "ab") as f:  # writable again, and private
            f.write(b"mine")
        assert (host.root / "b" / rel).read_bytes() in (BIN, LIB)
    assert json.loads(host.vsunify("gc", "--json").stdout)["objects_removed"] == 0
    host.vsunify("deunify", "b", "/usr/bin/tool")
    assert os.stat(host.root / "b/usr/lib/libx.so").st_nlink == 2
    assert json.loads(host.vsunify("gc", "--json").stdout)["objects_removed"] == 1
    assert json.loads(host.vsunify("gc", "--json").stdout)["objects_removed"] == 0


def test_excludes_command_and_lists(host):
    host.guest("a", distro())
    (host.conf / "a/apps/vunify").mkdir(parents=True)
    (host.conf / "a/apps/vunify/exclude").write_text("/usr/share/doc\n")
    host.guest("b", distro())
    out = host.vsunify("excludes", "a").stdout
    assert "/usr/share/doc" in out and "guest list" in out and "default list" in out
    res = host.run_json("a", "b", "--exclude", "+/etc/config")
    assert res["files_linked"] == 3  # tool, lib, and the re-included config; not the doc
    assert os.stat(host.root / "a/usr/share/doc/readme").st_nlink == 1
    assert inode(host.root / "a/etc/config") == inode(host.root / "b/etc/config")


def _fails(p: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in p.stderr, (w, p.stderr)


def test_bad_input_gives_clear_errors_and_distinct_codes(host):
    host.guest("a", distro())
    _fails(host.vsunify("run", "nosuch", check=False), EXIT_CONFIG, "nosuch", "no configuration")
    _fails(host.vsunify("run", check=False), EXIT_CONFIG, "name at least one guest")
    _fails(
        host.vsunify("run", "a", "--exclude", "relative", check=False),
        EXIT_CONFIG,
        "--exclude",
        "absolute path",
    )
    _fails(host.vsunify("run", "a", "--min-size", "0", check=False), EXIT_CONFIG, "--min-size")
    (host.conf / "a/apps/vunify").mkdir(parents=True)
    bad = host.conf / "a/apps/vunify/exclude"
    bad.write_text("/ok\n[broken\n")
    _fails(host.vsunify("run", "a", check=False), EXIT_CONFIG, f"{bad}:2")
    bad.unlink()
    mnt = host.base / "othermnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True)
    try:
        _fails(
            host.vsunify("run", "a", "--store", str(mnt / "store"), check=False),
            EXIT_CONFIG,
            "another filesystem",
            "--store",
        )
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    _fails(
        host.vsunify("run", "a", "--store", str(host.root / "a/.hash"), check=False),
        EXIT_CONFIG,
        "outside every guest tree",
    )


def test_a_second_run_is_refused_while_one_holds_the_lock(host):
    host.guest("a", distro())
    lock = host.base / "run" / "vsunify.lock"
    lock.parent.mkdir(parents=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        _fails(host.vsunify("run", "a", check=False), EXIT_BUSY, "another vsunify run", "4242")
    finally:
        os.close(fd)
    host.vsunify("run", "a")


def test_corrupt_or_missing_index_costs_only_time(host):
    for g in "ab":
        host.guest(g, distro())
    host.vsunify("run", "a", "b")
    host.index.write_bytes(b"garbage" * 1000)
    for extra in ("-wal", "-shm"):
        p = host.index.with_name(host.index.name + extra)
        if p.exists():
            p.unlink()
    p = host.vsunify("run", "--json", "a", "b")
    assert "moved it to" in p.stderr
    out = json.loads(p.stdout)
    assert out["files_hashed"] > 0 and out["files_linked"] == 0 and out["errors"] == 0
    host.index.unlink()
    out = host.run_json("a", "b")
    assert out["files_linked"] == 0 and out["errors"] == 0


def test_partial_success_has_its_own_exit_code(host):
    host.guest("a", distro())
    host.guest("b", distro())
    w = os.open(host.root / "b/usr/bin/tool", os.O_WRONLY)
    try:
        p = host.vsunify("run", "--json", "a", "b", check=False)
    finally:
        os.close(w)
    assert p.returncode == EXIT_PARTIAL
    out = json.loads(p.stdout)
    assert out["errors"] == 1 and out["files_linked"] == 2
    assert "open for writing" in p.stderr


def test_dry_run_reports_without_changing(host):
    for g in "ab":
        host.guest(g, distro())
    out = host.run_json("--dry-run", "a", "b")
    assert out["files_linked"] == 3 and out["dry_run"] is True
    assert os.stat(host.root / "a/usr/bin/tool").st_nlink == 1
    assert not host.store.exists() or not any(host.store.rglob("*/*"))


def test_vsattr_show_set_clear(host, tmp_path):
    f = host.base / "file"
    f.write_bytes(b"x" * 20)

    def vsattr(*a):
        return subprocess.run(
            [sys.executable, "-m", "vsstore.vsattr", *a], cwd=REPO, capture_output=True, text=True
        )

    assert vsattr("show", str(f)).stdout.split()[0] == "uia"
    assert vsattr("set", "--iunlink", str(f)).returncode == 0
    assert vsattr("show", str(f)).stdout.split()[0] == "Uia"
    assert vsattr("set", "--immutable", str(f)).returncode == 0
    assert vsattr("show", str(f)).stdout.split()[0] == "UIa"
    assert vsattr("clear", "--iunlink", str(f)).returncode == 0
    assert vsattr("show", str(f)).stdout.split()[0] == "uIa"
    assert vsattr("clear", str(f)).returncode == 0
    assert vsattr("show", str(f)).stdout.split()[0] == "uia"
    os.symlink(f, host.base / "link")
    p = vsattr("show", str(host.base / "link"))
    assert p.returncode == EXIT_PARTIAL and "symlink" in p.stderr


def test_progress_line_on_a_terminal_only(host):
    import pty

    for g in "ab":
        host.guest(g, {f"usr/f{i}": BIN + bytes([i]) * 5000 for i in range(200)})
    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "unify.cli", "run", "a", "b"],
        cwd=REPO,
        env={**os.environ, **host.env},
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    p.wait()
    os.close(master)
    assert p.returncode == 0
    assert b"files" in seen and b"\r" in seen  # a live line, redrawn in place
    quiet = host.vsunify("run", "a", "b")  # stderr is a pipe: no progress line
    assert "\r" not in quiet.stderr


DPKG_STATUS = """\
Package: demo
Status: install ok installed
Conffiles:
 /etc/demo.conf 0123456789abcdef0123456789abcdef
 /usr/share/demo/defaults.conf 0123456789abcdef0123456789abcdef
"""


def test_package_database_excludes_by_default(host):
    for g in "ab":
        host.guest(
            g,
            {
                "usr/share/demo/defaults.conf": BIN,
                "usr/bin/tool": LIB,
                "var/lib/dpkg/status": DPKG_STATUS.encode(),
            },
        )
    out = host.vsunify("excludes", "a").stdout
    assert "/usr/share/demo/defaults.conf" in out and "dpkg conffile (demo)" in out
    res = host.run_json("--no-default-excludes", "a", "b")
    assert res["files_linked"] == 2  # the tool and the status file; never the conffile
    assert os.stat(host.root / "a/usr/share/demo/defaults.conf").st_nlink == 1
    assert "dpkg conffile" not in host.vsunify("excludes", "--no-pkgdb-excludes", "a").stdout
    res = host.run_json("--no-default-excludes", "--no-pkgdb-excludes", "a", "b")
    assert res["files_linked"] == 1
    assert os.stat(host.root / "a/usr/share/demo/defaults.conf").st_nlink == 3


def test_a_corrupt_package_database_warns_and_excludes_conservatively(host):
    for g in "ab":
        host.guest(
            g,
            {
                "etc/motd": BIN,
                "usr/bin/tool": LIB,
                "var/lib/dpkg/status": b"Package: x\nStatus: garbage\n",
            },
        )
    p = host.vsunify("run", "--json", "--no-default-excludes", "a", "b")
    assert "/var/lib/dpkg/status" in p.stderr and "malformed Status" in p.stderr
    assert "'a'" in p.stderr and "Traceback" not in p.stderr
    assert os.stat(host.root / "a/etc/motd").st_nlink == 1  # /etc kept private
    assert os.stat(host.root / "a/usr/bin/tool").st_nlink == 3  # the rest unified
    out = host.vsunify("excludes", "a").stdout
    assert "fallback: unreadable dpkg database" in out


HOSTILE = [os.fsdecode(b"\xff\xfe"), "new\nline", "tab\tx", "-rf", "--help", "esc\x1b[2J"]
HOSTILE_SHOWN = ["\\xff\\xfe", "new\\nline", "tab\\tx", "-rf", "--help", "esc\\x1b[2J"]


def test_hostile_names_through_every_command(host):
    """Duplicates named with undecodable bytes, newline, tab, escape sequences or like an
    option are linked in one run; every message, table and JSON value shows them escaped,
    so nothing fails to print and no name can forge a line."""
    files = {f"usr/lib/{n}": LIB + os.fsencode(n) for n in HOSTILE}
    files["-rf"] = BIN
    for g in "ab":
        host.guest(g, files)
    before = snapshot(host.root / "b")
    w = os.open(host.root / "b/usr/lib/new\nline", os.O_WRONLY)  # one is busy: a message
    try:
        p = host.vsunify("run", "--json", "--all", check=False)
    finally:
        os.close(w)
    assert p.returncode == EXIT_PARTIAL, p.stderr
    out = json.loads(p.stdout)
    assert out["files_linked"] == len(files) - 1 and out["errors"] == 1
    assert out["messages"] == [
        "b:/usr/lib/new\\nline: skipped: open for writing by another process"
    ]
    assert "b:/usr/lib/new\\nline: skipped" in p.stderr and "Traceback" not in p.stderr
    assert not any(line.startswith("line") for line in p.stderr.splitlines())
    out = host.run_json("--all")
    assert out["files_linked"] == 1 and out["errors"] == 0
    for rel in [f"usr/lib/{n}" for n in HOSTILE] + ["-rf"]:
        assert inode(host.root / "a" / rel) == inode(host.root / "b" / rel), rel
    assert snapshot(host.root / "b") == before

    rep = json.loads(host.vsunify("report", "--json", "--all").stdout)
    tops = {f["path"] for f in rep["top_shared"]}
    for s in HOSTILE_SHOWN:
        assert f"a:/usr/lib/{s}" in tops, (s, tops)
    table = host.vsunify("report", "--all").stdout
    assert "a:/usr/lib/\\xff\\xfe" in table and "a:/usr/lib/esc\\x1b[2J" in table
    assert "\x1b" not in table

    p = host.vsunify("deunify", "--json", "b", "--", "-rf", "/usr/lib/" + HOSTILE[0])
    assert json.loads(p.stdout) == {"files": 2, "bytes": len(BIN) + len(LIB) + 2, "errors": 0}
    assert os.stat(host.root / "b/-rf").st_nlink == 1
    assert os.stat(host.root / "b/usr/lib" / HOSTILE[0]).st_nlink == 1
    assert os.stat(host.root / "b/usr/lib/tab\tx").st_nlink == 3
    assert snapshot(host.root / "b") == before
    p = host.vsunify("deunify", "b")
    assert p.stdout.startswith("vsunify: b: 5 files made private")


def test_excludes_show_hostile_package_database_entries_escaped(host):
    status = (
        b"Package: evil\x1b[2J\nStatus: install ok installed\nConffiles:\n"
        b" /usr/share/evil/\xff\xfe.conf 0123456789abcdef0123456789abcdef\n"
    )
    for g in "ab":
        host.guest(
            g,
            {"usr/share/evil/" + os.fsdecode(b"\xff\xfe.conf"): BIN, "var/lib/dpkg/status": status},
        )
    p = host.vsunify("excludes", "a")
    assert "/usr/share/evil/\\xff\\xfe.conf  dpkg conffile (evil\\x1b[2J)" in p.stdout
    assert "\x1b" not in p.stdout
    rules = json.loads(host.vsunify("excludes", "--json", "a").stdout)
    assert {
        "rule": "/usr/share/evil/\\xff\\xfe.conf",
        "reason": "dpkg conffile (evil\\x1b[2J)",
    } in rules
    res = host.run_json("--no-default-excludes", "a", "b")
    assert res["files_linked"] == 1 and res["errors"] == 0  # the status file, not the conffile
    assert os.stat(host.root / "a/usr/share/evil" / os.fsdecode(b"\xff\xfe.conf")).st_nlink == 1


def _copies(top, n: int, per_dir: int, data: bytes) -> list[str]:
    """``n`` separate files with the same content and mtime, ``per_dir`` to a directory."""
    rels = []
    for i in range(n):
        d = top / f"d{i // per_dir}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.utime(fd, (1_600_000_000, 1_600_000_000))
        finally:
            os.close(fd)
        rels.append(f"d{i // per_dir}/f{i}")
    return rels


def test_a_group_larger_than_the_open_file_limit_is_linked_in_one_run(host):
    """66,002 identical files with the run's open-file limit at 1024 (hard 4096): the soft
    limit is raised, the group is linked a window at a time, and when the object reaches
    ext4's 65,000 links the rest become its next generation, all in one run."""
    a = host.guest("a", {})
    small = b"one small file, many copies\n"
    rels = _copies(a / "usr/share/many", 66_002, 1000, small)
    p = host.vsunify("run", "--json", "-v", "a", wrap=("prlimit", "--nofile=1024:4096"))
    assert "open files: soft limit raised from 1024 to 4096" in p.stderr
    out = json.loads(p.stdout)
    assert (out["files_linked"], out["objects_created"], out["errors"]) == (66_000, 2, 0)
    objs = sorted(q for q in host.store.rglob("*") if q.is_file())
    assert [q.name[-2:] for q in objs][1:] == [".1"]
    first, second = (os.stat(q) for q in objs)
    assert first.st_nlink == 65_000  # the store's name and 64,999 guest names
    assert second.st_nlink == 66_002 - 64_999 + 1  # the rest, and the store's name
    held = Counter(os.lstat(a / "usr/share/many" / r).st_ino for r in rels)
    assert held == {first.st_ino: 64_999, second.st_ino: 66_002 - 64_999}
    assert (a / "usr/share/many" / rels[-1]).read_bytes() == small


def test_a_run_fits_a_low_hard_open_file_limit(host):
    """With the hard limit at 64 nothing can be raised: windows and the directory cache
    shrink to fit, and a group of 3,000 files, each in its own directory, is linked."""
    a = host.guest("a", {})
    rels = _copies(a / "usr/share/many", 3000, 1, LIB)
    p = host.vsunify("run", "--json", "a", wrap=("prlimit", "--nofile=64:64"))
    out = json.loads(p.stdout)
    assert (out["files_linked"], out["objects_created"], out["errors"]) == (2999, 1, 0)
    inos = {os.lstat(a / "usr/share/many" / r).st_ino for r in rels}
    assert len(inos) == 1 and os.stat(a / "usr/share/many" / rels[0]).st_nlink == 3001


def test_a_full_index_filesystem_is_its_own_exit_code_and_changes_nothing(host):
    with small_fs(host.base / "state", 1) as state:
        for g in "ab":
            host.guest(g, distro())
        host.vsunify("run", "--all")  # an index that knows a and b
        host.guest("c", distro())
        before = {g: snapshot(host.root / g) for g in "abc"}
        filler = fill(state)
        p = host.vsunify("run", "--all", check=False)
        _fails(
            p,
            EXIT_NOSPACE,
            f"no space left on {state} for the index {host.index}",
            f"free space on {state} and run again",
        )
        assert {g: snapshot(host.root / g) for g in "abc"} == before
        assert os.stat(host.root / "c/usr/bin/tool").st_nlink == 1
        assert not list(host.root.rglob(".vsu~*"))
        assert not [q for q in state.iterdir() if "corrupt" in q.name]  # never moved aside
        _fails(host.vsunify("report", "--all", check=False), EXIT_NOSPACE, "no space left")
        filler.unlink()
        out = host.run_json("--all")
        # Only c's files are read: the index (a cache, but a costly one) came through whole.
        assert (out["files_hashed"], out["files_linked"], out["errors"]) == (3, 3, 0)
        assert inode(host.root / "c/usr/bin/tool") == inode(host.root / "a/usr/bin/tool")


def test_deunify_on_a_full_guest_filesystem_stops_cleanly(host):
    with small_fs(host.root, 16, "ext4") as root:
        for g in "ab":
            host.guest(g, distro())
        host.vsunify("run", "--all")
        before = snapshot(root / "a")
        filler = fill(root)
        p = host.vsunify("deunify", "a", check=False)
        _fails(
            p,
            EXIT_NOSPACE,
            f"no space left on {root} for a private copy of a:/",
            "0 files were made private",
        )
        assert snapshot(root / "a") == before
        assert not list(root.rglob(".vsu~*"))
        assert os.stat(root / "a/usr/bin/tool").st_nlink == 3
        filler.unlink()
        assert json.loads(host.vsunify("deunify", "--json", "a").stdout)["files"] == 3
        assert os.stat(root / "a/usr/bin/tool").st_nlink == 1


def test_a_dangling_vdir_does_not_stop_the_other_guests(host):
    for g in "ab":
        host.guest(g, distro())
    broken = host.conf / "gone"
    broken.mkdir(parents=True)
    os.symlink(host.base / "nowhere", broken / "vdir")
    host.guest("gone", distro(), configure=False)  # the default tree must not stand in for it
    p = host.vsunify("run", "--json", "--all", check=False)
    assert p.returncode == EXIT_PARTIAL and "Traceback" not in p.stderr
    assert (
        f"left out: guest 'gone': its vdir {broken / 'vdir'} leads to "
        f"{host.base / 'nowhere'}, which is not a directory" in p.stderr
    )
    out = json.loads(p.stdout)
    assert (out["guests"], out["files_linked"], out["errors"]) == (2, 3, 0)
    assert inode(host.root / "a/usr/bin/tool") == inode(host.root / "b/usr/bin/tool")
    assert os.stat(host.root / "gone/usr/bin/tool").st_nlink == 1
    rep = host.vsunify("report", "--json", "--all")
    assert set(json.loads(rep.stdout)["guests"]) == {"a", "b"} and "'gone'" in rep.stderr
    _fails(host.vsunify("run", "gone", check=False), EXIT_CONFIG, "'gone'", "vdir")


def test_run_refuses_a_path_that_is_no_guest_unless_forced(host):
    """``vsunify run --dry-run /usr`` on the host: a path neither configured nor under the
    guests' root is refused with exit 12 and says why; --force-path takes it; a configured
    guest's tree elsewhere (its vdir) and a tree under the root are taken as ever."""
    foreign = host.base / "elsewhere"
    for d in ("x", "y"):
        (foreign / d / "usr").mkdir(parents=True)
        (foreign / d / "usr/tool").write_bytes(BIN)
    p = host.vsunify("run", "--dry-run", str(foreign / "x"), str(foreign / "y"), check=False)
    assert p.returncode == EXIT_NOTGUEST, p
    assert len(p.stderr.splitlines()) == 1
    assert str(foreign / "x") in p.stderr and "--force-path" in p.stderr
    assert "Traceback" not in p.stderr
    forced = host.vsunify(
        "run", "--dry-run", "--json", "--force-path", str(foreign / "x"), str(foreign / "y")
    )
    assert json.loads(forced.stdout)["files_scanned"] == 2
    host.guest("a", distro())
    conf = host.base / "etc/vservers/b"
    conf.mkdir(parents=True)
    (conf / "vdir").symlink_to(foreign / "y")  # configured, its tree elsewhere
    host.vsunify("run", "--dry-run", str(host.root / "a"), str(foreign / "y"))
