"""Layer 4: vsunify report's host view (shared-with counts, top files, trend), its HTML page,
Prometheus files and the run's log line, checked against independent computations."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fsimages import REFLINK_KINDS, physical, reflink_host

from conftest import Host
from unify.progress import human

BIG = b"B" * 300_000  # in all four guests
MID = b"M" * 100_000  # in two
OWN = b"own file "  # private, differs per guest


def _setup(host) -> dict:  # type: ignore[no-untyped-def]
    for i, g in enumerate("abcd"):
        files = {"usr/lib/big.so": BIG, f"usr/share/own-{g}": OWN * (10 + i)}
        if g in "ab":
            files["usr/lib/mid.so"] = MID
        host.guest(g, files)
    host.vsunify("run", "--all", "--no-default-excludes")
    return json.loads(host.vsunify("report", "--json", "--all").stdout)


def _independent(host) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    holders: dict[tuple[int, int], set[str]] = {}
    blocks: dict[tuple[int, int], int] = {}
    for g in "abcd":
        for dirpath, _d, files in os.walk(host.root / g):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                blocks[(st.st_dev, st.st_ino)] = st.st_blocks * 512
                holders.setdefault((st.st_dev, st.st_ino), set()).add(g)
    return holders, blocks


def test_report_counts_how_many_guests_share_each_byte(host):
    rep = _setup(host)
    holders, blocks = _independent(host)
    for g in "abcd":
        want: dict[str, int] = {}
        for k, hs in holders.items():
            if g in hs and len(hs) > 1:
                want[str(len(hs) - 1)] = want.get(str(len(hs) - 1), 0) + blocks[k]
        assert rep["guests"][g]["shared_with"] == want
    big = next(k for k, hs in holders.items() if len(hs) == 4)
    mid = next(k for k, hs in holders.items() if len(hs) == 2)
    assert rep["guests"]["c"]["shared_with"] == {"3": blocks[big]}
    top = rep["top_shared"]
    assert [(t["guests"], t["saved_bytes"]) for t in top] == [
        (4, 3 * blocks[big]),
        (2, blocks[mid]),
    ]
    assert top[0]["path"].endswith(":/usr/lib/big.so")


def _du(*trees: Path) -> int:
    """``du -sx --block-size=1`` of the trees together (an inode counted once)."""
    out = subprocess.run(
        ["du", "-sxc", "--block-size=1", *map(str, trees)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.splitlines()[-1].split()[0])


def _walk_all(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every name below root (root included) on its filesystem, as du -x sees them."""
    dev = os.lstat(root).st_dev
    yield "", os.lstat(root)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_dev == dev:
                yield os.path.relpath(p, root), st
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(dirpath, d)).st_dev == dev]


def _figures(host) -> dict[str, dict[str, float]]:  # type: ignore[no-untyped-def]
    """The report's figures, computed from an independent walk of every inode."""
    holders: dict[tuple[int, int], set[str]] = {}
    blocks: dict[tuple[int, int], int] = {}
    names: dict[str, list[tuple[tuple[int, int], os.stat_result]]] = {}
    for g in "abc":
        names[g] = []
        for _rel, st in _walk_all(host.root / g):
            k = (st.st_dev, st.st_ino)
            blocks[k] = st.st_blocks * 512
            holders.setdefault(k, set()).add(g)
            names[g].append((k, st))
    figs: dict[str, dict[str, float]] = {}
    for g in "abc":
        inos = {k for k, _ in names[g]}
        files = [(k, st) for k, st in names[g] if stat.S_ISREG(st.st_mode)]
        figs[g] = {
            "files": len(files),
            "apparent_bytes": sum(st.st_size for _, st in files),
            "shared_bytes": sum(st.st_size for k, st in files if len(holders[k]) > 1),
            "alone_bytes": sum(blocks[k] for k in inos),
            "disk_bytes": sum(blocks[k] / len(holders[k]) for k in inos),
            "own_bytes": sum(blocks[k] for k in inos if len(holders[k]) == 1),
        }
    return figs


