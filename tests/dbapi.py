"""The driver of this test run, for the applications the tests serve.

``WSGI_PGCONN_DRIVER`` (psycopg2, psycopg, or unset for auto) picks it, as it
picks the middleware's. The tests' own admin connections use psycopg2 either
way; what the applications do on the request's connection goes through here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from wsgi_pgconn import drivers

NAME = drivers.resolve(os.environ.get("WSGI_PGCONN_DRIVER") or "auto")
PSYCOPG2 = NAME == "psycopg2"

module: Any
#: The driver's module of SQLSTATE exception classes (psycopg2.errors, psycopg.errors).
errors: Any = importlib.import_module(f"{NAME}.errors")
if PSYCOPG2:
    import psycopg2 as module
    import psycopg2.extensions

    Connection: Any = psycopg2.extensions.connection
else:
    import psycopg as module

    Connection = module.Connection

Error: Any = module.Error
OperationalError: Any = module.OperationalError
DataError: Any = module.DataError
IntegrityError: Any = module.IntegrityError
ProgrammingError: Any = module.ProgrammingError
InterfaceError: Any = module.InterfaceError


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver error."""
    return getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)


def connect(dsn: str, **kwargs: Any) -> Any:
    """A plain connection of this run's driver."""
    return module.connect(dsn, **kwargs)


def dsn_parameters(conn: Any) -> dict[str, str]:
    """The connection's effective connection parameters (no password)."""
    params: dict[str, str] = (
        conn.get_dsn_parameters() if PSYCOPG2 else conn.info.get_parameters()
    )
    return params


def set_read_only(conn: Any) -> None:
    """The driver's way of making the connection's transactions read-only."""
    if PSYCOPG2:
        conn.set_session(readonly=True)
    else:
        conn.read_only = True
