"""Several worker processes on one listening socket, and what they share.

- ``Supervisor``: the pre-fork supervisor (start, restart, reload, stop).
- ``WorkerChannel``: a worker's pipe to the supervisor (initialised, notifications).
- ``AdminLock``: admin operations one at a time across the workers, in fair turns.
- ``SharedBuckets``: rate-limit token buckets shared by the workers.
- ``SharedConnections``: open connections per uid and per worker, counted across the
  workers (new connections are spread by them).
- ``WorkerTable``: each worker slot's pid, start time and restarts, for the status.
- ``SharedInline``: the token calls on every worker's loop, and whether the token hung.
- ``StallGuard``: deadlines for the token calls and audit writes a worker makes on
  its event loop's thread; a call past its deadline ends the worker (503s first).

Wiring, in ``signerd`` itself: the main process loads the configuration, binds
(or receives from systemd) the listening socket, and runs
``Supervisor(config, sock, worker_main, reload_config=..., on_ready=...).run()``
as its exit status, without touching a backend library. ``worker_main`` builds
the backends, the key service and the policy (its limiter on
``channel.buckets``), calls ``channel.ready()`` once the keyring is loaded,
serves ``sock`` (never unlinking it: the socket is the supervisor's), takes
``AdminLock.of_worker(config.socket, index, config.workers)`` around admin
operations and sends ``keyring-changed TENANT/NAME`` after them, re-reading a
key when another worker's notice arrives, and keeps ``channel.heartbeat()``
beating from its event loop.
"""

from ._buckets import SharedBuckets
from ._channel import WorkerChannel
from ._child import set_parent_death_signal
from ._conns import SharedConnections
from ._inline import SharedInline
from ._lock import AdminLock, LockTimeout, runtime_path
from ._settings import SupervisorTiming, WorkerMain
from ._stall import EXIT_STALLED, StallGuard
from ._supervisor import Supervisor
from ._table import WorkerSlot, WorkerTable

__all__ = [
    "EXIT_STALLED",
    "AdminLock",
    "LockTimeout",
    "SharedBuckets",
    "SharedConnections",
    "SharedInline",
    "StallGuard",
    "Supervisor",
    "SupervisorTiming",
    "WorkerChannel",
    "WorkerMain",
    "WorkerSlot",
    "WorkerTable",
    "runtime_path",
    "set_parent_death_signal",
]
