"""Layer 1: cgroup settings read, checked and translated between v1 and v2; layouts
detected from mountinfo and /proc/self/cgroup texts."""

from __future__ import annotations

import pytest

from vsstore.errors import ConfigError
from vsstore.lifecycle import cgroups


def _limits(tmp_path, files: dict[str, str]) -> cgroups.Limits:
    d = tmp_path / "cgroup"
    d.mkdir()
    for k, v in files.items():
        (d / k).write_text(v + "\n")
    return cgroups.read_limits(d)


def test_v2_settings_translate_to_v1(tmp_path):
    lim = _limits(
        tmp_path,
        {
            "memory.max": "64M",
            "memory.high": "48M",
            "pids.max": "30",
            "cpu.max": "50000 100000",
            "cpu.weight": "200",
        },
    )
    assert cgroups.v2_files(lim) == {
        "memory.max": str(64 << 20),
        "memory.high": str(48 << 20),
        "pids.max": "30",
        "cpu.max": "50000 100000",
        "cpu.weight": "200",
    }
    assert cgroups.v1_files(lim) == {
        ("memory", "memory.limit_in_bytes"): str(64 << 20),
        ("memory", "memory.soft_limit_in_bytes"): str(48 << 20),
        ("pids", "pids.max"): "30",
        ("cpu", "cpu.cfs_period_us"): "100000",
        ("cpu", "cpu.cfs_quota_us"): "50000",
        ("cpu", "cpu.shares"): "2048",
    }


def test_util_vserver_v1_names_translate_to_v2(tmp_path):
    lim = _limits(
        tmp_path,
        {
            "memory.limit_in_bytes": "1G",
            "cpu.shares": "512",
            "cpu.cfs_quota_us": "20000",
            "cpu.cfs_period_us": "50000",
            "memory.soft_limit_in_bytes": "max",
        },
    )
    assert cgroups.v2_files(lim) == {
        "memory.max": str(1 << 30),
        "memory.high": "max",
        "cpu.max": "20000 50000",
        "cpu.weight": "50",
    }
    assert cgroups.v1_files(lim)[("cpu", "cpu.shares")] == "512"  # and back
    assert cgroups.v1_files(lim)[("memory", "memory.soft_limit_in_bytes")] == "-1"


def test_no_limit_is_max_on_v2_and_minus_one_on_v1(tmp_path):
    lim = _limits(tmp_path, {"memory.max": "max", "pids.max": "max", "cpu.max": "max"})
    assert cgroups.v2_files(lim) == {
        "memory.max": "max",
        "pids.max": "max",
        "cpu.max": "max 100000",
    }
    assert cgroups.v1_files(lim)[("memory", "memory.limit_in_bytes")] == "-1"
    assert cgroups.v1_files(lim)[("cpu", "cpu.cfs_quota_us")] == "-1"


@pytest.mark.parametrize(
    "name,value,words",
    [
        ("memory.max", "lots", "not a size"),
        ("pids.max", "-5", "out of range"),
        ("cpu.weight", "0", "out of range"),
        ("cpu.max", "1 2 3", "QUOTA PERIOD"),
        ("blkio.weight", "100", "unknown cgroup setting"),
        ("cpu.shares", "x", "not a number"),
    ],
)
def test_bad_settings_name_their_file(tmp_path, name, value, words):
    with pytest.raises(ConfigError) as e:
        _limits(tmp_path, {name: value})
    assert name in e.value.message and words in e.value.message


V1_MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw
31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 30 0:28 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
35 30 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
"""
V1_SELF = "5:memory:/a/b\n4:pids:/\n3:cpu,cpuacct:/c\n2:freezer:/\n0::/\n"


def test_v1_layout_each_controller_beneath_our_own_cgroup():
    lay = cgroups.detect(V1_MOUNTINFO, V1_SELF)  # cgroup2 has no controllers here
    assert lay.version == 1
    dirs = cgroups.guest_dirs(lay, "web", None)
    assert str(dirs["memory"]) == "/sys/fs/cgroup/memory/a/b/vserver-web"
    assert str(dirs["pids"]) == "/sys/fs/cgroup/pids/vserver-web"
    assert str(dirs["cpu"]) == "/sys/fs/cgroup/cpu,cpuacct/c/vserver-web"
    assert str(dirs["freezer"]) == "/sys/fs/cgroup/freezer/vserver-web"
    dirs = cgroups.guest_dirs(lay, "web", "/vsstore.slice")
    assert str(dirs["memory"]) == "/sys/fs/cgroup/memory/vsstore.slice/vserver-web"


def test_v2_layout_when_it_has_the_controllers(tmp_path):
    root = tmp_path / "cg2"
    (root / "user.slice").mkdir(parents=True)
    (root / "user.slice/cgroup.controllers").write_text("cpu memory pids\n")
    mi = f"40 25 0:40 / {root} rw - cgroup2 cgroup2 rw\n"
    lay = cgroups.detect(mi, "0::/user.slice\n")
    assert lay.version == 2
    assert cgroups.guest_dirs(lay, "web", None) == {"unified": root / "user.slice/vserver-web"}
    assert cgroups.detect("", "0::/\n").version == 0
