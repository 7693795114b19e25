"""Opening connections, and the connection class the middleware hands to requests.

Everything that belongs to a connection rather than to a request is decided
here, once, when it is opened: libpq parameters (application_name, TCP
keepalives, connect_timeout, server settings passed as startup ``options``),
the isolation level, and the user's ``configure(conn)`` hook.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

import psycopg2
import psycopg2.extensions as ext

from .config import Settings
from .errors import TransactionManaged

__all__ = [
    "ManagedConnection",
    "TrackingCursor",
    "connect_params",
    "execute_autocommit",
    "open_connection",
    "ping",
    "transaction_prelude",
]

_base = ext.connection
_IDLE = ext.TRANSACTION_STATUS_IDLE

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


def _record(conn: Any, exc: psycopg2.Error) -> None:
    conn._wsgi_pgconn_error = exc.pgcode or type(exc).__name__


class TrackingCursor(ext.cursor):
    """The default cursor class: remembers the SQLSTATE of the last failed statement.

    The application (or its framework) may catch a database error and answer
    500 itself; the middleware still learns that it was, say, a serialization
    failure (retry) or a write on a read-only server (fail over).
    """

    def execute(self, query: Any, vars: Any = None) -> None:
        try:
            ext.cursor.execute(self, query, vars)
        except psycopg2.Error as exc:
            _record(self.connection, exc)
            raise
        conn = self.connection
        if conn.get_transaction_status() == _IDLE:  # only after a COMMIT sent as SQL
            resync(conn)

    def executemany(self, query: Any, vars_list: Any) -> None:
        try:
            ext.cursor.executemany(self, query, vars_list)
        except psycopg2.Error as exc:
            _record(self.connection, exc)
            raise
        conn = self.connection
        if conn.get_transaction_status() == _IDLE:
            resync(conn)


def _guarded_method(name: str) -> Any:
    base = getattr(_base, name)

    def method(self: ManagedConnection, *args: Any, **kwargs: Any) -> Any:
        if self._wsgi_pgconn_managed:
            self._refuse(f"{name}()")
        return base(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


def _guarded_attribute(name: str) -> Any:
    base = getattr(_base, name)

    def set_value(self: ManagedConnection, value: Any) -> None:
        if self._wsgi_pgconn_managed:
            self._refuse(f"setting {name}")
        base.__set__(self, value)

    return property(base.__get__, set_value, doc=base.__doc__)


class ManagedConnection(ext.connection):
    """A psycopg2 connection whose transaction belongs to the middleware during a request.

    Between requests (and in ``configure`` hooks) it is an ordinary
    connection. While a request holds it, ending or reconfiguring the
    transaction raises :class:`~wsgi_pgconn.errors.TransactionManaged`: the
    middleware commits or rolls back when the response is complete.
    """

    _wsgi_pgconn_managed = False
    #: SQLSTATE (or error class name) of the last statement that failed in this request.
    _wsgi_pgconn_error: str | None = None
    #: SQL run before the first statement of each transaction (behind a transaction pooler).
    _wsgi_pgconn_prelude: str | None = None
    #: The request's on_begin hook, run when its transaction's first cursor is created.
    _wsgi_pgconn_on_begin: Callable[[], object] | None = None

    def _refuse(self, what: str) -> NoReturn:
        raise TransactionManaged(
            f"{what} is not allowed on a connection managed by wsgi_pgconn: the request's "
            "transaction is committed when the response succeeds and rolled back when it "
            "fails. Use a savepoint to undo part of the work, or a connection of your own."
        )

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        if self.get_transaction_status() == _IDLE and not self.closed:
            # The first cursor of a transaction: what must run at its start.
            prelude = self._wsgi_pgconn_prelude
            if prelude is not None:
                with _base.cursor(self, cursor_factory=ext.cursor) as cur:
                    cur.execute(prelude)
            on_begin = self._wsgi_pgconn_on_begin
            if on_begin is not None:
                self._wsgi_pgconn_on_begin = None  # its own cursors must not re-enter
                on_begin()
        return _base.cursor(self, *args, **kwargs)

    # Ending or reconfiguring the transaction: refused while a request holds it.
    commit = _guarded_method("commit")
    rollback = _guarded_method("rollback")
    close = _guarded_method("close")
    reset = _guarded_method("reset")
    set_session = _guarded_method("set_session")
    set_isolation_level = _guarded_method("set_isolation_level")
    set_client_encoding = _guarded_method("set_client_encoding")
    tpc_begin = _guarded_method("tpc_begin")
    autocommit = _guarded_attribute("autocommit")
    isolation_level = _guarded_attribute("isolation_level")
    readonly = _guarded_attribute("readonly")
    deferrable = _guarded_attribute("deferrable")


def resync(conn: Any) -> bool:
    """Realign psycopg2 with the server after a COMMIT or ROLLBACK sent as SQL.

    psycopg2 tracks the transaction itself (``conn.status``) and sends BEGIN
    only when it believes none is open. A statement that ended the transaction
    on the server leaves it believing one is, so the following statements would
    run in autocommit, beyond any rollback. Costs nothing when they agree; else
    one ROLLBACK (a no-op on the server). Returns True if it had to resync.
    """
    if conn.status == ext.STATUS_READY or conn.closed or _base.autocommit.__get__(conn):  # type: ignore[attr-defined]
        return False
    if conn.get_transaction_status() != _IDLE:
        return False
    _base.rollback(conn)
    return True


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
    server = [f"-c {name}={value}" for name, value in _server_settings(settings)]
    if server and settings.pooler != "transaction":
        existing = given.get("options", environ.get("PGOPTIONS", ""))
        extra["options"] = " ".join([existing, *server]).strip()
    return ext.make_dsn(settings.dsn, **extra)


def _server_settings(settings: Settings) -> list[tuple[str, str]]:
    pairs = [
        ("statement_timeout", settings.statement_timeout),
        ("idle_in_transaction_session_timeout", settings.idle_in_transaction_timeout),
    ]
    return [(name, value) for name, value in pairs if value is not None]


def transaction_prelude(settings: Settings) -> str | None:
    """Behind a transaction pooler, the server settings as one transaction-local statement.

    PgBouncer in transaction mode refuses them as startup ``options``; this
    costs one round trip per transaction that runs a query.
    """
    pairs = _server_settings(settings)
    if settings.pooler != "transaction" or not pairs:
        return None
    calls = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in pairs)
    return f"SELECT {calls}"


def open_connection(
    dsn: str,
    settings: Settings,
    configure: Callable[[ManagedConnection], object] | None,
) -> ManagedConnection:
    """Open and set up one connection; it is returned idle (no transaction open)."""
    conn = psycopg2.connect(dsn, connection_factory=ManagedConnection)
    conn.cursor_factory = TrackingCursor
    conn._wsgi_pgconn_prelude = transaction_prelude(settings)
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


def execute_autocommit(conn: ext.connection, statements: Iterable[tuple[str, Any]]) -> None:
    """Run ``(sql, params)`` statements outside any transaction, one round trip each.

    The connection must be idle. The base class's autocommit setter and
    cursor are used: they work while a request holds the connection, and
    neither the transaction prelude nor the ``on_begin`` hook runs.
    """
    _base.autocommit.__set__(conn, True)  # type: ignore[attr-defined]
    try:
        with _base.cursor(conn, cursor_factory=ext.cursor) as cur:
            for sql, params in statements:
                cur.execute(sql, params)
    finally:
        if not conn.closed:
            _base.autocommit.__set__(conn, False)  # type: ignore[attr-defined]


def ping(conn: ManagedConnection) -> None:
    """One round trip outside any transaction; raises psycopg2.Error if the server is gone."""
    execute_autocommit(conn, [("SELECT 1", None)])
