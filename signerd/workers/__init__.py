"""Several worker processes on one listening socket, and what they share.

- ``Supervisor``: the pre-fork supervisor (start, restart, reload, stop).
- ``WorkerChannel``: a worker's pipe to the supervisor (initialised, notifications).
- ``AdminLock``: admin operations one at a time across the workers.
- ``SharedBuckets``: rate-limit token buckets shared by the workers.
"""

from ._buckets import SharedBuckets
from ._channel import WorkerChannel
from ._lock import AdminLock, LockTimeout, runtime_path
from ._supervisor import Supervisor, SupervisorTiming, WorkerMain, set_parent_death_signal

__all__ = [
    "AdminLock",
    "LockTimeout",
    "SharedBuckets",
    "Supervisor",
    "SupervisorTiming",
    "WorkerChannel",
    "WorkerMain",
    "runtime_path",
    "set_parent_death_signal",
]
