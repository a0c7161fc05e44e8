"""Exclude lists: which files of a guest may never be unified.

An exclude keeps a file out of the hardlinks (it stays the guest's own inode); where the
filesystem shares extents, its blocks may still be shared with identical files (the kernel
compares them; the file keeps its inode, metadata and write access).  A ``=`` rule keeps a
file out of both: never touched at all.

Rules come, in order of precedence, from ``--exclude``, the guest's list, the host's list,
providers such as package databases (config files), and the built-in default list; the first
rule that matches a path decides.  The syntax is documented in ``data/vunify-exclude``.
All rules are compiled into one regular expression, so a file costs one match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ConfigError

_GLOB_CHARS = "*?["


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule.  ``pattern`` starts with '/' (a path glob) unless ``basename``."""

    pattern: str
    include: bool
    basename: bool
    reason: str
    literal: bool = False  # a path from a package database: no glob characters, ever
    untouched: bool = False  # '=': neither hardlinked nor extent-shared

    @property
    def text(self) -> str:
        mark = "+" if self.include else "=" if self.untouched else ""
        return mark + ("~" if self.basename else "") + self.pattern

    @property
    def subtree(self) -> str | None:
        """The directory this rule covers wholly, if it is a plain or '/*' rule."""
        if self.literal:
            return self.pattern.rstrip("/") or "/"
        if self.basename:
            return None
        p = self.pattern[:-2] if self.pattern.endswith("/*") else self.pattern
        if any(c in p for c in _GLOB_CHARS):
            return None
        return p.rstrip("/") or "/"

    @property
    def literal_prefix(self) -> str:
        if self.literal:
            return self.pattern
        i = min(
            (self.pattern.find(c) for c in _GLOB_CHARS if c in self.pattern),
            default=len(self.pattern),
        )
        return self.pattern[:i]


def parse_rule(line: str, reason: str) -> Rule:
    """Parse one rule; raises ValueError with a short explanation."""
    text = line.strip()
    include = untouched = False
    if text.startswith("+"):
        include, text = True, text[1:]
    elif text.startswith("="):
        untouched, text = True, text[1:]
    elif text.startswith("-"):
        text = text[1:]
    basename = text.startswith("~")
    if basename:
        text = text[1:]
        if not text or "/" in text:
            raise ValueError("a '~' rule names a file name glob without '/'")
    elif not text.startswith("/"):
        raise ValueError("a rule is an absolute path inside the guest, e.g. /etc or /usr/*.pyc")
    if "\0" in text:
        raise ValueError("NUL character")
    _glob_regex(text, basename)  # validates brackets
    return Rule(
        pattern=text, include=include, basename=basename, reason=reason, untouched=untouched
    )


