"""The driver of a benchmark row, inside the process that serves (or calls) it.

Every row of the benchmark runs on one driver, psycopg2 or psycopg 3, named
in the row (``-pg2``, ``-pg3``) and passed to its server as
``WSGI_PGCONN_DRIVER`` (a row without a driver of its own gets the run's
``WSGI_PGCONN_DRIVER``, default ``auto``). The servers' virtualenv has both
drivers, and Django's postgresql backend takes psycopg 3 whenever it can
import it, so a psycopg2 row would silently measure psycopg 3. The
benchmark's application modules therefore call :func:`isolate` before they
import a driver or a framework: with ``WSGI_PGCONN_DRIVER=psycopg2`` it makes
``import psycopg`` (and ``psycopg_pool``) fail in that process, as on a
machine without psycopg 3 (the test suite's psycopg2 leg does the same, in
``tests/conftest.py``); with ``psycopg`` it keeps psycopg2 out the same way.
Each page names the driver that served it (``backend 1234, psycopg2``), and
the runner checks it against the row before it measures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from wsgi_pgconn import drivers

#: What a process running on the key's driver must not import.
OTHERS = {"psycopg2": ("psycopg", "psycopg_pool"), "psycopg": ("psycopg2",)}


class DriverMixed(RuntimeError):
    """The other driver was imported before :func:`isolate` could keep it out."""


def isolate(choice: str | None = None) -> str:
    """Keep every driver but the row's out of this process; return the row's driver.

    ``choice`` defaults to ``WSGI_PGCONN_DRIVER`` (``auto`` when unset:
    nothing is blocked, psycopg 3 is used when installed, else psycopg2).
    Raises :class:`DriverMixed` when the other driver is already imported and
    :class:`wsgi_pgconn.errors.DriverNotFound` when the row's is not installed.
    """
    choice = choice or os.environ.get("WSGI_PGCONN_DRIVER") or "auto"
    for name in OTHERS.get(choice, ()):
        if sys.modules.get(name) is not None:
            raise DriverMixed(
                f"{name} is already imported in this process, so a row on {choice} cannot keep "
                f"it out: import wsgi_pgconn.tooling.bench.rowdriver and call isolate() first"
            )
        sys.modules[name] = None  # type: ignore[assignment]  # import fails, find_spec: None
    return drivers.resolve(choice)


def connect_function(driver: str) -> Callable[[str], Any]:
    """``connect(dsn)`` of ``driver`` (a connection in the driver's default, transaction mode)."""
    if driver == "psycopg2":
        import psycopg2

        connect: Callable[[str], Any] = psycopg2.connect
        return connect
    import psycopg

    connect3: Callable[[str], Any] = psycopg.connect
    return connect3


def error_class(driver: str) -> type[Exception]:
    """The driver's DB-API ``Error``."""
    if driver == "psycopg2":
        import psycopg2

        return psycopg2.Error
    import psycopg

    return psycopg.Error
