"""Layer 1: exclude rules, pure functions."""

from __future__ import annotations

import pytest

from vsstore.errors import ConfigError
from vsstore.excludes import ExcludeList, build_excludes, parse_rule, read_rules


def rules(*lines: str) -> ExcludeList:
    return ExcludeList(parse_rule(line, "test") for line in lines)


def test_default_list_covers_the_config_and_state_directories():
    ex = build_excludes()
    for rel in (
        "etc/passwd",
        "var/lib/dpkg/status",
        "home/u/.bashrc",
        "root/.profile",
        "tmp/x",
        "proc/1/maps",
        "sys/kernel/x",
        "dev/null",
        "run/utmp",
        "mnt/x",
        "boot/vmlinuz",
    ):
        assert ex.excluded(rel), rel
    for rel in (
        "usr/bin/ls",
        "lib/x86_64-linux-gnu/libc.so.6",
        "sbin/init",
        "etcetera/x",
        "usr/share/var/x",
    ):
        assert not ex.excluded(rel), rel


def test_no_default_excludes_means_no_rules():
    ex = build_excludes(use_default=False)
    assert not ex.excluded("etc/passwd")
    assert ex.rules == []


def test_first_matching_rule_decides_and_plus_includes():
    ex = build_excludes(cli=["+/etc/ssl/certs/*"])
    assert not ex.excluded("etc/ssl/certs/ca.pem")
    assert ex.excluded("etc/ssl/private/key.pem")
    assert ex.match("etc/ssl/certs/ca.pem").reason == "--exclude"
    assert ex.match("etc/passwd").reason == "default list"


def test_glob_and_basename_rules():
    ex = rules("/usr/lib/*.pyc", "~*.conf", "-/opt/x?y")
    assert ex.excluded("usr/lib/python3/a/b.pyc")  # '*' crosses '/' in path rules
    assert ex.excluded("srv/app/site.conf")  # '~' matches the name anywhere
    assert not ex.excluded("srv/app.conf.d/x")  # ... the name, not a directory
    assert ex.excluded("opt/xay")
    assert not ex.excluded("opt/xaay")


def test_character_classes():
    ex = rules("/usr/share/locale/[!e]*")
    assert ex.excluded("usr/share/locale/de/x")
    assert not ex.excluded("usr/share/locale/en/x")


def test_prune_only_when_no_include_can_reach_below():
    ex = build_excludes(cli=["+/var/lib/shared/*"])
    assert ex.prune("etc")
    assert ex.prune("var/log")
    assert not ex.prune("var")  # an include lies below
    assert not ex.prune("var/lib")
    assert not ex.prune("usr")
    assert not rules("+~*.so", "/usr").prune("usr")  # a '~' include can match anywhere


def test_equals_rules_mean_never_touched_and_prune_the_extent_walk():
    ex = build_excludes(cli=["=/srv/secret", "=~*.key", "-/srv/data"])
    assert ex.excluded("srv/secret/x") and ex.untouched("srv/secret/x")
    assert ex.untouched("opt/site.key") and ex.match("opt/site.key").text == "=~*.key"
    assert ex.excluded("srv/data/x") and not ex.untouched("srv/data/x")  # extents only
    assert ex.excluded("etc/passwd") and not ex.untouched("etc/passwd")
    assert ex.untouched("tmp/x") and ex.untouched("proc/1/maps")  # built-in '=' rules
    for secret in ("etc/shadow", "etc/gshadow-", "etc/ssh/ssh_host_ed25519_key", "root/.ssh/id"):
        assert ex.untouched(secret), secret
    assert not ex.untouched("etc/ssh/sshd_config") and not ex.untouched("etc/passwd")
    assert not ex.excluded("usr/bin/ls") and not ex.untouched("usr/bin/ls")
    # The hardlink walk prunes every exclude; the extent walk only what '=' covers first.
    assert ex.prune("etc") and ex.prune("srv/secret") and ex.prune("tmp")
    assert not ex.prune_untouched("etc") and not ex.prune_untouched("srv/data")
    assert ex.prune_untouched("tmp") and ex.prune_untouched("proc/1")
    assert ex.prune_untouched("srv/secret")
    assert rules("=/srv/secret", "+/srv/secret/pub").prune_untouched("srv/secret")
    assert not rules("/srv/secret/pub", "=/srv/secret").prune_untouched("srv/secret")
    assert not rules("~*.db", "=/srv").prune_untouched("srv")  # a '~' rule reaches below


@pytest.mark.parametrize("bad", ["etc/passwd", "~a/b", "/usr/[abc", "~"])
def test_bad_rules_are_rejected(bad):
    with pytest.raises(ValueError):
        parse_rule(bad, "test")


def test_bad_line_in_a_file_names_file_and_line(tmp_path):
    f = tmp_path / "exclude"
    f.write_text("# comment\n/usr/lib\nrelative/path\n")
    with pytest.raises(ConfigError) as e:
        read_rules(f, "guest list")
    assert f"{f}:3" in e.value.message and "relative/path" in e.value.message


def test_rules_file_order_and_reason(tmp_path):
    g = tmp_path / "g"
    h = tmp_path / "h"
    g.write_text("+/etc/keep\n")
    h.write_text("/usr/local\n")
    ex = build_excludes(guest_file=g, host_file=h)
    assert not ex.excluded("etc/keep")
    assert ex.excluded("usr/local/bin/x")
    assert ex.match("usr/local/bin/x").reason == f"host list {h}:1"
    assert build_excludes(guest_file=tmp_path / "missing").excluded("etc/x")


def test_literal_rules_take_glob_characters_literally():
    from vsstore.excludes import literal_rule

    ex = ExcludeList([literal_rule("/etc/kept[1].conf", "pkg")])
    assert ex.excluded("etc/kept[1].conf")
    assert not ex.excluded("etc/kept1.conf")


def test_many_literal_rules_keep_first_match_order():
    from vsstore.excludes import literal_rule

    pkg = [literal_rule(f"/usr/share/conf{i}", f"dpkg conffile (p{i})") for i in range(100)]
    ex = ExcludeList(
        [
            parse_rule("+/usr/share/conf7", "guest list"),
            *pkg,
            parse_rule("/usr/share", "default list"),
        ]
    )
    assert ex.match("usr/share/conf7").reason == "guest list"  # before: include wins
    assert ex.match("usr/share/conf8").reason == "dpkg conffile (p8)"
    assert ex.match("usr/share/conf8/below").reason == "dpkg conffile (p8)"
    assert ex.match("usr/share/other").reason == "default list"  # after: still reached
    assert ex.prune("usr/share/conf9") and not ex.prune("usr/lib")
    assert not ex.prune("usr")  # the include below /usr/share keeps /usr walkable