def read_rules(path: Path, reason: str) -> list[Rule]:
    """Rules from a file; a bad line is a ConfigError naming file and line."""
    try:
        data = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{path}: cannot read exclude list: {e.strerror}") from None
    rules = []
    for no, line in enumerate(data.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rules.append(parse_rule(line, f"{reason} {path}:{no}"))
        except ValueError as e:
            raise ConfigError(
                f"{path}:{no}: bad exclude rule {line.strip()!r}: {e}; fix or remove that line"
            ) from None
    return rules


def default_rules() -> list[Rule]:
    text = resources.files("vsstore").joinpath("data/vunify-exclude").read_text()
    return [
        parse_rule(line, "default list")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _glob_regex(glob: str, basename: bool) -> str:
    """Translate a shell glob to a regex using only non-capturing constructs."""
    out, i, n = [], 0, len(glob)
    star = "[^/]*" if basename else ".*"
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            out.append(star)
        elif c == "?":
            out.append("[^/]" if basename else ".")
        elif c == "[":
            j = i
            if j < n and glob[j] in "!^":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                raise ValueError("unclosed '['")
            body = glob[i:j].replace("\\", "\\\\")
            if body[:1] in "!^":
                body = "^" + body[1:]
            out.append("[" + body + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
    return "".join(out)


def literal_rule(path: str, reason: str) -> Rule:
    """Exclude exactly ``path`` (and anything below it), whatever characters it holds."""
    return Rule(pattern=path, include=False, basename=False, reason=reason, literal=True)


def _rule_regex(rule: Rule) -> str:
    if rule.basename:
        return "(?:.*/)?" + _glob_regex(rule.pattern, True)
    sub = rule.subtree
    if sub is not None:
        return "/.*" if sub == "/" else re.escape(sub) + "(?:/.*)?"
    return _glob_regex(rule.pattern, False)


class _Block:
    """Consecutive rules matched together: one regex, or (for many literal excludes in a
    row, as package databases give) a dict looked up for the path and its parents."""

    EXACT_MIN = 16

    def __init__(self, rules: list[Rule], exact: bool) -> None:
        self.rules = rules
        self.exact = {r.subtree: r for r in rules} if exact else None
        self.regex = None
        if not exact:
            alts = [f"(?P<r{i}>{_rule_regex(r)})" for i, r in enumerate(rules)]
            self.regex = re.compile("(?s:" + "|".join(alts) + r")\Z")

    def match(self, path: str) -> Rule | None:
        if self.exact is not None:
            p = path
            while p:
                r = self.exact.get(p)
                if r is not None:
                    return r
                p = p.rpartition("/")[0]
            return None
        m = self.regex.match(path) if self.regex is not None else None
        if m is None or m.lastgroup is None:
            return None
        return self.rules[int(m.lastgroup[1:])]


class ExcludeList:
    """An ordered rule list, compiled; the first rule that matches decides."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        self._blocks: list[_Block] = []
        run: list[Rule] = []
        i = 0
        while i < len(self.rules):
            j = i
            while j < len(self.rules) and self.rules[j].literal and not self.rules[j].include:
                j += 1
            if j - i >= _Block.EXACT_MIN:
                if run:
                    self._blocks.append(_Block(run, exact=False))
                    run = []
                self._blocks.append(_Block(self.rules[i:j], exact=True))
                i = j
            else:
                run.extend(self.rules[i : max(j, i + 1)])
                i = max(j, i + 1)
        if run:
            self._blocks.append(_Block(run, exact=False))
        self._includes_anywhere = any(r.include and r.basename for r in self.rules)

    def match(self, rel: str) -> Rule | None:
        """The deciding rule for guest path ``rel`` ('usr/bin/ls'), or None."""
        path = "/" + rel
        for block in self._blocks:
            r = block.match(path)
            if r is not None:
                return r
        return None

    def excluded(self, rel: str) -> bool:
        """Never hardlinked (an exclude or a '=' rule decides)."""
        r = self.match(rel)
        return r is not None and not r.include

    def untouched(self, rel: str) -> bool:
        """Never touched at all, not even its extents (a '=' rule decides)."""
        r = self.match(rel)
        return r is not None and r.untouched

    def prune_untouched(self, rel_dir: str) -> bool:
        """True when nothing below directory ``rel_dir`` may be touched at all (a '='
        subtree rule decides before any other rule could reach below it): the walk of a
        run that shares extents too may skip it."""
        d = "/" + rel_dir
        for block in self._blocks:
            if block.exact is not None:
                if block.match(d) is not None:
                    return False  # a package database's exclude: extents may be shared
                continue
            for r in block.rules:
                sub = r.subtree
                if sub is not None and (d == sub or d.startswith(sub.rstrip("/") + "/")):
                    return r.untouched
                if r.untouched:
                    continue
                lp = r.literal_prefix
                if r.basename or lp.startswith(d + "/") or (d + "/").startswith(lp):
                    return False
        return False

    def prune(self, rel_dir: str) -> bool:
        """True when nothing below directory ``rel_dir`` can be included, so the walk may
        skip it.  Conservative: only whole-subtree excludes prune."""
        if self._includes_anywhere:
            return False
        d = "/" + rel_dir
        for block in self._blocks:
            if block.exact is not None:
                r = block.match(d)
                if r is not None:
                    return True
                continue
            for r in block.rules:
                sub = r.subtree
                if sub is not None and (d == sub or d.startswith(sub.rstrip("/") + "/")):
                    return not r.include
                if r.include:
                    lp = r.literal_prefix
                    if lp.startswith(d + "/") or (d + "/").startswith(lp):
                        return False
        return False


def build_excludes(
    *,
    cli: Iterable[str] = (),
    guest_file: Path | None = None,
    host_file: Path | None = None,
    provided: Iterable[Rule] = (),
    use_default: bool = True,
) -> ExcludeList:
    """Assemble the effective list in precedence order.  ``provided``: rules computed per
    guest, such as those from its package database (the hook for the next issue)."""
    rules: list[Rule] = []
    for text in cli:
        try:
            rules.append(parse_rule(text, "--exclude"))
        except ValueError as e:
            raise ConfigError(f"--exclude {text!r}: {e}") from None
    if guest_file is not None:
        rules += read_rules(guest_file, "guest list")
    if host_file is not None:
        rules += read_rules(host_file, "host list")
    rules += list(provided)
    if use_default:
        rules += default_rules()
    return ExcludeList(rules)
