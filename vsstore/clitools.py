"""What every vsstore command line shares: the common options (``--debug``, ``-v``, ``-q``),
logging set-up, the host's roots resolved once, and turning errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import traceback
from collections.abc import Callable

from .config import Paths
from .errors import EXIT_INTERNAL, NotRootError, VsError


def setup_logging(prog: str, verbose: bool, quiet: bool = False) -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    root = logging.getLogger("vsstore")
    root.handlers[:] = [h]
    root.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    root.propagate = False


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (the soft one is often 1024): a run
    holds a file per joiner of a window, directories, hashing threads.  Work is still cut
    to fit whatever limit remains (unify.apply.fds_free)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            logging.getLogger("vsstore").debug("open files: soft limit %d kept (%s)", soft, e)
            return
        logging.getLogger("vsstore").debug(
            "open files: soft limit raised from %d to %d", soft, hard
        )


def require_root(what: str, why: str) -> None:
    """Refuse, in one line with its own exit code (EXIT_NOTROOT), a command that needs
    root when another user runs it, before it does anything."""
    if os.geteuid() != 0:
        raise NotRootError(f"{what} needs root ({why}); run it as root, e.g. with sudo")


def common_options() -> argparse.ArgumentParser:
    """The parent parser of every command and subcommand: the options they all take."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", help="tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="say more")
    p.add_argument("-q", "--quiet", action="store_true", help="errors only")
    return p


def version() -> str:
    """The installed package's version (its metadata: pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vsstore")
    except PackageNotFoundError:
        return "unknown (not installed: run scripts/setup)"


# vsstore.manpages sets this to see the parser each command really parses with.
parser_sink: Callable[[str, argparse.ArgumentParser], None] | None = None


def run_cli(
    prog: str,
    parser: argparse.ArgumentParser,
    handler: Callable[[argparse.Namespace, Paths], int],
    argv: list[str] | None,
) -> int:
    """Parse, resolve the host's roots (``Paths``, from the environment) once, run, and map
    exceptions to exit codes: VsError -> its code and one line, anything else -> 1 with a
    hint to use --debug (the traceback with it)."""
    if "--version" not in parser._option_string_actions:
        parser.add_argument("--version", action="version", version=f"{prog} (vsstore) {version()}")
    if parser_sink is not None:
        parser_sink(prog, parser)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    setup_logging(prog, getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        return handler(args, Paths.from_env())
    except VsError as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug; keep the user's screen readable
        if debug:
            traceback.print_exc()
        print(
            f"{prog}: internal error: {type(e).__name__}: {e} (run with --debug for the "
            f"traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
