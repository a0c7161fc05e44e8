"""Layer 2: package-database readers (dpkg, apk, pacman) on real files, and the exclude
rules they produce.  The rpm reader has its own file (t2_pkgdb_rpm.py)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vsstore.pkgdb import apk, config_rules, dpkg, pacman, read_all
from vsstore.pkgdb.base import Budget, Limits, PkgDbError
from vsstore.safetree import GuestTree

CORPUS = Path(os.environ.get("VSSTORE_BENCH_CACHE", "/var/cache/vsstore-bench")) / "debian"
DEBIAN = CORPUS / "bookworm-services"

STATUS = """\
Package: base-files
Status: install ok installed
Architecture: amd64
Conffiles:
 /etc/debian_version 3a1c53cb8e2c2a1e0c3a1a2f0f0d3c4b
 /etc/host.conf 4eb63731c9f5e30903ac4fc07a7fe3d6
 /etc/old.conf 0123456789abcdef0123456789abcdef obsolete

Package: gone
Status: deinstall ok not-installed
Conffiles:
 /etc/gone.conf 0123456789abcdef0123456789abcdef

Package: removed-keeps-config
Status: deinstall ok config-files
Conffiles:
 /etc/kept[1].conf 0123456789abcdef0123456789abcdef
"""


def guest(tmp_path: Path, files: dict[str, str | bytes]) -> GuestTree:
    root = tmp_path / "g"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    root.mkdir(exist_ok=True)
    return GuestTree(root, "g")


def budget(tree: GuestTree, **limits: int) -> Budget:
    return Budget(tree, Limits(**limits))


def test_dpkg_status_info_lists_and_digests(tmp_path):
    t = guest(
        tmp_path,
        {
            "var/lib/dpkg/status": STATUS,
            "var/lib/dpkg/info/base-files:amd64.conffiles": "/etc/debian_version\n/etc/extra\n",
            "var/lib/dpkg/info/base-files:amd64.list": "/.\n/etc\n/etc/debian_version\n/usr/bin/x\n",
            "var/lib/dpkg/info/base-files:amd64.md5sums": "d41d8cd98f00b204e9800998ecf8427e  usr/bin/x\n",
            "var/lib/dpkg/info/gone.conffiles": "/etc/gone.conf\n",
        },
    )
    r = dpkg.read(budget(t))
    assert r is not None and r.source == "/var/lib/dpkg/status"
    assert r.config == {
        "/etc/debian_version": "base-files",
        "/etc/host.conf": "base-files",
        "/etc/old.conf": "base-files",
        "/etc/extra": "base-files",
        "/etc/kept[1].conf": "removed-keeps-config",
    }
    assert r.owned == {
        "/etc": None,
        "/etc/debian_version": None,
        "/usr/bin/x": "md5:d41d8cd98f00b204e9800998ecf8427e",
    }


@pytest.mark.skipif(not (DEBIAN / ".complete").exists(), reason=f"no Debian corpus in {CORPUS}")
def test_dpkg_on_a_debootstrapped_guest_matches_the_conffiles_util_vserver_read():
    expected = set()
    info = DEBIAN / "var/lib/dpkg/info"
    for f in info.glob("*.conffiles"):  # what `cat info/*.conffiles` gave util-vserver
        expected |= {line.split()[0] for line in f.read_text().splitlines() if line.strip()}
    with GuestTree(DEBIAN, "deb") as t:
        r = dpkg.read(budget(t))
    assert r is not None and set(r.config) == expected and len(expected) > 50
    listed = set()
    for f in info.glob("*.list"):
        listed |= {line for line in f.read_text().splitlines() if line and line != "/."}
    assert set(r.owned) == listed
    assert sum(1 for d in r.owned.values() if d) > 1000


@pytest.mark.parametrize(
    "text,what",
    [
        ("Package: x\nStatus: install ok\n", "malformed Status"),
        ("Status: install ok installed\n", "without a Package"),
        ("Package: x\nStatus: install ok installed\nthis line is no field\n", "not a 'Field"),
        (" continuation\n", "continuation line outside"),
        ("Package: x\nStatus: install ok installed\nConffiles:\n /etc/../../x 00\n", "'..'"),
    ],
)
def test_dpkg_malformed_status_names_file_and_problem(tmp_path, text, what):
    t = guest(tmp_path, {"var/lib/dpkg/status": text})
    with pytest.raises(PkgDbError) as e:
        dpkg.read(budget(t))
    assert "/var/lib/dpkg/status" in e.value.message and what in e.value.message


def test_limits_bound_what_a_hostile_database_costs(tmp_path):
    many = "".join(f"Package: p{i}\nStatus: install ok installed\n\n" for i in range(50))
    t = guest(tmp_path, {"var/lib/dpkg/status": many})
    with pytest.raises(PkgDbError, match="more than 10 stanzas"):
        dpkg.read(budget(t, max_packages=10))
    with pytest.raises(PkgDbError, match="limit"):
        dpkg.read(budget(t, max_file_bytes=100))
    long = "Package: x\nStatus: install ok installed\nDescription: " + "y" * 5000 + "\n"
    t2 = guest(tmp_path / "2", {"var/lib/dpkg/status": long})
    with pytest.raises(PkgDbError, match="longer than"):
        dpkg.read(budget(t2, max_line_bytes=1000))


def test_a_symlinked_database_is_not_followed(tmp_path):
    outside = tmp_path / "host-status"
    outside.write_text(STATUS)
    t = guest(tmp_path, {"var/lib/dpkg/.keep": ""})
    os.symlink(outside, t.root / "var/lib/dpkg/status")
    assert dpkg.read(budget(t)) is None  # not there as a file: the guest has no dpkg db
    os.unlink(t.root / "var/lib/dpkg/status")
    os.mkdir(t.root / "var/lib/dpkg/status-dir")
    os.rename(t.root / "var/lib/dpkg", t.root / "var/lib/real")
    os.symlink(tmp_path, t.root / "var/lib/dpkg")  # a directory symlink out of the guest
    assert dpkg.read(budget(t)) is None


APK = """\
C:Q1abc=
P:musl
V:1.2.4-r2
F:lib
R:ld-musl-x86_64.so.1
Z:Q1Qv5eDdlTnDA1ZzcBDyMAkvm0g2k=
F:etc
R:motd
Z:Q1Qv5eDdlTnDA1ZzcBDyMAkvm0g2k=

