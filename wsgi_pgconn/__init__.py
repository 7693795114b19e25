"""wsgi_pgconn: persistent PostgreSQL connections and a transaction per request for any WSGI app.

>>> from wsgi_pgconn import PgConnMiddleware
>>> application = PgConnMiddleware(application)  # doctest: +SKIP

See README.md for the settings, the scopes and the commit rules.
"""

from __future__ import annotations

from .config import Settings
from .errors import (
    ConfigurationError,
    MiddlewareNotInstalled,
    PgConnError,
    PoolTimeout,
    TransactionManaged,
)
from .middleware import (
    CONNECTION_KEY,
    TRANSACTION_KEY,
    PgConnMiddleware,
    RequestTransaction,
    current_transaction,
    default_commit_veto,
    get_connection,
)

__version__ = "0.1.0"

__all__ = [
    "CONNECTION_KEY",
    "TRANSACTION_KEY",
    "ConfigurationError",
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
