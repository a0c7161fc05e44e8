"""The report as one self-contained HTML page (inline CSS and SVG, no script, nothing
fetched): savings over time, per guest, the most saving shared files, the store, runs."""

from __future__ import annotations

import time
from html import escape

from vsstore.index import Snapshot

from .progress import human
from .report import COLUMNS, GuestFigures, Report, table_row

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}
table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #ddd}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.big{font-size:2em;font-weight:600}.muted{color:#777}
svg text{font:11px system-ui,sans-serif;fill:#444}
"""


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _table(head: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    h = "".join(
        f'<th class="n">{escape(c)}</th>' if i in numeric else f"<th>{escape(c)}</th>"
        for i, c in enumerate(head)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>"
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _ticks(top: float, n: int = 4) -> list[float]:
    """n+1 round values from 0 up to at least top (1, 2 or 5 times a power of 1024 or 10)."""
    if top <= 0:
        return [float(i) for i in range(n + 1)]
    unit = 1.0
    while top / unit >= 1024:
        unit *= 1024
    raw = top / unit / n
    mag = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1.0
    while mag > raw and mag > 0.001:
        mag /= 10
    step = next((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), 10 * mag)
    return [i * step * unit for i in range(n + 1)]


def _trend_svg(snaps: list[Snapshot], w: int = 640, h: int = 220) -> str:
    """Saved bytes at every report: y axis in bytes with ticks, x axis the reports' dates
    (the range written under it), a legend."""
    if not snaps:
        return '<p class="muted">No history yet: every report adds a point.</p>'
    left, right, top_pad, bottom = 70, 20, 30, 40
    ys = [float(s.saved_bytes) for s in snaps]
    ticks = _ticks(max(ys))
    top = ticks[-1] or 1.0
    n = len(ys)
    t0, t1 = snaps[0].taken, snaps[-1].taken

    def x(i: int) -> float:
        span = t1 - t0
        frac = (snaps[i].taken - t0) / span if span > 0 else (i / (n - 1) if n > 1 else 0.5)
        return left + (w - left - right) * frac

    def y(v: float) -> float:
        return h - bottom - (h - top_pad - bottom) * v / top

    grid = "".join(
        f'<line x1="{left}" y1="{y(t):.1f}" x2="{w - right}" y2="{y(t):.1f}" stroke="#eee"/>'
        f'<text class="axis-y" x="{left - 6}" y="{y(t) + 4:.1f}" text-anchor="end">'
        f"{escape(human(int(t)))}</text>"
        for t in ticks
    )
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(ys))
    dots = "".join(
        f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="#2a7">'
        f"<title>{escape(_when(snaps[i].taken))}: {human(int(v))}</title>"
        f"</circle>"
        for i, v in enumerate(ys)
    )
    first, last = _when(t0), _when(t1)
    return (
        f'<svg id="trend" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="saved bytes at each report, {escape(first)} to {escape(last)}">'
        f"{grid}"
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#999"/>'
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{h - bottom}" stroke="#999"/>'
        f'<polyline points="{pts}" fill="none" stroke="#2a7" stroke-width="2"/>{dots}'
        f'<text x="{left}" y="{top_pad - 12}">bytes saved (du: the guests alone minus '
        f"together)</text>"
        f'<rect x="{w - right - 150}" y="{top_pad - 22}" width="12" height="3" fill="#2a7"/>'
        f'<text class="legend" x="{w - right - 132}" y="{top_pad - 18}">saved, per report</text>'
        f'<text class="axis-x" x="{left}" y="{h - bottom + 16}">{escape(first)}</text>'
        f'<text class="axis-x" x="{w - right}" y="{h - bottom + 16}" text-anchor="end">'
        f"{escape(last)}</text>"
        f'<text class="range" x="{(left + w - right) / 2:.0f}" y="{h - 6}" '
        f'text-anchor="middle">{n} reports, {escape(first)} to {escape(last)}</text>'
        f"</svg>"
    )


def _guest_svg(guests: dict[str, GuestFigures], w: int = 640) -> str:
    """Per guest: a bar of what it costs alone, split into its part on disk now and the
    saved part (green); an x axis in bytes and a legend."""
    if not guests:
        return ""
    bar, gap, left, right, head, foot = 18, 6, 140, 20, 26, 34
    ticks = _ticks(max(g.alone_bytes for g in guests.values()))
    top = ticks[-1] or 1
    span = w - left - right
    h = head + len(guests) * (bar + gap) + foot
    parts = [
        f'<rect x="{left}" y="4" width="12" height="12" fill="#ccd"/>'
        f'<text class="legend" x="{left + 16}" y="14">on disk now (its part)</text>'
        f'<rect x="{left + 170}" y="4" width="12" height="12" fill="#2a7"/>'
        f'<text class="legend" x="{left + 186}" y="14">saved; together: alone '
        f"(du -sx GUEST)</text>"
    ]
    base = head + len(guests) * (bar + gap)
    for t in ticks:
        tx = left + span * t / top
        parts.append(
            f'<line x1="{tx:.1f}" y1="{head - 4}" x2="{tx:.1f}" y2="{base}" stroke="#eee"/>'
            f'<text class="axis-x" x="{tx:.1f}" y="{base + 14}" text-anchor="middle">'
            f"{escape(human(int(t)))}</text>"
        )
    for i, (name, g) in enumerate(sorted(guests.items())):
        disk, saved = g.disk_bytes, g.saved_bytes
        y = head + i * (bar + gap)
        full = span * disk / top
        part = span * saved / top
        parts.append(
            f'<text x="{left - 6}" y="{y + bar - 5}" text-anchor="end">{escape(name)}</text>'
            f'<rect class="disk" x="{left}" y="{y}" width="{full:.1f}" height="{bar}" '
            f'fill="#ccd"><title>{escape(name)}: {human(disk)} on disk now</title></rect>'
            f'<rect class="saved" x="{left + full:.1f}" y="{y}" width="{part:.1f}" '
            f'height="{bar}" fill="#2a7"><title>{escape(name)}: {human(saved)} saved'
            f"</title></rect>"
        )
    parts.append(
        f'<line x1="{left}" y1="{base}" x2="{w - right}" y2="{base}" stroke="#999"/>'
        f'<text x="{left + span / 2:.0f}" y="{h - 4}" text-anchor="middle">bytes on disk</text>'
    )
    return (
        f'<svg id="guests" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
        f'aria-label="per guest: on disk now and saved, in bytes">{"".join(parts)}</svg>'
    )


def _split(rep: Report) -> str:
    """What shared inodes and shared extents each save (XFS, btrfs), when extents count."""
    t = rep.total
    if not (t.extent_saved_bytes or t.extent_shared_bytes):
        return ""
    return (
        f'<p id="split">{escape(human(t.hardlink_saved_bytes))} by shared inodes '
        f"(hardlinks: disk and page cache), {escape(human(t.extent_saved_bytes))} by shared "
        f"extents (disk only; the guests keep their own files).</p>"
    )


def render(rep: Report) -> str:
    guests, total = rep.guests, rep.total
    out = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>vsstore report {escape(_when(rep.taken))}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>vsstore: disk sharing across {len(guests)} guests</h1>",
        f'<p class="muted">report of {escape(_when(rep.taken))}</p>',
        f'<p><span class="big" id="saved">{escape(human(total.saved_bytes))}</span>'
        f" saved: the guests take {escape(human(total.disk_bytes))} on disk "
        f"together, {escape(human(total.alone_bytes))} "
        f"alone ({rep.share_ratio:.0%} saved).</p>",
        _split(rep),
        "<h2>Saved over time</h2>",
        _trend_svg(rep.history.snapshots if rep.history is not None else []),
        "<h2>Per guest</h2>",
        _guest_svg(guests),
    ]
    rows = [
        [
            *table_row(n, g),
            ", ".join(f"{k}: {human(v)}" for k, v in sorted(g.shared_with.items())),
        ]
        for n, g in sorted(guests.items())
    ]
    rows.append([*table_row("TOTAL", total), ""])
    out.append(
        _table(
            ["guest", *(c for c, _ in COLUMNS), "shared with k others"],
            rows,
            set(range(1, len(COLUMNS) + 1)),
        )
    )
    if rep.top_shared:
        out.append("<h2>Most saving shared files</h2>")
        out.append(
            _table(
                ["file (one name)", "guests", "size", "saved"],
                [[f.path, str(f.guests), human(f.size), human(f.saved)] for f in rep.top_shared],
                {1, 2, 3},
            )
        )
    store = rep.store
    if store is not None:
        out.append("<h2>Store</h2>")
        out.append(
            f"<p>{escape(store.path)}: {store.objects} objects, "
            f"{escape(human(store.object_bytes))}; {store.unused_objects} unused "
            f"({escape(human(store.unused_bytes))}, removed by "
            f"<code>vsunify gc</code>).</p>"
        )
    mem = rep.memory
    if mem is not None:
        t = mem.total
        out.append("<h2>Memory of running guests (file-backed)</h2>")
        out.append(
            f"<p>{escape(human(t.with_unification))} in page cache for the "
            f"guests' mapped files; {escape(human(t.without_unification))} without "
            f"unification ({escape(human(t.saved))} saved).</p>"
        )
        out.append(
            _table(
                ["guest", "processes", "file-backed", "of it shared"],
                [
                    [n, str(g.processes), human(g.file_rss), human(g.shared_rss)]
                    for n, g in mem.guests.items()
                ],
                {1, 2, 3},
            )
        )
    runs = rep.history.runs if rep.history is not None else []
    if runs:
        out.append("<h2>Recent runs</h2>")
        out.append(
            _table(
                ["started", "guests", "scanned", "hashed", "linked", "saved", "errors", "seconds"],
                [
                    [
                        _when(r.started),
                        str(r.guests),
                        str(r.files_scanned),
                        str(r.files_hashed),
                        str(r.files_linked),
                        human(r.bytes_saved),
                        str(r.errors),
                        f"{r.duration:.1f}",
                    ]
                    for r in reversed(runs[-20:])
                ],
                {1, 2, 3, 4, 5, 6, 7},
            )
        )
    out.append("</body></html>\n")
    return "".join(out)
