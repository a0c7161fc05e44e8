"""The guest lifecycle behind ``vserver``: build, start, stop, enter and watch guests in
their own namespaces.  This package may use the core (``vsstore``), the overlay (``cow``)
and vsunify's API; the core never imports it.  Its face:"""

from vsstore.runtime import RunState, alive, guest_pids, read_state, running

from .cgroups import of as guest_cgroup
from .entering import run_cow, run_in
from .run import cleanup, guest_lock, start, stop, stop_config

__all__ = [
    "RunState",
    "alive",
    "cleanup",
    "guest_cgroup",
    "guest_lock",
    "guest_pids",
    "read_state",
    "run_cow",
    "run_in",
    "running",
    "start",
    "stop",
    "stop_config",
]