P:busybox
F:usr/local/etc
R:busybox.conf
F:bin
R:busybox
"""


def test_apk_installed_and_protected_paths(tmp_path):
    t = guest(
        tmp_path,
        {
            "lib/apk/db/installed": APK,
            "etc/apk/protected_paths.d/local.list": "+usr/local/etc\n-etc/x\n",
        },
    )
    r = apk.read(budget(t))
    assert r is not None
    assert r.config == {"/etc/motd": "musl", "/usr/local/etc/busybox.conf": "busybox"}
    assert r.owned["/lib/ld-musl-x86_64.so.1"] == "sha1:42fe5e0dd9539c30356737010f230092f9b48369"
    assert r.owned["/bin/busybox"] is None
    bad = guest(tmp_path / "b", {"lib/apk/db/installed": "P:x\nR:a/b\n"})
    with pytest.raises(PkgDbError, match="bad file name"):
        apk.read(budget(bad))


def test_pacman_backup_entries_are_config(tmp_path):
    t = guest(
        tmp_path,
        {
            "var/lib/pacman/local/ALPM_DB_VERSION": "9\n",
            "var/lib/pacman/local/openssh-9.6-1/desc": "%NAME%\nopenssh\n\n%VERSION%\n9.6-1\n",
            "var/lib/pacman/local/openssh-9.6-1/files": "%FILES%\netc/\netc/ssh/\netc/ssh/sshd_config\nusr/bin/ssh\n\n"
            "%BACKUP%\netc/ssh/sshd_config\t0123456789ABCDEF0123456789abcdef\n",
        },
    )
    r = pacman.read(budget(t))
    assert r is not None and r.config == {"/etc/ssh/sshd_config": "openssh"}
    assert r.owned == {
        "/etc/ssh/sshd_config": "md5:0123456789abcdef0123456789abcdef",
        "/usr/bin/ssh": None,
    }
    bad = guest(tmp_path / "b", {"var/lib/pacman/local/x-1-1/files": "%BACKUP%\netc/x\n"})
    with pytest.raises(PkgDbError, match="without a digest"):
        pacman.read(budget(bad))


def test_config_rules_reasons_and_the_conservative_fallback(tmp_path):
    t = guest(
        tmp_path, {"var/lib/dpkg/status": STATUS, "lib/apk/db/installed": "P:x\nR:a/b\n"}
    )  # a broken apk db
    rules, warnings = config_rules(t)
    by_path = {r.pattern: r.reason for r in rules}
    assert by_path["/etc/host.conf"] == "dpkg conffile (base-files)"
    assert by_path["/etc/kept[1].conf"] == "dpkg conffile (removed-keeps-config)"
    assert by_path["/etc"] == "fallback: unreadable apk database"
    assert len(warnings) == 1 and "/lib/apk/db/installed" in warnings[0] and "'g'" in warnings[0]
    found, failed = read_all(t)
    assert [f.manager for f in found] == ["dpkg"] and [m for m, _ in failed] == ["apk"]


def test_no_database_means_no_rules_and_no_warnings(tmp_path):
    t = guest(tmp_path, {"usr/bin/x": "x"})
    assert config_rules(t) == ([], [])


@pytest.mark.skipif(not (DEBIAN / ".complete").exists(), reason=f"no Debian corpus in {CORPUS}")
def test_reading_never_runs_guest_code():
    # The readers are pure Python: reading a real guest's databases starts no process.
    code = (
        "import os, sys; from vsstore.safetree import GuestTree; "
        "from vsstore.pkgdb import read_all; "
        "os.fork = os.execv = os.execve = os.posix_spawn = None; "
        f"t = GuestTree({str(DEBIAN)!r}); f, e = read_all(t); "
        "sys.exit(0 if f and not e else 1)"
    )
    import sys

    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_config_only_reading_skips_the_owned_lists(tmp_path):
    t = guest(
        tmp_path,
        {
            "var/lib/dpkg/status": STATUS,
            "var/lib/dpkg/info/base-files:amd64.conffiles": "/etc/extra\n",
            "var/lib/dpkg/info/base-files:amd64.list": "/usr/bin/x\n",
        },
    )
    full = dpkg.read(Budget(t, Limits()))
    lean = dpkg.read(Budget(t, Limits(), want_owned=False))
    assert full is not None and lean is not None
    assert lean.config == full.config and "/etc/extra" in lean.config
    assert full.owned and not lean.owned
