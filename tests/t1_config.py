"""Layer 1: configuration roots and guest resolution."""

from __future__ import annotations

import os

import pytest

from vsstore.config import Paths, configured_guests, configured_names, resolve_guest
from vsstore.errors import ConfigError


def test_defaults_and_environment():
    p = Paths.from_env({})
    assert (str(p.confdir), str(p.vservers_root), str(p.statedir), str(p.rundir)) == (
        "/etc/vservers",
        "/vservers",
        "/var/lib/vsstore",
        "/run/vsstore",
    )
    assert str(p.default_store) == "/vservers/.hash"
    q = Paths.from_env(
        {
            "VSERVERS_CONFDIR": "/a",
            "VSERVERS_ROOT": "/b",
            "VSSTORE_STATEDIR": "/c",
            "VSSTORE_RUNDIR": "/d",
        }
    )
    assert (str(q.confdir), str(q.vservers_root), str(q.index_file), str(q.rundir)) == (
        "/a",
        "/b",
        "/c/index.sqlite",
        "/d",
    )


def test_guest_by_name_path_and_vdir(tmp_path):
    paths = Paths.from_env(
        {"VSERVERS_CONFDIR": str(tmp_path / "conf"), "VSERVERS_ROOT": str(tmp_path / "vs")}
    )
    (tmp_path / "vs" / "plain").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "conf" / "web").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "conf" / "web" / "vdir")
    assert resolve_guest("plain", paths).root == tmp_path / "vs" / "plain"
    assert resolve_guest("web", paths).root == elsewhere
    assert resolve_guest(str(elsewhere), paths).name == "elsewhere"
    assert [g.name for g in configured_guests(paths)] == ["web"]
    with pytest.raises(ConfigError, match="no configuration"):
        resolve_guest("nosuch", paths)
    with pytest.raises(ConfigError, match="not valid"):
        resolve_guest("-rf", paths)
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_guest(str(tmp_path / "missing"), paths)


def test_a_dangling_vdir_is_an_error_for_that_guest_only(tmp_path):
    paths = Paths.from_env(
        {"VSERVERS_CONFDIR": str(tmp_path / "conf"), "VSERVERS_ROOT": str(tmp_path / "vs")}
    )
    for name in ("ok", "gone"):
        (tmp_path / "conf" / name).mkdir(parents=True)
        (tmp_path / "vs" / name).mkdir(parents=True)  # the default tree must not stand in
    os.symlink(tmp_path / "nowhere", tmp_path / "conf" / "gone" / "vdir")
    with pytest.raises(ConfigError, match="vdir .* leads to .*nowhere, which is not a dir"):
        resolve_guest("gone", paths)
    with pytest.raises(ConfigError, match="'gone'"):
        configured_guests(paths)
    broken: list[ConfigError] = []
    assert [g.name for g in configured_guests(paths, broken)] == ["ok"]
    assert len(broken) == 1 and str(tmp_path / "conf" / "gone" / "vdir") in broken[0].message
    assert configured_names(paths) == ["gone", "ok"]
