"""pacman (Arch): ``var/lib/pacman/local/<pkg>/files``: ``%FILES%`` owned files,
``%BACKUP%`` the config files pacman keeps (path, tab, md5)."""

from __future__ import annotations

from .base import Budget, PackageFiles, decode

LOCAL = "var/lib/pacman/local"


def _sections(budget: Budget, rel: str, text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for no, line in enumerate(text.split("\n"), 1):
        if len(line) > budget.limits.max_line_bytes:
            raise budget.fail(rel, f"line {no}: too long")
        if line.startswith("%") and line.endswith("%") and len(line) > 2:
            cur = out.setdefault(line[1:-1], [])
        elif line:
            if cur is None:
                raise budget.fail(rel, f"line {no}: text before any %SECTION%")
            cur.append(line)
    return out


def read(budget: Budget) -> PackageFiles | None:
    """The guest's pacman database, or None if it has none."""
    if not budget.exists(LOCAL):
        return None
    res = PackageFiles(manager="pacman", source="/" + LOCAL)
    names = budget.listdir(LOCAL)
    if len(names) > budget.limits.max_packages:
        raise budget.fail(LOCAL, f"more than {budget.limits.max_packages} packages")
    for entry in names:
        if entry == "ALPM_DB_VERSION" or entry.startswith("."):
            continue
        rel = f"{LOCAL}/{entry}/files"
        if not budget.exists(rel):
            continue
        pkg = entry
        desc = f"{LOCAL}/{entry}/desc"
        if budget.exists(desc):
            pkg = (_sections(budget, desc, decode(budget.read(desc))).get("NAME") or [pkg])[0]
        sec = _sections(budget, rel, decode(budget.read(rel)))
        for line in sec.get("FILES", []):
            if not line.endswith("/"):
                res.owned[budget.check_path(rel, line)] = None
        for line in sec.get("BACKUP", []):
            path, tab, md5 = line.partition("\t")
            if not tab:
                raise budget.fail(rel, f"%BACKUP% line without a digest: {line[:100]!r}")
            p = budget.check_path(rel, path)
            res.config[p] = pkg
            res.owned[p] = "md5:" + md5.lower()
        if len(res.owned) > budget.limits.max_paths:
            raise budget.fail(rel, f"more than {budget.limits.max_paths} paths")
    return res
