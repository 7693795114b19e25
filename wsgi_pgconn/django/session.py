"""Per-connection setup of the middleware's connections, and the environ keys of the adapter.

Django prepares each connection it opens: the session time zone, ``SET ROLE``
for ``OPTIONS["assume_role"]``, psycopg2's jsonb loader, and the
``connection_created`` signal. A connection opened by the middleware needs the
same, once per physical connection, committed on its own so that a request
that rolls back does not undo it.

With :class:`~wsgi_pgconn.django.DjangoPgConnMiddleware` this runs in the
middleware's ``configure(conn)`` hook, when the connection opens (and again
after ``DISCARD ALL``). With a plain ``PgConnMiddleware`` it runs when the ORM
first meets a connection inside a request: committed on its own if the
request has not queried yet, else inside the request's transaction and
repeated after a rollback.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import psycopg2.extensions as ext
import psycopg2.extras
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.signals import connection_created

from ..connection import execute_autocommit

if TYPE_CHECKING:
    from ..middleware import RequestTransaction
    from .base import DatabaseWrapper

__all__ = [
    "ALIAS_KEY",
    "THREAD_KEY",
    "close_middlewares",
    "ensure_prepared",
    "forget",
    "prepare_connection",
]

logger = logging.getLogger("wsgi_pgconn.django")

#: environ key naming the database alias whose ORM uses the request's connection
#: (absent: ``"default"``). Set by DjangoPgConnMiddleware.
ALIAS_KEY = "wsgi_pgconn.django.alias"
#: environ key holding the ident of the thread that serves the request; the
#: ORM of other threads (``sync_to_async(thread_sensitive=False)``, threads the
#: view starts) keeps Django's own connections, as it would without wsgi_pgconn.
THREAD_KEY = "wsgi_pgconn.django.thread"

_IDLE = ext.TRANSACTION_STATUS_IDLE

#: Attribute of a middleware connection (a ManagedConnection) telling whether
#: Django's setup is in place: read at every request, so cheaper than a lookup.
_FLAG = "_wsgi_pgconn_django_prepared"
#: The same for connections that take no attributes (a plain psycopg2 connection).
_prepared: weakref.WeakKeyDictionary[ext.connection, bool] = weakref.WeakKeyDictionary()


def _mark(conn: ext.connection, prepared: bool) -> None:
    try:
        setattr(conn, _FLAG, prepared)
    except AttributeError:
        if prepared:
            _prepared[conn] = True
        else:
            _prepared.pop(conn, None)


class _Closable(Protocol):
    alias: str

    def close(self) -> None: ...


#: DjangoPgConnMiddleware instances, so that Django's test runner can close
#: their connections before it drops the test database.
_live: weakref.WeakSet[_Closable] = weakref.WeakSet()


def track(middleware: _Closable) -> None:
    """Remember ``middleware`` for :func:`close_middlewares`."""
    _live.add(middleware)


def close_middlewares(alias: str) -> None:
    """Close the connections of every DjangoPgConnMiddleware bound to ``alias``."""
    for middleware in list(_live):
        if middleware.alias == alias:
            middleware.close()


def _keep_text(value: str) -> str:
    # Django's JSONField decodes jsonb itself (with its decoder); psycopg2 must not.
    return value


def _check_database(wrapper: DatabaseWrapper, conn: ext.connection) -> None:
    name = wrapper.settings_dict.get("NAME")
    expected = "postgres" if name is None else name
    if expected and conn.info.dbname != expected:
        raise ImproperlyConfigured(
            f"the wsgi_pgconn middleware is connected to database {conn.info.dbname!r}, but "
            f"DATABASES[{wrapper.alias!r}] names {expected!r} (during tests: the test "
            "database). Build the middleware with wsgi_pgconn.django.get_wsgi_application() "
            "(or DjangoPgConnMiddleware), which connects to the database of the settings, or "
            "make DATABASE_URL name the same database"
        )


def _run_session_setup(conn: ext.connection, statements: list[tuple[str, list[str]]]) -> None:
    """Session settings, as Django sends them: in autocommit when no transaction is open.

    One round trip per statement, no BEGIN and COMMIT around them. The
    middleware's connections refuse ``autocommit`` while a request holds
    them; the base class's setter is used (as the core's own ping does) and
    restored at once. Inside a transaction they run in it.
    """
    base: Any = ext.connection
    if conn.get_transaction_status() == _IDLE and not base.autocommit.__get__(conn):
        execute_autocommit(conn, statements)
        return
    # The base class's cursor: not the first cursor of the request's
    # transaction (which would run its on_begin hook for this setup).
    with base.cursor(conn, cursor_factory=ext.cursor) as cur:
        for sql, params in statements:
            cur.execute(sql, params)


def prepare_connection(wrapper: DatabaseWrapper, conn: ext.connection) -> None:
    """Django's per-connection setup on ``conn``.

    The session settings run in autocommit if no transaction is open; a
    ``connection_created`` receiver that runs SQL leaves its transaction open.
    """
    _check_database(wrapper, conn)
    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=_keep_text)
    timezone_name = wrapper.timezone_name
    role = wrapper.settings_dict["OPTIONS"].get("assume_role")
    statements: list[tuple[str, list[str]]] = []
    if timezone_name and conn.get_parameter_status("TimeZone") != timezone_name:
        statements.append((wrapper.ops.set_time_zone_sql(), [timezone_name]))
    if role:
        statements.append(("SET ROLE %s", [role]))
    if statements:
        _run_session_setup(conn, statements)
    connection_created.send(sender=type(wrapper), connection=wrapper.detached_for(conn))
    _mark(conn, True)
    logger.debug("prepared backend pid %s for alias %r", conn.info.backend_pid, wrapper.alias)


def is_prepared(wrapper: DatabaseWrapper, conn: ext.connection) -> bool:
    """Whether ``conn`` has had its setup (and still has the time zone it set)."""
    prepared = getattr(conn, _FLAG, None)
    if not (prepared or (prepared is None and conn in _prepared)):
        return False
    timezone_name = wrapper.timezone_name
    return not timezone_name or conn.get_parameter_status("TimeZone") == timezone_name


def forget(conn: ext.connection) -> None:
    """``conn``'s session was reset (``DISCARD ALL``): prepare it again."""
    _mark(conn, False)


def ensure_prepared(wrapper: DatabaseWrapper, txn: RequestTransaction) -> None:
    """Prepare the request's connection if no ``configure`` hook did (plain PgConnMiddleware).

    If the request has not queried yet, the setup is committed on its own:
    nothing of the request's work is in that transaction. Otherwise it runs
    inside the request's transaction and, should that roll back, again at the
    next request.
    """
    conn = txn.connection
    if is_prepared(wrapper, conn):
        return
    idle = conn.get_transaction_status() == _IDLE
    prepare_connection(wrapper, conn)
    if idle:
        if conn.get_transaction_status() != _IDLE:
            # What connection_created receivers ran; nothing of the request yet.
            ext.connection.commit(conn)
            # Their first cursor used up the request's on_begin: arm it again for
            # the request's own transaction.
            txn.arm_on_begin()
    else:
        txn.on_rollback(functools.partial(forget, conn))
