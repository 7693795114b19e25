"""Per-connection setup of the middleware's connections, and the environ keys of the adapter.

Django prepares each connection it opens: its cursor class and type adapters
(jsonb as text; on psycopg 3 its time zone and inet loaders), the session
time zone, ``SET ROLE`` for ``OPTIONS["assume_role"]``, and the
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

from django.conf import settings as django_settings
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.postgresql.psycopg_any import is_psycopg3
from django.db.backends.signals import connection_created

from ..drivers import IDLE

if TYPE_CHECKING:
    from ..drivers import Driver
    from ..transaction import RequestTransaction
    from .base import DatabaseWrapper

__all__ = [
    "ALIAS_KEY",
    "DRIVER",
    "THREAD_KEY",
    "check_driver",
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
#: The driver Django's postgresql backend uses here (psycopg 3 when importable).
DRIVER = "psycopg" if is_psycopg3 else "psycopg2"

#: Attribute of a middleware connection telling whether Django's setup is in
#: place: read at every request, so cheaper than a lookup.
_FLAG = "_wsgi_pgconn_django_prepared"
#: The same for connections that take no attributes.
_prepared: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def check_driver(driver: Driver) -> None:
    """Raise ImproperlyConfigured unless ``driver`` is the one Django's backend uses."""
    if driver.name != DRIVER:
        raise ImproperlyConfigured(
            f"wsgi_pgconn's middleware uses {driver.name}, but Django's postgresql backend "
            f"uses {DRIVER} in this environment (Django prefers psycopg 3 whenever it is "
            f"installed): set WSGI_PGCONN_DRIVER={DRIVER} (or leave it at 'auto'), so "
            "that the ORM and the middleware share one connection"
        )


def _mark(conn: Any, prepared: bool) -> None:
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


def _check_database(wrapper: DatabaseWrapper, conn: Any) -> None:
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


def _run_session_setup(
    driver: Driver, conn: Any, statements: list[tuple[str, list[str]]]
) -> None:
    """Session settings, as Django sends them: in autocommit when no transaction is open.

    One round trip per statement, no BEGIN and COMMIT around them. Inside a
    transaction they run in it (without the request's ``on_begin`` hook).
    """
    if driver.transaction_status(conn) == IDLE:
        driver.execute_outside_transaction(conn, statements)
    else:
        driver.execute_in_transaction(conn, statements)


def prepare_connection(wrapper: DatabaseWrapper, driver: Driver, conn: Any) -> None:
    """Django's per-connection setup on ``conn``.

    Django's cursor class and, on psycopg 3, its adapters (time zone, jsonb
    and inet as text); on psycopg2, jsonb as text. The session settings (time
    zone, ``SET ROLE``) run in autocommit if no transaction is open; a
    ``connection_created`` receiver that runs SQL leaves its transaction open.
    """
    check_driver(driver)
    _check_database(wrapper, conn)
    params = wrapper.get_connection_params()
    if is_psycopg3:
        from django.db.backends.postgresql.psycopg_any import get_adapters_template

        driver.use_adapters(
            conn, get_adapters_template(django_settings.USE_TZ, wrapper.timezone)
        )
    else:
        driver.jsonb_as_text(conn)
    factory = params.get("cursor_factory")
    if factory is not None:
        conn.cursor_factory = factory
    timezone_name = wrapper.timezone_name
    role = wrapper.settings_dict["OPTIONS"].get("assume_role")
    statements: list[tuple[str, list[str]]] = []
    if timezone_name and conn.info.parameter_status("TimeZone") != timezone_name:
        statements.append((wrapper.ops.set_time_zone_sql(), [timezone_name]))
    if role:
        statements.append(("SET ROLE %s", [role]))
    if statements:
        _run_session_setup(driver, conn, statements)
    connection_created.send(sender=type(wrapper), connection=wrapper.detached_for(conn))
    _mark(conn, True)
    logger.debug("prepared backend pid %s for alias %r", conn.info.backend_pid, wrapper.alias)


def is_prepared(wrapper: DatabaseWrapper, conn: Any) -> bool:
    """Whether ``conn`` has had its setup (and still has the time zone it set)."""
    prepared = getattr(conn, _FLAG, None)
    if not (prepared or (prepared is None and conn in _prepared)):
        return False
    timezone_name = wrapper.timezone_name
    return not timezone_name or conn.info.parameter_status("TimeZone") == timezone_name


def forget(conn: Any) -> None:
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
    driver = txn._mw.driver
    idle = driver.transaction_status(conn) == IDLE
    prepare_connection(wrapper, driver, conn)
    if idle:
        if driver.transaction_status(conn) != IDLE:
            # What connection_created receivers ran; nothing of the request yet.
            driver.commit(conn)
            conn._wsgi_pgconn_began = 0
            # Their first statement used up the request's on_begin: arm it again
            # for the request's own transaction.
            txn.arm_on_begin()
    else:
        txn.on_rollback(functools.partial(forget, conn))
