"""The exceptions wsgi_pgconn raises.

Errors about the database itself subclass psycopg2's own classes, so code that
already catches ``psycopg2.OperationalError`` (or Django's wrapper of it) keeps
working: a pool timeout is an ``OperationalError`` like a failed connect.
"""

from __future__ import annotations

import psycopg2

__all__ = [
    "ConfigurationError",
    "MiddlewareNotInstalled",
    "PgConnError",
    "PoolTimeout",
    "TransactionManaged",
    "first_line",
]


class PgConnError(Exception):
    """Base class of the errors that are about wsgi_pgconn rather than the database."""


class ConfigurationError(PgConnError, ValueError):
    """A setting has a value that cannot be used.

    The message names the setting (the environment variable or the keyword
    argument), the value (never a connection string, which may hold a
    password) and what is accepted.
    """


class MiddlewareNotInstalled(PgConnError, LookupError):
    """The request's environ holds no connection: PgConnMiddleware is not wrapping the app."""


class PoolTimeout(psycopg2.OperationalError):
    """No pooled connection became free within ``pool_timeout`` seconds."""


class TransactionManaged(psycopg2.ProgrammingError):
    """The application tried to end or reconfigure a transaction that the middleware owns.

    While a request holds a connection, the middleware decides commit or
    rollback when the response is complete. ``commit()``, ``rollback()``,
    ``close()``, ``autocommit``, ``set_session()`` and two-phase commit are
    refused; use savepoints (``SAVEPOINT``/``ROLLBACK TO SAVEPOINT``) to undo
    part of a request's work.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line log record."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
