"""vsstore: the shared core (configuration, safe tree access, attributes, store, index)."""

from .config import Guest, Paths, configured_guests, configured_names, resolve_guest
from .errors import BusyError, ConfigError, NoSpaceError, UnsafeTreeError, UnsupportedError, VsError
from .safetree import GuestTree
from .store import Store, StoreObject

__all__ = [
    "BusyError",
    "ConfigError",
    "Guest",
    "GuestTree",
    "NoSpaceError",
    "Paths",
    "Store",
    "StoreObject",
    "UnsafeTreeError",
    "UnsupportedError",
    "VsError",
    "configured_guests",
    "configured_names",
    "resolve_guest",
]