def test_report_figures_add_up_as_du_counts_them(host):
    """Per guest and in total, every column against an independent walk of every inode
    (files, directories, symlinks) and du: "on disk" changes when unifying, the guests'
    figures add up to the TOTAL, which is du -sx of the trees together."""
    for i, g in enumerate("abc"):
        tree = host.guest(g, {"usr/lib/big.so": BIG, "usr/lib/mid.so": MID, f"own-{g}": OWN * i})
        (tree / "usr/share/empty").mkdir(parents=True)
        (tree / "usr/lib/libbig.so.1").symlink_to("big.so")
        os.link(tree / f"own-{g}", tree / "own-link")  # two names, one inode, counted once
    before = json.loads(host.vsunify("report", "--json", "--all", "--no-record").stdout)
    host.vsunify("run", "--all", "--no-default-excludes")
    rep = json.loads(host.vsunify("report", "--json", "--all").stdout)
    want = _figures(host)
    trees = [host.root / g for g in "abc"]
    for g in "abc":
        got, w = rep["guests"][g], want[g]
        for key in ("files", "apparent_bytes", "shared_bytes", "alone_bytes", "own_bytes"):
            assert got[key] == w[key], (g, key)
        assert abs(got["disk_bytes"] - w["disk_bytes"]) <= 3  # rounded to the byte
        assert got["saved_bytes"] == got["alone_bytes"] - got["disk_bytes"]
        assert got["shared_bytes"] <= got["apparent_bytes"]
        assert got["alone_bytes"] == _du(host.root / g)
        assert before["guests"][g]["disk_bytes"] == before["guests"][g]["alone_bytes"]
        assert got["disk_bytes"] < before["guests"][g]["disk_bytes"]  # unifying shows
    total = rep["total"]
    for key in ("files", "apparent_bytes", "shared_bytes", "alone_bytes", "disk_bytes"):
        assert total[key] == sum(rep["guests"][g][key] for g in "abc"), key
    for key in ("own_bytes", "saved_bytes"):
        assert total[key] == sum(rep["guests"][g][key] for g in "abc"), key
    assert total["disk_bytes"] == _du(*trees)
    assert total["saved_bytes"] == total["alone_bytes"] - total["disk_bytes"] > 300_000
    table = host.vsunify("report", "--all", "--no-record").stdout.splitlines()
    head = table[0].split()
    assert head == ["guest", "files", "apparent", "shared", "alone", "on", "disk", "own"][:8] + [
        "saved",
        "share",
    ]
    totals = next(line for line in table if line.startswith("TOTAL"))
    assert human(total["disk_bytes"]) in totals and human(total["alone_bytes"]) in totals
    helptext = host.vsunify("report", "--help").stdout
    for column in ("apparent", "shared", "alone", "on disk", "own", "saved", "share"):
        assert f"\n  {column} " in helptext, column


def test_each_report_adds_to_the_trend_and_runs_are_listed(host):
    rep = _setup(host)
    assert len(rep["history"]["snapshots"]) == 1
    assert rep["history"]["runs"][-1]["files_linked"] == 4  # big: 3 join the first; mid: 1
    host.guest("e", {"usr/lib/big.so": BIG})
    host.vsunify("run", "--all", "--no-default-excludes")
    rep2 = json.loads(host.vsunify("report", "--json", "--all").stdout)
    snaps = rep2["history"]["snapshots"]
    assert len(snaps) == 2 and len(rep2["history"]["runs"]) == 2
    assert snaps[0]["saved_bytes"] == rep["total"]["saved_bytes"]
    assert snaps[1]["saved_bytes"] == rep2["total"]["saved_bytes"] > snaps[0]["saved_bytes"]
    assert set(snaps[1]["per_guest"]) == set("abcde")
    host.vsunify("report", "--all", "--no-record")
    rep3 = json.loads(host.vsunify("report", "--json", "--all", "--no-record").stdout)
    assert len(rep3["history"]["snapshots"]) == 2
    table = host.vsunify("report", "--all", "--no-record").stdout
    assert "most saving shared files" in table and "saved over time" in table


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.svgs: dict[str, list[tuple[str, dict]]] = {}
        self.cells: list[str] = []
        self.saved = ""
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        a = dict(attrs)
        if tag == "svg":
            self.svgs[a.get("id", "")] = []
            self._svg = a.get("id", "")
        elif self.svgs and tag in ("polyline", "rect", "circle"):
            self.svgs[self._svg].append((tag, a))
        if tag == "td" or (tag == "span" and a.get("id") == "saved"):
            self._in = tag if tag == "td" else "saved"

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self._in == "td":
            self.cells.append(data)
        elif self._in == "saved":
            self.saved += data

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag in ("td", "span"):
            self._in = None


