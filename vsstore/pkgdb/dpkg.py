"""dpkg: conffiles from ``var/lib/dpkg/status`` and ``info/*.conffiles``; owned files from
``info/*.list`` with digests from ``info/*.md5sums``.  Replaces util-vserver's
``cat /var/lib/dpkg/info/*.conffiles`` run inside the guest."""

from __future__ import annotations

from ..names import shown
from .base import Budget, PackageFiles, PkgDbError, decode

STATUS = "var/lib/dpkg/status"
INFO = "var/lib/dpkg/info"
# Package states in which conffiles are on disk (everything but not-installed).
_ON_DISK = {
    "installed",
    "half-configured",
    "unpacked",
    "half-installed",
    "config-files",
    "triggers-awaited",
    "triggers-pending",
}


def _stanzas(budget: Budget, rel: str, text: str):
    """Yield the fields of each stanza of a deb822 file as {name: value}."""
    fields: dict[str, str] = {}
    last: str | None = None
    count = 0
    for no, line in enumerate(text.split("\n"), 1):
        if len(line) > budget.limits.max_line_bytes:
            raise budget.fail(rel, f"line {no}: longer than {budget.limits.max_line_bytes} bytes")
        if not line.strip():
            if fields:
                count += 1
                if count > budget.limits.max_packages:
                    raise budget.fail(rel, f"more than {budget.limits.max_packages} stanzas")
                yield fields
            fields, last = {}, None
            continue
        if line[0] in " \t":
            if last is None:
                raise budget.fail(rel, f"line {no}: continuation line outside a field")
            fields[last] += "\n" + line[1:]
            if len(fields[last]) > budget.limits.max_line_bytes:
                raise budget.fail(rel, f"line {no}: field {last} is too long")
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or " " in name:
            raise budget.fail(rel, f"line {no}: not a 'Field: value' line")
        last = name.lower()
        fields[last] = value.strip()
    if fields:
        yield fields


def read(budget: Budget) -> PackageFiles | None:
    """The guest's dpkg database, or None if it has none."""
    if not budget.exists(STATUS):
        return None
    res = PackageFiles(manager="dpkg", source="/" + STATUS)
    installed: dict[str, str] = {}  # info file stem -> package name
    for st in _stanzas(budget, STATUS, decode(budget.read(STATUS))):
        pkg = st.get("package")
        if not pkg:
            raise budget.fail(STATUS, "a stanza without a Package field")
        words = st.get("status", "").split()
        if len(words) != 3:
            raise budget.fail(STATUS, f"package {shown(pkg[:100])}: malformed Status field")
        if words[2] not in _ON_DISK:
            continue
        arch = st.get("architecture", "")
        installed[pkg] = pkg
        if arch and arch != "all":
            installed[f"{pkg}:{arch}"] = pkg
        for line in st.get("conffiles", "").split("\n"):
            parts = line.split()
            if not parts:
                continue
            # ' /etc/foo <md5> [obsolete] [remove-on-upgrade]': obsolete ones are still
            # the admin's files on disk, so they stay excluded as well.
            path = budget.check_path(STATUS, parts[0])
            res.config[path] = pkg
    if budget.exists(INFO):
        _read_info(budget, res, installed)
    _check_count(budget, res)
    return res


def _read_info(budget: Budget, res: PackageFiles, installed: dict[str, str]) -> None:
    by_stem: dict[str, set[str]] = {}
    for name in budget.listdir(INFO):
        stem, dot, ext = name.rpartition(".")
        if dot and ext in ("conffiles", "list", "md5sums"):
            by_stem.setdefault(stem, set()).add(ext)
    for stem, exts in by_stem.items():
        pkg = installed.get(stem)
        if pkg is None:
            continue  # leftovers of a package dpkg no longer lists
        if not budget.want_owned:
            exts = exts & {"conffiles"}
        if "conffiles" in exts:
            rel = f"{INFO}/{stem}.conffiles"
            for line in decode(budget.read(rel)).splitlines():
                if line.strip():
                    res.config.setdefault(budget.check_path(rel, line.split()[0]), pkg)
        digests: dict[str, str] = {}
        if "md5sums" in exts:
            rel = f"{INFO}/{stem}.md5sums"
            for no, line in enumerate(decode(budget.read(rel)).splitlines(), 1):
                digest, _, path = line.partition("  ")
                if not path or len(digest) != 32:
                    raise budget.fail(rel, f"line {no}: not '<md5>  <path>'")
                digests[budget.check_path(rel, path)] = "md5:" + digest.lower()
        if "list" in exts:
            rel = f"{INFO}/{stem}.list"
            for line in decode(budget.read(rel)).splitlines():
                if line and line != "/.":
                    path = budget.check_path(rel, line)
                    res.owned[path] = digests.get(path)
                    if len(res.owned) > budget.limits.max_paths:
                        raise budget.fail(rel, f"more than {budget.limits.max_paths} paths")


def _check_count(budget: Budget, res: PackageFiles) -> None:
    if len(res.config) > budget.limits.max_paths:
        raise PkgDbError(f"{budget.where(STATUS)}: more than {budget.limits.max_paths} conffiles")
