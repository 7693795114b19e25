"""Opening connections, and the connection class the middleware hands to requests.

Everything that belongs to a connection rather than to a request is decided
here, once, when it is opened: libpq parameters (application_name, TCP
keepalives, connect_timeout, server settings passed as startup ``options``),
the isolation level, and the user's ``configure(conn)`` hook.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn

import psycopg2
import psycopg2.extensions as ext

from .config import Settings
from .errors import TransactionManaged

__all__ = ["ManagedConnection", "connect_params", "open_connection", "ping"]

_base = ext.connection

#: libpq parameters added when neither the DSN nor libpq's environment sets them.
#: Keepalives make a vanished server noticeable on an idle connection within
#: about a minute; tcp_user_timeout bounds how long sent data may stay unacknowledged.
KEEPALIVE_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}

_ISOLATION = {
    "read committed": ext.ISOLATION_LEVEL_READ_COMMITTED,
    "repeatable read": ext.ISOLATION_LEVEL_REPEATABLE_READ,
    "serializable": ext.ISOLATION_LEVEL_SERIALIZABLE,
}


class ManagedConnection(ext.connection):
    """A psycopg2 connection whose transaction belongs to the middleware during a request.

    Between requests (and in ``configure`` hooks) it is an ordinary
    connection. While a request holds it, ending or reconfiguring the
    transaction raises :class:`~wsgi_pgconn.errors.TransactionManaged`: the
    middleware commits or rolls back when the response is complete.
    """

    _wsgi_pgconn_managed = False

    def _refuse(self, what: str) -> NoReturn:
        raise TransactionManaged(
            f"{what} is not allowed on a connection managed by wsgi_pgconn: the request's "
            "transaction is committed when the response succeeds and rolled back when it "
            "fails. Use a savepoint to undo part of the work, or a connection of your own."
        )

    def commit(self) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("commit()")
        _base.commit(self)

    def rollback(self) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("rollback()")
        _base.rollback(self)

    def close(self) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("close()")
        _base.close(self)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("set_session()")
        _base.set_session(self, *args, **kwargs)

    def tpc_begin(self, xid: Any) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("tpc_begin()")
        _base.tpc_begin(self, xid)

    @property
    def autocommit(self) -> bool:
        return bool(_base.autocommit.__get__(self))  # type: ignore[attr-defined]

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse("setting autocommit")
        _base.autocommit.__set__(self, value)  # type: ignore[attr-defined]


def connect_params(settings: Settings, environ: os._Environ[str] | dict[str, str]) -> str:
    """The connection string to open: the DSN plus wsgi_pgconn's defaults.

    ``environ`` is the process environment that libpq itself reads (PGAPPNAME,
    PGCONNECT_TIMEOUT, PGOPTIONS): a default never overrides what the user
    set there or in the DSN.
    """
    given = ext.parse_dsn(settings.dsn) if settings.dsn else {}
    extra: dict[str, str] = {}
    if "application_name" not in given and "PGAPPNAME" not in environ:
        extra["application_name"] = f"wsgi_pgconn[{os.getpid()}]"
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in environ:
        extra["connect_timeout"] = str(settings.connect_timeout)
    for key, value in KEEPALIVE_DEFAULTS.items():
        if key not in given:
            extra[key] = value
    server = []
    if settings.statement_timeout is not None:
        server.append(f"-c statement_timeout={settings.statement_timeout}")
    if settings.idle_in_transaction_timeout is not None:
        server.append(
            f"-c idle_in_transaction_session_timeout={settings.idle_in_transaction_timeout}"
        )
    if server:
        existing = given.get("options", environ.get("PGOPTIONS", ""))
        extra["options"] = " ".join([existing, *server]).strip()
    return ext.make_dsn(settings.dsn, **extra)


def open_connection(
    dsn: str,
    settings: Settings,
    configure: Callable[[ManagedConnection], object] | None,
) -> ManagedConnection:
    """Open and set up one connection; it is returned idle (no transaction open)."""
    conn = psycopg2.connect(dsn, connection_factory=ManagedConnection)
    try:
        setup(conn, settings, configure)
    except BaseException:
        conn.close()
        raise
    return conn


def setup(
    conn: ManagedConnection,
    settings: Settings,
    configure: Callable[[ManagedConnection], object] | None,
) -> None:
    """Per-connection setup, run when it opens and again after ``DISCARD ALL``."""
    if settings.isolation_level is not None:
        # psycopg2 sends it with each BEGIN: no round trip here.
        conn.set_session(isolation_level=_ISOLATION[settings.isolation_level])
    if configure is not None:
        configure(conn)
        # Session settings made by the hook must persist: end its transaction.
        if conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE:
            conn.commit()


def ping(conn: ManagedConnection) -> None:
    """One round trip outside any transaction; raises psycopg2.Error if the server is gone."""
    _base.autocommit.__set__(conn, True)  # type: ignore[attr-defined]
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    finally:
        if not conn.closed:
            _base.autocommit.__set__(conn, False)  # type: ignore[attr-defined]
