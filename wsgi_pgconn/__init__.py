"""wsgi_pgconn: persistent PostgreSQL connections and a transaction per request for any WSGI app.

>>> from wsgi_pgconn import PgConnMiddleware
>>> application = PgConnMiddleware(application)  # doctest: +SKIP

The layout: :mod:`~wsgi_pgconn.config` (settings), :mod:`~wsgi_pgconn.drivers`
(psycopg2 and psycopg 3 behind one seam), :mod:`~wsgi_pgconn.scopes` (which
connection a request gets), :mod:`~wsgi_pgconn.middleware` and
:mod:`~wsgi_pgconn.transaction` (the request's transaction), the adapters
(:mod:`wsgi_pgconn.django`), and, apart, the tooling (benchmark, throwaway
clusters). See README.md and docs/.
"""

from __future__ import annotations

from .config import Settings
from .errors import (
    ConfigurationError,
    ConnectBackoff,
    DriverNotFound,
    MiddlewareNotInstalled,
    PgConnError,
    PoolTimeout,
    TransactionManaged,
)
from .middleware import CONNECTION_KEY, TRANSACTION_KEY, PgConnMiddleware, get_connection
from .transaction import (
    RequestTransaction,
    current_transaction,
    default_commit_veto,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "CONNECTION_KEY",
    "TRANSACTION_KEY",
    "ConfigurationError",
    "ConnectBackoff",
    "DriverNotFound",
    "MiddlewareNotInstalled",
    "PgConnError",
    "PgConnMiddleware",
    "PoolTimeout",
    "RequestTransaction",
    "Settings",
    "TransactionManaged",
    "current_transaction",
    "default_commit_veto",
    "get_connection",
]
