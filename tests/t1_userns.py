"""Layer 1: a guest's user-namespace configuration (userns/{uid,gid}) read and checked, and
free ranges picked, without starting anything."""

from __future__ import annotations

import pytest

from vsstore.errors import ConfigError
from vsstore.lifecycle import userns


def _conf(tmp_path, name: str, uid: str | None, gid: str | None):
    d = tmp_path / name
    (d / "userns").mkdir(parents=True)
    if uid is not None:
        (d / "userns/uid").write_text(uid)
    if gid is not None:
        (d / "userns/gid").write_text(gid)
    return d


def test_no_directory_means_no_user_namespace(tmp_path):
    (tmp_path / "g").mkdir()
    assert userns.read(tmp_path / "g") is None


def test_ranges_and_auto_are_read(tmp_path):
    d = _conf(tmp_path, "g", "1048576 65536\n", "auto\n")
    assert userns.read(d) == ((1048576, 65536), "auto")


@pytest.mark.parametrize(
    ("uid", "gid", "words"),
    [
        ("lots\n", "auto\n", ["userns/uid", "START COUNT", "auto"]),
        ("1000 65536\n", "auto\n", ["userns/uid", "at least 65536"]),
        ("1048576 0\n", "auto\n", ["userns/uid", "COUNT"]),
        ("4294967295 2\n", "auto\n", ["userns/uid"]),
        ("auto\n", None, ["userns/gid", "missing"]),
        ("1048576 65536 7\n", "auto\n", ["userns/uid"]),
    ],
)
def test_a_bad_file_is_an_error_naming_it_and_the_fix(tmp_path, uid, gid, words):
    d = _conf(tmp_path, "g", uid, gid)
    with pytest.raises(ConfigError) as e:
        userns.read(d)
    for w in words:
        assert w in e.value.message


def test_a_binary_file_is_a_clear_error(tmp_path):
    d = _conf(tmp_path, "g", None, "auto\n")
    (d / "userns/uid").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not text"):
        userns.read(d)


def test_pick_skips_every_range_given_out():
    base, size = userns.AUTO_BASE, userns.AUTO_SIZE
    assert userns.pick([]) == base
    assert userns.pick([(base, size)]) == base + size
    assert userns.pick([(base + 5, 1)]) == base + size  # any overlap moves it on
    assert userns.pick([(base, size), (base + 2 * size, size)]) == base + size
    assert userns.pick([(100000, 65536), (base, 3 * size + 1)]) == base + 4 * size


def test_resolve_records_auto_and_never_gives_two_guests_the_same_ids(tmp_path):
    _conf(tmp_path, "a", "auto\n", "auto\n")
    _conf(tmp_path, "b", "auto\n", "auto\n")
    ma = userns.resolve(tmp_path, "a")
    mb = userns.resolve(tmp_path, "b")
    assert ma is not None and mb is not None
    assert (tmp_path / "a/userns/uid").read_text() == f"{ma.uid} 65536\n"
    assert abs(ma.uid - mb.uid) >= 65536
    assert userns.resolve(tmp_path, "a") == ma  # recorded: the same at every start


def test_enable_refuses_an_overlap_and_a_cow_guest(tmp_path):
    _conf(tmp_path, "a", "2000000000 65536\n", "2000000000 65536\n")
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="overlap"):
        userns.enable(tmp_path, "b", 2000000000 + 100)
    m = userns.enable(tmp_path, "b", 2000000000 + 65536)
    assert m.uid_map() == f"0 {2000000000 + 65536} 65536\n"
    (tmp_path / "c").mkdir()
    (tmp_path / "c/cow").write_text("")
    with pytest.raises(ConfigError, match="cow"):
        userns.enable(tmp_path, "c")
    assert userns.disable(tmp_path / "b") and not (tmp_path / "b/userns").exists()
    assert not userns.disable(tmp_path / "b")


def test_a_hand_written_range_overlapping_another_guests_is_refused_at_start(tmp_path):
    _conf(tmp_path, "a", "2000000000 65536\n", "2000000000 65536\n")
    _conf(tmp_path, "b", "2000000100 65536\n", "auto\n")
    with pytest.raises(ConfigError) as e:
        userns.resolve(tmp_path, "b")
    assert "b/userns/uid" in e.value.message and "overlap" in e.value.message
    assert (tmp_path / "b/userns/gid").read_text() == "auto\n"  # nothing written
