"""Layer 4: every console script has a man page generated from the parser it really parses
with (every option of every subcommand named), --version answers, and vserver NAME build
--help shows the methods' arguments."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from vsstore import manpages

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _options(p: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and of its subcommands, recursively."""
    found: set[str] = set()
    for a in p._actions:
        found.update(a.option_strings)
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                found |= _options(sp)
    return found


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("man8")
    written = manpages.write(d)
    return {p.name.removesuffix(".8"): p.read_text() for p in written}


def test_every_command_has_a_page_naming_all_its_options(pages: dict[str, str]) -> None:
    assert set(pages) == set(SCRIPTS)
    parsers = manpages.parsers()
    for name, text in pages.items():
        assert text.startswith(f".TH {name.upper()} 8 ")
        opts = _options(parsers[name])
        assert "--version" in opts and "--help" in opts
        for o in opts:
            assert f"\\fB{o.replace('-', chr(92) + '-')}\\fR" in text, (name, o)
    vsunify = pages["vsunify"]
    for cmd in ("run", "report", "deunify", "gc", "excludes", "demo"):
        assert f".SS vsunify {cmd}\n" in vsunify
    assert "\\-\\-force\\-path" in vsunify and "du \\-sx" in vsunify  # report's columns
    assert "\\-\\- \\-d SUITE" in pages["vserver"]


@pytest.mark.skipif(shutil.which("man") is None, reason="no man on this host")
def test_man_renders_the_page(pages: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    page = tmp_path / "vsunify.8"
    page.write_text(pages["vsunify"])
    p = subprocess.run(
        ["man", "-l", str(page)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "PATH": "/usr/bin:/bin"},
        check=True,
    )
    assert "vsunify report" in p.stdout and "SYNOPSIS" in p.stdout


def test_every_command_answers_version() -> None:
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        p = subprocess.run(
            [sys.executable, "-c", f"import sys, {module} as m; sys.exit(m.{func}())", "--version"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert (p.returncode, p.stdout.strip()) == (0, f"{name} (vsstore) {VERSION}"), p


def test_build_help_shows_the_methods_arguments() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "vsstore.lifecycle.cli", "web", "build", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "-m debootstrap -- -d SUITE" in p.stdout
    assert "-m clone -- --source GUEST" in p.stdout
