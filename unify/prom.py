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
                num = repr(float(value)) if isinstance(value, float) and not value.is_integer() \
                    else str(int(value))
                out.append(f"{name}{{{lab}}} {num}" if lab else f"{name} {num}")
        return "\n".join(out) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        p = Path(path)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent or ".")
        except OSError as e:
            raise ConfigError(f"--prom {p}: cannot write there ({e.strerror}); give a file "
                              f"in an existing, writable directory") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.text())
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            os.unlink(tmp)
            raise


def run_metrics(summary: dict[str, object], finished: float, exit_code: int) -> Metrics:
    m = Metrics()
    m.gauge("vsstore_run_last_timestamp_seconds", "When the last vsunify run ended (unix "
            "time).", finished)
    m.gauge("vsstore_run_exit_code", "Exit code of the last run (0 ok, 6 partial; see README).",
            exit_code)
    m.gauge("vsstore_run_duration_seconds", "Wall time of the last run.",
            float(summary["duration"]))  # type: ignore[arg-type]
    for key, help_ in (("guests", "Guests in the last run."),
                       ("files_scanned", "Files the last run looked at."),
                       ("files_hashed", "Files the last run read and hashed (new or changed)."),
                       ("bytes_hashed", "Bytes the last run read."),
                       ("files_linked", "Names the last run linked to the store."),
                       ("bytes_saved", "Bytes on disk the last run freed."),
                       ("objects_created", "Store objects the last run created."),
                       ("errors", "Files the last run skipped with an error."),
                       ("skipped_busy", "Files skipped because someone was writing them."),
                       ("skipped_changed", "Files skipped because they changed meanwhile.")):
        m.gauge(f"vsstore_run_{key}", help_, int(summary[key]))  # type: ignore[call-overload]
    return m


def report_metrics(rep: dict[str, object]) -> Metrics:
    m = Metrics()
    m.gauge("vsstore_report_timestamp_seconds", "When the report was made (unix time).",
            float(rep["taken"]))  # type: ignore[arg-type]
    guests: dict[str, dict[str, object]] = rep["guests"]  # type: ignore[assignment]
    total: dict[str, object] = rep["total"]  # type: ignore[assignment]
    for key, help_ in (("files", "Regular files (names)."),
                       ("apparent_bytes", "Sum of file sizes (names)."),
                       ("disk_bytes", "Bytes on disk of the distinct inodes."),
                       ("shared_bytes", "Bytes on disk of inodes shared with other guests."),
                       ("saved_bytes", "Bytes the sharing saves.")):
        for g, fig in sorted(guests.items()):
            m.gauge(f"vsstore_guest_{key}", help_ + " Per guest.", int(fig[key]),  # type: ignore[call-overload]
                    guest=g)
        m.gauge(f"vsstore_host_{key}", help_ + " All guests together, each inode once.",
                int(total[key]))  # type: ignore[call-overload]
    m.gauge("vsstore_host_share_ratio", "Saved bytes / what the guests would cost alone.",
            float(total["share_ratio"]))  # type: ignore[arg-type]
    store: dict[str, object] = rep.get("store") or {}  # type: ignore[assignment]
    if store:
        m.gauge("vsstore_store_objects", "Objects in the store.", int(store["objects"]))  # type: ignore[call-overload]
        m.gauge("vsstore_store_bytes", "Bytes in the store's objects.", int(store["bytes"]))  # type: ignore[call-overload]
        m.gauge("vsstore_store_unused_objects", "Objects no guest links any more (vsunify gc).",
                int(store["unused_objects"]))  # type: ignore[call-overload]
    mem: dict[str, object] | None = rep.get("memory")  # type: ignore[assignment]
    if mem:
        for g, fig in sorted(mem["guests"].items()):  # type: ignore[attr-defined]
            m.gauge("vsstore_guest_file_memory_bytes", "File-backed resident memory of the "
                    "guest's processes.", int(fig["file_rss"]), guest=g)
            m.gauge("vsstore_guest_shared_file_memory_bytes", "Of it, in inodes other running "
                    "guests map too.", int(fig["shared_rss"]), guest=g)
        tot = mem["total"]  # type: ignore[index]
        m.gauge("vsstore_host_file_memory_bytes", "File-backed memory of running guests, each "
                "inode once.", int(tot["with_unification"]))  # type: ignore[index]
        m.gauge("vsstore_host_file_memory_without_unification_bytes", "What it would be if "
                "each guest had its own copies.", int(tot["without_unification"]))  # type: ignore[index]
    return m
