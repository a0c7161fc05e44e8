"""Layer 4: the project as a user installs it: a wheel built from the checkout, installed
(not editable) into a throw-away virtualenv, every console script answering ``--help``.
An editable install hides a package left out of the wheel; this does not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A virtualenv with the wheel installed; its dependencies come from the test's own
    environment (a path in a .pth file: no download, and no editable finder of ours)."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"  # a copy: building leaves build/ and *.egg-info in the source tree
    shutil.copytree(
        REPO,
        src,
        symlinks=True,  # as a checkout holds them (a fixture's util-vserver "run" link dangles)
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(d / "dist"),
            str(src),
        ],
        check=True,
        cwd=d,
        capture_output=True,
    )
    wheel = next((d / "dist").glob("vsstore-*.whl"))
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    (Path(site.stdout.strip()) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        cwd=d,
        capture_output=True,
    )
    return venv


def _source(kind: str) -> list[str]:
    """Every module (dotted) or data file (relative path) of the packages in the checkout."""
    out = []
    for top in ("vsstore", "unify", "cow"):
        for p in sorted((REPO / top).rglob("*")):
            if not p.is_file() or "__pycache__" in p.parts:
                continue
            rel = p.relative_to(REPO)
            if kind == "module" and p.suffix == ".py":
                parts = rel.with_suffix("").parts
                out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            elif kind == "data" and p.suffix != ".py":
                out.append(str(rel))
    return out


def test_the_wheel_holds_every_module_and_data_file_of_the_source(installed):
    code = (
        "import importlib, os, sys, sysconfig\n"
        "site = sysconfig.get_paths()['purelib']\n"
        "for m in sys.argv[1].split():\n"
        "    mod = importlib.import_module(m)\n"
        "    assert mod.__file__.startswith(site), (m, mod.__file__)\n"
        "missing = [d for d in sys.argv[2].split() if not os.path.exists(os.path.join("
        "site, d))]\n"
        "assert not missing, missing\n"
    )
    p = subprocess.run(
        [
            str(installed / "bin" / "python"),
            "-c",
            code,
            " ".join(_source("module")),
            " ".join(_source("data")),
        ],
        cwd="/",
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_answers_help_from_the_wheel(installed, script):
    p = subprocess.run(
        [str(installed / "bin" / script), "--help"],
        cwd="/",
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout
