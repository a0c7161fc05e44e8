"""apk (Alpine): ``lib/apk/db/installed``.  apk has no per-file config flag: it protects
whole directories (``etc/apk/protected_paths.d/*.list``, '+path' lines; ``etc`` by
default), so every owned file below a protected path counts as config."""

from __future__ import annotations

import base64
import binascii

from .base import Budget, PackageFiles, decode

INSTALLED = "lib/apk/db/installed"
PROTECTED = "etc/apk/protected_paths.d"


def _protected(budget: Budget) -> list[str]:
    paths = ["/etc"]
    if budget.exists(PROTECTED):
        for name in budget.listdir(PROTECTED):
            if not name.endswith(".list"):
                continue
            rel = f"{PROTECTED}/{name}"
            for line in decode(budget.read(rel)).splitlines():
                if line.startswith("+") and len(line) > 1:
                    paths.append(budget.check_path(rel, line[1:]))
    return paths


def _digest(budget: Budget, value: str) -> str:
    """'Q1<base64 sha1>' -> 'sha1:<hex>' (apk's own encoding)."""
    if value.startswith("Q1"):
        try:
            raw = base64.b64decode(value[2:], validate=True)
        except (binascii.Error, ValueError):
            raise budget.fail(INSTALLED, f"bad checksum {value[:60]!r}") from None
        return "sha1:" + raw.hex()
    return "apk:" + value[:128]


def read(budget: Budget) -> PackageFiles | None:
    """The guest's apk database, or None if it has none."""
    if not budget.exists(INSTALLED):
        return None
    res = PackageFiles(manager="apk", source="/" + INSTALLED)
    protected = [p.rstrip("/") + "/" for p in _protected(budget)]
    pkg = ""
    folder = ""
    last: str | None = None
    packages = 0
    for no, line in enumerate(decode(budget.read(INSTALLED)).split("\n"), 1):
        if len(line) > budget.limits.max_line_bytes:
            raise budget.fail(INSTALLED, f"line {no}: too long")
        if not line:
            pkg, folder, last = "", "", None
            continue
        key, sep, value = line[:1], line[1:2], line[2:]
        if sep != ":":
            raise budget.fail(INSTALLED, f"line {no}: not a 'X:value' line")
        if key == "P":
            pkg = value
            packages += 1
            if packages > budget.limits.max_packages:
                raise budget.fail(INSTALLED, f"more than {budget.limits.max_packages} packages")
        elif key == "F":
            folder = budget.check_path(INSTALLED, value)
        elif key == "R":
            if not pkg:
                raise budget.fail(INSTALLED, f"line {no}: a file before any package")
            if "/" in value or not value:
                raise budget.fail(INSTALLED, f"line {no}: bad file name")
            last = budget.check_path(INSTALLED, f"{folder}/{value}")
            res.owned[last] = None
            if any(last.startswith(p) for p in protected):
                res.config[last] = pkg
            if len(res.owned) > budget.limits.max_paths:
                raise budget.fail(INSTALLED, f"more than {budget.limits.max_paths} paths")
        elif key == "Z" and last is not None:
            res.owned[last] = _digest(budget, value)
    return res