def test_the_html_report_is_one_page_with_both_charts(host):
    _setup(host)
    out = host.base / "report.html"
    host.vsunify("report", "--all", "--html", str(out))  # a second snapshot
    rep = json.loads(host.vsunify("report", "--json", "--all", "--no-record").stdout)
    text = out.read_text()
    assert "<script" not in text and "http" not in text  # self-contained
    page = _Page()
    page.feed(text)
    assert page.saved == human(rep["total"]["saved_bytes"])
    trend = page.svgs["trend"]
    points = next(a["points"] for t, a in trend if t == "polyline").split()
    assert len(points) == 2  # two reports so far
    bars = [a for t, a in page.svgs["guests"] if t == "rect" and a.get("class") == "saved"]
    assert len(bars) == 4
    trend_svg = re.search(r'<svg id="trend".*?</svg>', text)
    assert trend_svg is not None
    yticks = re.findall(r'class="axis-y"[^>]*>([^<]+)<', trend_svg.group(0))
    assert yticks[0] == "0 B" and len(yticks) == 5  # a y axis from 0, in bytes
    assert all(re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB|TiB)", t) for t in yticks), yticks
    snaps = rep["history"]["snapshots"]
    first = time.strftime("%Y-%m-%d %H:%M", time.localtime(snaps[0]["taken"]))
    last = time.strftime("%Y-%m-%d %H:%M", time.localtime(snaps[-1]["taken"]))
    assert f"2 reports, {first} to {last}" in trend_svg.group(0)  # the date range
    assert 'class="legend"' in trend_svg.group(0)
    guests_svg = re.search(r'<svg id="guests".*?</svg>', text)
    assert guests_svg is not None
    xticks = re.findall(r'class="axis-x"[^>]*>([^<]+)<', guests_svg.group(0))
    assert xticks[0] == "0 B" and "bytes on disk" in guests_svg.group(0)
    legend = re.findall(r'class="legend"[^>]*>([^<]+)<', guests_svg.group(0))
    assert legend[0].startswith("on disk now") and legend[1].startswith("saved")
    # each bar: its part on disk now, then what it saved: together what it costs alone
    disks = [a for t, a in page.svgs["guests"] if t == "rect" and a.get("class") == "disk"]
    big = max(rep["guests"].values(), key=lambda g: g["alone_bytes"])
    longest = max(float(d["width"]) + float(b["width"]) for d, b in zip(disks, bars, strict=True))
    assert longest <= 640 - 140 - 20 and big["alone_bytes"] > 0
    widths = {float(a["width"]) for a in bars}
    assert len(widths) == 2  # a and b save more than c and d
    for g in "abcd":
        assert g in page.cells
    assert any(c.endswith(":/usr/lib/big.so") for c in page.cells)
    s = rep["store"]
    assert (
        f"<p>{s['path']}: {s['objects']} objects, {human(s['bytes'])}; "
        f"{s['unused_objects']} unused ({human(s['unused_bytes'])}, removed by "
    ) in text
    run = rep["history"]["runs"][-1]  # the one run: the last table's one row
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["started"]))
    assert page.cells[-8:] == [
        started,
        str(run["guests"]),
        str(run["files_scanned"]),
        str(run["files_hashed"]),
        str(run["files_linked"]),
        human(run["bytes_saved"]),
        str(run["errors"]),
        f"{run['duration']:.1f}",
    ]


_SAMPLE = re.compile(r'^([a-z_]+)(\{([a-z]+="[^"]*")(,[a-z]+="[^"]*")*\})? (-?[0-9.e+]+)$')


def _prom(path) -> dict[str, float]:  # type: ignore[no-untyped-def]
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        m = _SAMPLE.match(line)
        assert m, line
        out[line.rsplit(" ", 1)[0]] = float(m.group(5))
    return out


def test_prometheus_files_for_the_run_and_the_report(host):
    for g in "ab":
        host.guest(g, {"usr/lib/big.so": BIG})
    run_prom = host.base / "run.prom"
    s = json.loads(
        host.vsunify(
            "run", "--all", "--no-default-excludes", "--json", "--prom", str(run_prom)
        ).stdout
    )
    m = _prom(run_prom)
    assert m["vsstore_run_files_linked"] == s["files_linked"] == 1  # b joins a's inode
    assert m["vsstore_run_exit_code"] == 0
    assert m["vsstore_run_bytes_saved"] == s["bytes_saved"]
    rep_prom = host.base / "report.prom"
    rep = json.loads(host.vsunify("report", "--all", "--json", "--prom", str(rep_prom)).stdout)
    m = _prom(rep_prom)
    assert m['vsstore_guest_saved_bytes{guest="a"}'] == rep["guests"]["a"]["saved_bytes"]
    assert m["vsstore_host_saved_bytes"] == rep["total"]["saved_bytes"]
    assert m["vsstore_store_objects"] == 1
    assert sorted(p.name for p in host.base.iterdir() if ".prom" in p.name) == [
        "report.prom",
        "run.prom",
    ]  # written whole: no temporary left
    p = host.vsunify("report", "--all", "--prom", str(host.base / "nodir" / "x.prom"), check=False)
    assert p.returncode == 3 and "--prom" in p.stderr and "Traceback" not in p.stderr


