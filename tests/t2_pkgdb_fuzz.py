"""Layer 2: every package-database reader against mutated databases (hypothesis).  Only the
reader's own error type may escape; time and memory stay bounded."""

from __future__ import annotations

import importlib
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vsstore.pkgdb.base import Budget, Limits, PkgDbError
from vsstore.safetree import GuestTree

FIXTURES = Path(__file__).parent / "fixtures"
LIMITS = Limits(
    max_file_bytes=1 << 20,
    max_total_bytes=4 << 20,
    max_packages=2000,
    max_paths=20000,
    max_line_bytes=1 << 16,
    max_header_entries=5000,
)
MEMORY_CEILING = 64 << 20

SEEDS: dict[str, dict[str, bytes]] = {
    "dpkg": {
        "var/lib/dpkg/status": b"Package: a\nStatus: install ok installed\nArchitecture: amd64"
        b"\nConffiles:\n /etc/a.conf 0123456789abcdef0123456789abcdef\n"
        b"\nPackage: b\nStatus: deinstall ok config-files\nConffiles:\n"
        b" /etc/b 0123456789abcdef0123456789abcdef obsolete\n",
        "var/lib/dpkg/info/a:amd64.list": b"/.\n/etc\n/etc/a.conf\n/usr/bin/a\n",
        "var/lib/dpkg/info/a:amd64.md5sums": b"d41d8cd98f00b204e9800998ecf8427e  usr/bin/a\n",
        "var/lib/dpkg/info/a:amd64.conffiles": b"/etc/a.conf\n",
    },
    "apk": {
        "lib/apk/db/installed": b"C:Q1abc=\nP:musl\nV:1\nF:lib\nR:ld.so\n"
        b"Z:Q1Qv5eDdlTnDA1ZzcBDyMAkvm0g2k=\nF:etc\nR:motd\n\nP:b\nF:bin\n"
        b"R:busybox\n",
        "etc/apk/protected_paths.d/x.list": b"+usr/local/etc\n",
    },
    "pacman": {
        "var/lib/pacman/local/a-1-1/desc": b"%NAME%\na\n\n%VERSION%\n1-1\n",
        "var/lib/pacman/local/a-1-1/files": b"%FILES%\netc/\netc/a.conf\nusr/bin/a\n\n"
        b"%BACKUP%\netc/a.conf\t0123456789abcdef0123"
        b"456789abcdef\n",
    },
}
# rpm: the three formats its reader knows, from the committed fixtures (tests/fixtures/rpm).
for _seed, _fixture, _rel in (
    ("rpm", "rpmdb.sqlite", "var/lib/rpm/rpmdb.sqlite"),
    ("rpm-ndb", "Packages.db", "var/lib/rpm/Packages.db"),
    ("rpm-bdb", "Packages", "var/lib/rpm/Packages"),
):
    SEEDS[_seed] = {_rel: (FIXTURES / "rpm" / _fixture).read_bytes()}

edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "insert", "repeat"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=64),
    ),
    min_size=1,
    max_size=8,
)


def mutate(data: bytes, ops: list[tuple[str, float, bytes]]) -> bytes:
    b = bytearray(data)
    for op, where, blob in ops:
        i = int(where * len(b))
        if op == "flip" and b:
            for k, x in enumerate(blob):
                if i + k < len(b):
                    b[i + k] ^= x
        elif op == "cut":
            del b[i : i + len(blob) * 16]
        elif op == "insert":
            b[i:i] = blob
        elif op == "repeat":
            b[i:i] = bytes(b[i : i + 256]) * (len(blob) % 8 + 1)
    return bytes(b)


@pytest.mark.parametrize("manager", sorted(SEEDS))
@settings(max_examples=300, deadline=3000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_databases_only_ever_raise_the_readers_error(manager, data):
    reader = importlib.import_module(f"vsstore.pkgdb.{manager.split('-')[0]}").read
    files = SEEDS[manager]
    victim = data.draw(st.sampled_from(sorted(files)))
    ops = data.draw(edits)
    base = Path(tempfile.mkdtemp(prefix="vsstore-fuzz-"))
    try:
        for rel, content in files.items():
            p = base / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(mutate(content, ops) if rel == victim else content)
        tracemalloc.start()
        try:
            with GuestTree(base, "fuzz") as tree:
                try:
                    res = reader(Budget(tree, LIMITS))
                except PkgDbError as e:
                    assert "fuzz" in e.message  # names the guest (and the file)
                    event("rejected")
                    res = None
                else:
                    event("read")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < MEMORY_CEILING
        if res is not None:
            assert all(p.startswith("/") and "/../" not in p + "/" for p in res.owned)
            assert len(res.owned) <= LIMITS.max_paths
    finally:
        shutil.rmtree(base)
