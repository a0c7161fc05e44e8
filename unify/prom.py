"""Figures in the Prometheus text format, for node_exporter's textfile collector.

The file is written to a temporary name beside it and renamed over it, so the collector
never reads half a file.  Each source (a run, a report) writes its own file: a host with
many guests is watched with the monitoring already in place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vsstore.errors import ConfigError

from .report import Report


def _label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """An ordered set of gauges, each with HELP and TYPE, samples with labels."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._help: dict[str, str] = {}
        self._samples: dict[str, list[tuple[dict[str, str], float]]] = {}

    def gauge(self, name: str, help_: str, value: float, **labels: str) -> None:
        if name not in self._help:
            self._order.append(name)
            self._help[name] = help_
            self._samples[name] = []
        self._samples[name].append((labels, value))

    def text(self) -> str:
        out = []
        for name in self._order:
            out.append(f"# HELP {name} {self._help[name]}")
            out.append(f"# TYPE {name} gauge")
            for labels, value in self._samples[name]:
                lab = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
                num = (
                    repr(float(value))
                    if isinstance(value, float) and not value.is_integer()
                    else str(int(value))
                )
                out.append(f"{name}{{{lab}}} {num}" if lab else f"{name} {num}")
        return "\n".join(out) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent or ".")
        except OSError as e:
            raise ConfigError(
                f"--prom {p}: cannot write there ({e.strerror}); give a file "
                f"in an existing, writable directory"
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.text())
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            os.unlink(tmp)
            raise


def _number(summary: dict[str, object], key: str) -> float:
    """One figure of a run's summary (the engine's ``Summary.as_dict()``)."""
    v = summary[key]
    if not isinstance(v, int | float):
        raise TypeError(f"run summary {key!r}: {v!r} is not a number")
    return v


def run_metrics(summary: dict[str, object], finished: float, exit_code: int) -> Metrics:
    m = Metrics()
    m.gauge(
        "vsstore_run_last_timestamp_seconds",
        "When the last vsunify run ended (unix time).",
        finished,
    )
    m.gauge(
        "vsstore_run_exit_code",
        "Exit code of the last run (0 ok, 6 partial; see README).",
        exit_code,
    )
    m.gauge(
        "vsstore_run_duration_seconds",
        "Wall time of the last run.",
        float(_number(summary, "duration")),
    )
    for key, help_ in (
        ("guests", "Guests in the last run."),
        ("files_scanned", "Files the last run looked at."),
        ("files_hashed", "Files the last run read and hashed (new or changed)."),
        ("bytes_hashed", "Bytes the last run read."),
        ("files_linked", "Names the last run linked to the store."),
        ("bytes_saved", "Bytes on disk the last run freed."),
        ("objects_created", "Store objects the last run created."),
        ("errors", "Files the last run skipped with an error."),
        ("skipped_busy", "Files skipped because someone was writing them."),
        ("skipped_changed", "Files skipped because they changed meanwhile."),
        ("files_deduped", "Files whose extents the last run shared (XFS, btrfs)."),
        ("bytes_deduped", "Bytes of the files whose extents the last run shared."),
    ):
        m.gauge(f"vsstore_run_{key}", help_, int(_number(summary, key)))
    return m


def report_metrics(rep: Report) -> Metrics:
    m = Metrics()
    m.gauge("vsstore_report_timestamp_seconds", "When the report was made (unix time).", rep.taken)
    for key, help_ in (
        ("files", "Regular files (names)."),
        ("apparent_bytes", "Sum of file sizes (names)."),
        ("alone_bytes", "Bytes on disk by itself (du -sx of its tree)."),
        ("disk_bytes", "Its part of the host's bytes on disk (an inode k guests hold: 1/k)."),
        ("own_bytes", "Bytes on disk in inodes no other guest holds."),
        ("shared_bytes", "Sizes of its files another guest holds too."),
        ("saved_bytes", "Bytes the sharing saves."),
        ("hardlink_saved_bytes", "Bytes shared inodes (hardlinks) save."),
        ("extent_saved_bytes", "Bytes extents shared between inodes save (XFS, btrfs)."),
    ):  # GuestFigures' fields
        for g, fig in sorted(rep.guests.items()):
            m.gauge(f"vsstore_guest_{key}", help_ + " Per guest.", getattr(fig, key), guest=g)
        m.gauge(
            f"vsstore_host_{key}",
            help_ + " All guests together, each inode once.",
            getattr(rep.total, key),
        )
    m.gauge(
        "vsstore_host_share_ratio",
        "Saved bytes / what the guests would cost alone.",
        rep.share_ratio,
    )
    store = rep.store
    if store is not None:
        m.gauge("vsstore_store_objects", "Objects in the store.", store.objects)
        m.gauge("vsstore_store_bytes", "Bytes in the store's objects.", store.object_bytes)
        m.gauge(
            "vsstore_store_unused_objects",
            "Objects no guest links any more (vsunify gc).",
            store.unused_objects,
        )
    mem = rep.memory
    if mem is not None:
        for g, used in sorted(mem.guests.items()):
            m.gauge(
                "vsstore_guest_file_memory_bytes",
                "File-backed resident memory of the guest's processes.",
                used.file_rss,
                guest=g,
            )
            m.gauge(
                "vsstore_guest_shared_file_memory_bytes",
                "Of it, in inodes other running guests map too.",
                used.shared_rss,
                guest=g,
            )
        tot = mem.total
        m.gauge(
            "vsstore_host_file_memory_bytes",
            "File-backed memory of running guests, each inode once.",
            tot.with_unification,
        )
        m.gauge(
            "vsstore_host_file_memory_without_unification_bytes",
            "What it would be if each guest had its own copies.",
            tot.without_unification,
        )
    return m
