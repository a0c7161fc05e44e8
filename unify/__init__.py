"""unify: vsunify, the hashing indexer that links identical guest files into the store.
Its face: ``unify`` (what ``vsunify run`` does, for any caller), the engine's run and its
options and summary, ``Reflink`` (whether a run shares extents too)."""

from .api import RunOptions, RunResult, unify
from .dedupe import Reflink
from .engine import Options, Summary, run

__all__ = ["Options", "Reflink", "RunOptions", "RunResult", "Summary", "run", "unify"]
