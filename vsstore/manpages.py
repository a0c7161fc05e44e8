"""Man pages (section 8) for every console script, generated from the argparse parsers the
commands really parse with, so they never drift from ``--help``.

Each script's entry point is called with no arguments while ``clitools.parser_sink`` is set:
``run_cli`` hands over its parser before parsing, and the sink stops the command there.  The
entry points are found through the package metadata (``[project.scripts]``), so this core
module imports nothing of the layers above it.

    python -m vsstore.manpages DIR     write DIR/NAME.8 for every command (scripts/setup)
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from . import clitools


class _Captured(Exception):
    def __init__(self, prog: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(prog)
        self.prog, self.parser = prog, parser


def _sink(prog: str, parser: argparse.ArgumentParser) -> None:
    raise _Captured(prog, parser)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every console script of the vsstore distribution: its name -> its parser."""
    found: dict[str, argparse.ArgumentParser] = {}
    eps = [
        ep for ep in entry_points(group="console_scripts") if ep.dist and ep.dist.name == "vsstore"
    ]
    for ep in sorted(eps, key=lambda e: e.name):
        main = ep.load()
        clitools.parser_sink = _sink
        try:
            main([])
        except _Captured as c:
            found[ep.name] = c.parser
        finally:
            clitools.parser_sink = None
    return found


def _esc(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, no line taken for a request."""
    out = []
    for ln in text.replace("\\", "\\e").replace("-", "\\-").splitlines():
        out.append("\\&" + ln if ln.startswith((".", "'")) else ln)
    return "\n".join(out)


def _help(a: argparse.Action, prog: str) -> str:
    """The option's help as --help shows it (%(default)s, %% expanded)."""
    try:
        return (a.help or "") % {**vars(a), "prog": prog}
    except (KeyError, ValueError, TypeError):
        return a.help or ""


def _options(p: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            arg = ""
            if a.nargs != 0:
                arg = " " + (a.metavar if isinstance(a.metavar, str) else a.dest.upper())
            head = ", ".join(f"\\fB{_esc(o)}\\fR" for o in a.option_strings) + _esc(arg)
        else:
            head = f"\\fI{_esc(str(a.metavar or a.dest))}\\fR"
        lines += [".TP", head, _esc(_help(a, p.prog))]
    return lines


def _section(p: argparse.ArgumentParser, title: str | None) -> list[str]:
    lines = [f".SS {_esc(title)}"] if title else []
    lines += [".nf", _esc(p.format_usage().strip()), ".fi"]
    if p.description:
        lines += [".PP", _esc(p.description)]
    opts = _options(p)
    if opts:
        lines += ([".PP", "Options:"] if title else [".SH OPTIONS"]) + opts
    if p.epilog:
        lines += [".PP", ".nf", _esc(p.epilog), ".fi"]
    return lines


def page(name: str, p: argparse.ArgumentParser) -> str:
    """The man page of one command: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, then one
    subsection per subcommand (``vsunify run``, ``vserver NAME build``, ...)."""
    summary = (p.description or name).split(". ")[0].rstrip(".")
    lines = [
        f'.TH {name.upper()} 8 "{time.strftime("%Y-%m-%d")}" '
        f'"vsstore {_esc(clitools.version())}" "System Administration"',
        ".SH NAME",
        f"{_esc(name)} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
    ]
    lines += _section(p, None)[0:3]
    rest = _section(p, None)[3:]
    lines += [".SH DESCRIPTION", *(rest or [".PP", _esc(summary)])]
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            lines.append(".SH COMMANDS")
            for cmd, sp in a.choices.items():
                lines += _section(sp, f"{name} {cmd}")
    lines += [
        ".SH EXIT STATUS",
        "0 done; 2 bad command line; the other codes are listed in the README (Exit codes).",
        ".SH SEE ALSO",
        ", ".join(f"\\fB{n}\\fR(8)" for n in sorted(_names) if n != name) or "vsstore",
    ]
    return "\n".join(lines) + "\n"


_names: set[str] = set()


def write(directory: Path) -> list[Path]:
    """Write NAME.8 for every command into ``directory``; the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    ps = parsers()
    _names.update(ps)
    written = []
    for name, p in ps.items():
        path = directory / f"{name}.8"
        path.write_text(page(name, p))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vsstore.manpages DIR", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
