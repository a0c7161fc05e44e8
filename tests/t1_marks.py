"""Layer 1: marks and dependency order (``apps/init/mark``, ``apps/init/depends``) read
from configuration directories, and the scheduler that starts and stops in that order, N
at a time, driven with a recording stand-in for ``vserver NAME start|stop``."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vsstore.config import Paths
from vsstore.errors import ConfigError
from vsstore.lifecycle.marks import Outcome, guests_with_mark, plan, schedule


def _host(tmp_path: Path, guests: dict[str, tuple[str | None, list[str]]]) -> Paths:
    paths = Paths.from_env(
        {"VSERVERS_CONFDIR": str(tmp_path / "etc"), "VSERVERS_ROOT": str(tmp_path)}
    )
    for name, (mark, deps) in guests.items():
        d = paths.confdir / name / "apps" / "init"
        d.mkdir(parents=True)
        if mark is not None:
            (d / "mark").write_text(f"{mark}\n")
        if deps:
            (d / "depends").write_text("# first\n" + "".join(f"{x}\n" for x in deps))
    return paths


def test_the_guests_of_a_mark_and_what_they_depend_on(tmp_path):
    paths = _host(
        tmp_path,
        {
            "web": ("default", ["app", "db"]),
            "app": ("default", ["db"]),
            "db": (None, []),  # not marked, but needed first
            "other": ("test", []),
            "lone": ("default", []),
        },
    )
    assert guests_with_mark(paths, "default") == ["app", "lone", "web"]
    pl = plan(paths, guests_with_mark(paths, "default"))
    assert pl.guests == ["app", "db", "lone", "web"]
    assert pl.depends["web"] == ["app", "db"] and pl.missing == {}
    assert sorted(pl.dependants()["db"]) == ["app", "web"]


def test_a_cycle_is_a_clear_error_naming_it(tmp_path):
    paths = _host(tmp_path, {"a": ("default", ["b"]), "b": (None, ["c"]), "c": (None, ["a"])})
    with pytest.raises(ConfigError) as e:
        plan(paths, ["a"])
    assert "a -> b -> c -> a" in e.value.message and "apps/init/depends" in e.value.message


def test_bad_marks_and_depends_are_errors_naming_the_file_keeping_no_other_guest_down(tmp_path):
    paths = _host(
        tmp_path, {"a": ("default", ["../etc"]), "b": ("default", ["a"]), "c": ("default", [])}
    )
    pl = plan(paths, guests_with_mark(paths, "default"))
    assert "a/apps/init/depends" in pl.broken["a"] and "'../etc'" in pl.broken["a"]
    res, order, _ = _record(pl, "start", 2)
    assert order == ["c"]
    assert res["a"].text.startswith("not started: ") and "a/apps/init/depends" in res["a"].text
    assert "depends on a, which did not start" in res["b"].text
    (paths.confdir / "a/apps/init/mark").write_text("two words\n")
    with pytest.raises(ConfigError, match="a/apps/init/mark"):
        guests_with_mark(paths, "default")
    broken: list[ConfigError] = []
    assert guests_with_mark(paths, "default", broken) == ["b", "c"]
    assert len(broken) == 1 and "a/apps/init/mark" in broken[0].message


def _record(pl, action, jobs, fail=()):
    order: list[str] = []
    lock = threading.Lock()
    active = [0, 0]  # now, most at once

    def do(n: str) -> Outcome:
        with lock:
            active[0] += 1
            active[1] = max(active)
            order.append(n)
        with lock:
            active[0] -= 1
        return Outcome(n not in fail, "ok" if n not in fail else "failed")

    return schedule(pl, action, jobs, do), order, active[1]


def test_start_in_dependency_order_and_stop_in_reverse(tmp_path):
    paths = _host(
        tmp_path, {"web": ("default", ["app"]), "app": ("default", ["db"]), "db": ("default", [])}
    )
    pl = plan(paths, guests_with_mark(paths, "default"))
    for jobs in (1, 3):
        res, order, most = _record(pl, "start", jobs)
        assert order == ["db", "app", "web"] and all(o.ok for o in res.values())
        assert most <= jobs
        res, order, _ = _record(pl, "stop", jobs)
        assert order == ["web", "app", "db"]


def test_a_failed_dependency_keeps_its_dependants_from_starting_and_the_rest_go_on(tmp_path):
    paths = _host(
        tmp_path,
        {
            "web": ("default", ["app"]),
            "app": ("default", ["db"]),
            "db": ("default", []),
            "lone": ("default", []),
            "orphan": ("default", ["nosuch"]),
        },
    )
    pl = plan(paths, guests_with_mark(paths, "default"))
    assert pl.missing == {"orphan": ["nosuch"]}
    res, order, _ = _record(pl, "start", 2, fail={"db"})
    assert sorted(order) == ["db", "lone"]
    assert not res["db"].ok and res["lone"].ok
    assert "depends on db, which did not start" in res["app"].text
    assert "depends on app" in res["web"].text
    assert "nosuch, which is not configured" in res["orphan"].text
    # stopping goes on past a failure: holding db back would help nothing
    res, order, _ = _record(pl, "stop", 1, fail={"web"})
    assert order.index("web") < order.index("app") < order.index("db")
    assert "orphan" in order


def test_a_guest_settled_late_in_a_pass_still_settles_those_before_it(tmp_path):
    """'a' (first in name order) depends on 'b', which cannot start: both are settled
    without anything running."""
    paths = _host(tmp_path, {"a": ("default", ["b"]), "b": ("default", ["nosuch"])})
    res, order, _ = _record(plan(paths, ["a"]), "start", 1)
    assert order == [] and not res["a"].ok and "depends on b" in res["a"].text


def test_independent_guests_start_side_by_side_up_to_j(tmp_path):
    """With -j 2, two guests with nothing between them run at the same time: each waits
    at a barrier for the other (bounded, so a scheduler that ran them one by one fails
    instead of hanging); the third waits for a free place."""
    paths = _host(tmp_path, {"a": ("default", []), "b": ("default", []), "c": ("default", [])})
    pl = plan(paths, guests_with_mark(paths, "default"))
    barrier = threading.Barrier(2, timeout=30)
    active, most = [0], [0]
    lock = threading.Lock()

    def do(n: str) -> Outcome:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            if n in ("a", "b"):
                barrier.wait()
            return Outcome(True, "ok")
        finally:
            with lock:
                active[0] -= 1

    res = schedule(pl, "start", 2, do)
    assert all(o.ok for o in res.values()) and most[0] == 2
