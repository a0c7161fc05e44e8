"""unify: vsunify, the hashing indexer that links identical guest files into the store."""
from .engine import Options, Summary, run

__all__ = ["Options", "Summary", "run"]