def test_the_run_summary_goes_to_a_log_file_and_syslog(host):
    host.guest("a", {"usr/lib/big.so": BIG})
    log = host.base / "vsunify.log"
    host.vsunify("run", "a", "--log", str(log), "--syslog", "-q")
    host.vsunify("run", "a", "--log", str(log), "-q")
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert all(
        re.match(
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d vsunify: 1 guests, 1 files "
            r"scanned, .* \(exit 0\)$",
            ln,
        )
        for ln in lines
    )


def _shipped_commands(host) -> list[list[str]]:  # type: ignore[no-untyped-def]
    """The vsunify commands of contrib/ (systemd unit and cron line), with the host's
    paths moved into the test's directory."""
    from conftest import REPO

    cmds = []
    unit = (REPO / "contrib/vsunify.service").read_text()
    cron = (REPO / "contrib/vsunify.cron").read_text()
    lines = [ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    entry = next(ln for ln in cron.splitlines() if ln and not ln.startswith("#"))
    lines += [c.strip() for c in entry.split(None, 6)[6].split(";")]
    for line in lines:
        words = line.split()
        assert words[0] == "/usr/local/bin/vsunify"
        cmds.append(
            [
                w.replace("/var/lib/prometheus/node-exporter", str(host.base / "prom"))
                .replace("/var/lib/vsstore", str(host.base / "state"))
                .replace("/var/log/vsstore", str(host.base / "log"))
                for w in words[1:]
            ]
        )
    return cmds


def test_the_shipped_nightly_commands_work(host):
    for g in "ab":
        host.guest(g, {"usr/lib/big.so": BIG})
    (host.base / "prom").mkdir()
    cmds = _shipped_commands(host)
    assert len(cmds) == 4 and [c[0] for c in cmds] == ["run", "report", "run", "report"]
    for c in cmds:
        p = host.vsunify(*c)
        assert p.stdout == ""  # quiet: the summary goes to syslog or the log file
    assert _prom(host.base / "prom/vsstore_run.prom")["vsstore_run_exit_code"] == 0
    assert "vsstore_host_saved_bytes" in (host.base / "prom/vsstore_report.prom").read_text()
    assert (host.base / "state/report.html").read_text().startswith("<!DOCTYPE html>")
    assert "(exit 0)" in (host.base / "log/vsunify.log").read_text()


def test_memory_figures_as_text_json_html_and_prometheus(monkeypatch):
    """report --memory's figures in every output, from fixed smaps readings (t7 measures
    running guests): busybox is mapped by both guests, each library by one."""
    from unify import htmlreport, prom, report
    from vsstore import memory

    rss = {
        1: {(8, 1, 10): (1_000_000, "/bin/busybox"), (8, 1, 11): (4096, "/lib/a.so")},
        2: {(8, 1, 10): (1_200_000, "/bin/busybox")},
        3: {(8, 1, 10): (900_000, "/bin/busybox"), (8, 1, 12): (8192, "/lib/b.so")},
    }
    monkeypatch.setattr(memory, "file_rss", lambda pid: rss[pid])
    mem = memory.measure({"g2": [3], "g1": [1, 2]}, charged={"g2": {"memory": 5, "pids_max": None}})
    assert list(mem.guests) == ["g1", "g2"]  # in name order; a file named as first measured
    g1, g2 = mem.guests["g1"], mem.guests["g2"]
    assert (g1.processes, g1.file_rss, g1.shared_rss, g1.files) == (2, 1_204_096, 1_200_000, 2)
    assert (g2.processes, g2.file_rss, g2.shared_rss, g2.files) == (1, 908_192, 900_000, 2)
    assert mem.total == memory.MemoryTotal(1_212_288, 2_112_288, 900_000)
    assert mem.top_shared == [memory.SharedMapping("g2:/bin/busybox", 2, 900_000)]
    rep = report.Report(taken=1_700_000_000.0, memory=mem)
    assert rep.as_dict()["memory"] == {
        "guests": {
            "g1": {"processes": 2, "file_rss": 1_204_096, "shared_rss": 1_200_000, "files": 2},
            "g2": {
                "processes": 1,
                "file_rss": 908_192,
                "shared_rss": 900_000,
                "files": 2,
                "cgroup": {"memory": 5, "pids_max": None},
            },
        },
        "total": {
            "with_unification": 1_212_288,
            "without_unification": 2_112_288,
            "saved": 900_000,
        },
        "top_shared": [{"path": "g2:/bin/busybox", "guests": 2, "saved": 900_000}],
    }
    assert report.format_memory(mem) == (
        "\nfile-backed memory of running guests:\n"
        "  guest            procs    mapped    shared\n"
        "  g1                   2   1.1 MiB   1.1 MiB\n"
        "  g2                   1 886.9 KiB 878.9 KiB\n"
        "  host: 1.2 MiB with unification, 2.0 MiB without (878.9 KiB saved)"
    )
    lines = prom.report_metrics(rep).text().splitlines()
    for sample in (
        'vsstore_guest_file_memory_bytes{guest="g1"} 1204096',
        'vsstore_guest_file_memory_bytes{guest="g2"} 908192',
        'vsstore_guest_shared_file_memory_bytes{guest="g1"} 1200000',
        'vsstore_guest_shared_file_memory_bytes{guest="g2"} 900000',
        "vsstore_host_file_memory_bytes 1212288",
        "vsstore_host_file_memory_without_unification_bytes 2112288",
    ):
        assert sample in lines
    html = htmlreport.render(rep)
    assert (
        "<p>1.2 MiB in page cache for the guests' mapped files; 2.0 MiB without "
        "unification (878.9 KiB saved).</p>"
    ) in html
    page = _Page()
    page.feed(html)
    assert page.cells[-8:] == ["g1", "2", "1.1 MiB", "1.1 MiB", "g2", "1", "886.9 KiB", "878.9 KiB"]
    nobody = memory.measure({})
    assert report.format_memory(nobody) == "\nmemory: no guest is running"


@pytest.fixture(params=REFLINK_KINDS)
def rhost(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    with reflink_host(request.param, monkeypatch) as h:
        yield h


def test_report_counts_shared_extents_apart_from_hardlinks(rhost: Host) -> None:
    """Three guests: a binary hardlinked in all three, a database deduped between a and b.
    The report's figures against FIEMAP's and stat's own."""
    db = os.urandom(1 << 20) + b"db"
    for i, g in enumerate("abc"):
        files = {"usr/bin/x": BIG, f"etc/own-{g}": OWN * (500 + i)}
        if g in "ab":
            files["etc/app.db"] = db
        rhost.guest(g, files)
    rhost.vsunify("run", "--all")
    rep = json.loads(rhost.vsunify("report", "--json", "--all").stdout)
    a, b = rhost.root / "a/etc/app.db", rhost.root / "b/etc/app.db"
    assert physical(a) == physical(b) and os.stat(a).st_ino != os.stat(b).st_ino
    ext = sum(length for _, length in physical(a))
    x = os.stat(rhost.root / "a/usr/bin/x").st_blocks * 512
    g, t = rep["guests"], rep["total"]
    assert (t["hardlink_saved_bytes"], t["extent_saved_bytes"]) == (2 * x, ext)
    assert t["saved_bytes"] == 2 * x + ext
    assert [g[n]["extent_saved_bytes"] for n in "abc"] == [ext // 2, ext // 2, 0]
    assert [g[n]["extent_shared_bytes"] for n in "abc"] == [ext, ext, 0]
    assert g["a"]["saved_bytes"] == g["a"]["hardlink_saved_bytes"] + ext // 2
    alone = sum(g[n]["alone_bytes"] for n in "abc")
    assert alone - t["disk_bytes"] == t["saved_bytes"]  # what they cost alone minus together
    table = rhost.vsunify("report", "--all", "--no-record").stdout
    assert "by shared extents" in table
    page = rhost.base / "report.html"
    rhost.vsunify("report", "--all", "--no-record", "--html", str(page))
    assert f"{human(ext)} by shared extents" in page.read_text()
    prom = rhost.base / "report.prom"
    rhost.vsunify("report", "--all", "--no-record", "--prom", str(prom))
    assert f"vsstore_host_extent_saved_bytes {ext}" in prom.read_text().splitlines()
