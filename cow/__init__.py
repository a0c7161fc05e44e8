"""cow: the FUSE copy-on-write overlay (pyfuse3 + trio): one mount serving every guest,
shared inodes as one FUSE inode each, a write to a shared file copying it up for the writing
guest alone.  Its face: ``control`` (mount, add, remove, attach, umount) and ``CowFS``."""

from . import control
from .fs import CowFS

__all__ = ["CowFS", "control"]
