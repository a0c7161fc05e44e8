"""Layer 1: the house's rules, checked on the source: the core (``vsstore`` outside
``vsstore/lifecycle``) imports nothing above it: not the lifecycle, not vsunify, not the
overlay; the overlay and vsunify never import the lifecycle.  Lazy imports inside
functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO


def _imports(path: Path, root: Path = REPO) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved), anywhere in it."""
    pkg = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                up = parts[: len(parts) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _files(top: str, exclude: str | None = None) -> list[Path]:
    return sorted(
        p
        for p in (REPO / top).rglob("*.py")
        if exclude is None or exclude not in p.relative_to(REPO).parts
    )


RULES = [
    ("vsstore", "lifecycle", ("unify", "cow", "vsstore.lifecycle")),
    ("unify", None, ("vsstore.lifecycle",)),
    ("cow", None, ("vsstore.lifecycle", "unify")),
]


@pytest.mark.parametrize("top,exclude,forbidden", RULES, ids=[r[0] for r in RULES])
def test_no_module_imports_a_room_above_it(top, exclude, forbidden):
    bad = []
    for f in _files(top, exclude):
        for imp in _imports(f):
            if any(imp == x or imp.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(REPO)} imports {imp}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    """The rule's own check: a lazy relative import in a function is found."""
    f = tmp_path / "vsstore" / "probe.py"
    f.parent.mkdir()
    f.write_text("def f():\n    from .lifecycle import run\n    import cow.fs\n")
    found = _imports(f, tmp_path)
    assert "vsstore.lifecycle.run" in found and "cow.fs" in found
