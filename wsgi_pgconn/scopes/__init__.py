"""Connection registries: which live connection a request gets (the scope).

* :class:`ThreadRegistry` keeps one connection per thread.
* :class:`ProcessRegistry` keeps one connection per process (one thread only).
* :class:`PoolRegistry` shares at most ``pool_size`` connections between threads.

They share :class:`~wsgi_pgconn.scopes.base.Registry`, which opens
connections through the driver, decides at checkout whether a kept connection
is still usable without talking to the server, resets it at checkin, forgets
connections inherited through ``fork()``, and keeps the stats.
"""

from __future__ import annotations

from .base import PooledConnection, Registry, close_all_registries, watch_sigterm
from .pool import PoolRegistry
from .process import ProcessRegistry
from .thread import ThreadRegistry

__all__ = [
    "REGISTRIES",
    "PoolRegistry",
    "PooledConnection",
    "ProcessRegistry",
    "Registry",
    "ThreadRegistry",
    "close_all_registries",
    "watch_sigterm",
]

#: scope name -> registry class.
REGISTRIES: dict[str, type[Registry]] = {
    cls.scope: cls for cls in (ThreadRegistry, ProcessRegistry, PoolRegistry)
}
