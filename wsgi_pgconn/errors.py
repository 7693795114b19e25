"""The exceptions wsgi_pgconn raises.

This module imports no driver. Errors that are about the database itself
(:class:`PoolTimeout`, :class:`ConnectBackoff`, :class:`TransactionManaged`)
are raised as subclasses that the driver module makes, which also derive from
the driver's own classes: on psycopg2 a pool timeout is a
``psycopg2.OperationalError``, on psycopg 3 a ``psycopg.OperationalError``,
like a failed connect, so code (or Django's wrapper) that already catches
those keeps working. ``except wsgi_pgconn.PoolTimeout`` catches it on either
driver.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConnectBackoff",
    "DriverNotFound",
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


class DriverNotFound(ConfigurationError, ImportError):
    """The driver the settings ask for (or any driver, for ``auto``) cannot be imported."""


class MiddlewareNotInstalled(PgConnError, LookupError):
    """The request's environ holds no connection: PgConnMiddleware is not wrapping the app."""


class PoolTimeout(PgConnError):
    """No pooled connection became free within ``pool_timeout`` seconds.

    Raised as the driver's subclass, which is also its ``OperationalError``.
    """


class ConnectBackoff(PgConnError):
    """No connection was attempted: an attempt failed moments ago and the process is backing off.

    After a failed connect, a process waits a short, growing, jittered delay
    (at most half a second) before it tries again; requests that need a new
    connection meanwhile get this at once (the middleware answers 503).
    Raised as the driver's subclass, which is also its ``OperationalError``.
    """


class TransactionManaged(PgConnError):
    """The application tried to end or reconfigure a transaction that the middleware owns.

    While a request holds a connection, the middleware decides commit or
    rollback when the response is complete. ``commit()``, ``rollback()``,
    ``close()``, ``with conn:``, ``autocommit``, the session characteristics
    and two-phase commit are refused; use savepoints (``SAVEPOINT``, psycopg
    3's ``conn.transaction()``, Django's ``atomic()``) to undo part of a
    request's work. Raised as the driver's subclass, which is also its
    ``ProgrammingError``.
    """


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for a one-line log record."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
