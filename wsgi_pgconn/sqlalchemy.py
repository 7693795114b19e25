"""SQLAlchemy 2.x (Core and ORM) on the request's connection and transaction.

::

    from wsgi_pgconn import PgConnMiddleware
    from wsgi_pgconn import sqlalchemy as pgconn_sqlalchemy

    engine = pgconn_sqlalchemy.create_engine("postgresql+psycopg2://app@db/app")
    application = PgConnMiddleware(application, configure=pgconn_sqlalchemy.configure)

With Flask-SQLAlchemy: ``SQLALCHEMY_ENGINE_OPTIONS = engine_options()`` and
:class:`wsgi_pgconn.flask.PgConn` (which installs :func:`configure` itself).

The engine's pool is a :class:`PgConnPool`. Inside a request served by the
middleware (in the request's context: the thread serving it), every
connection the engine checks out is the request's connection, seen through a
:class:`RequestConnection`: SQLAlchemy's DBAPI transaction on it is a
savepoint of the request's transaction.

* The savepoint travels with the transaction's first statement (``SAVEPOINT
  x; <statement>`` in one message on psycopg2, one pipeline on psycopg 3):
  no extra round trip.
* ``commit()`` (``Session.commit()``, ``Connection.commit()``) keeps the work
  in the request's transaction and sends nothing; the middleware commits it
  with the rest of the request, or rolls it back if the request fails.
* ``rollback()`` (``Session.rollback()``, ``Session.close()`` with a
  transaction open, the pool's reset) sends ``ROLLBACK TO SAVEPOINT x``: it
  undoes what was done on the request's connection since the SQLAlchemy
  transaction began, and nothing before it. Nothing is sent if no statement
  ran.
* ``begin_nested()`` is SQLAlchemy's own savepoint, inside that one.
* Setting the isolation level, autocommit, read-only or deferrable, and
  two-phase commit, raise :class:`~wsgi_pgconn.TransactionManaged`; close()
  is a no-op (the middleware keeps the connection).

Outside requests (CLI commands, migrations, background jobs) the pool is
SQLAlchemy's :class:`~sqlalchemy.pool.QueuePool`, with its own connections,
its own transactions and every pool option (``pool_size``,
``pool_pre_ping``, ...).

SQLAlchemy's per-connection setup (the dialect's first-connect
initialization, its ``connect`` hooks such as psycopg2's UUID typecaster,
and the application's ``connect`` listeners) runs once per middleware
connection. :func:`configure`, given to the middleware as its ``configure``
hook, runs it when the connection opens, outside any transaction. Without
it, it runs when the engine first meets the connection inside a request,
and the dialect's first-connect initialization, if still to do, takes an
ordinary connection of the engine's own pool (a WARNING says so).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NoReturn, cast

import sqlalchemy
from sqlalchemy.pool import QueuePool
from sqlalchemy.pool.base import _ConnectionRecord

from . import config as _config
from . import drivers
from .drivers import IDLE, INERROR
from .errors import ConfigurationError, PgConnError
from .middleware import TRANSACTION_KEY
from .transaction import RequestTransaction, current_transaction, publish_context

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.interfaces import DBAPIConnection
    from sqlalchemy.pool import ConnectionPoolEntry

__all__ = [
    "PgConnPool",
    "RequestConnection",
    "RequestEnded",
    "configure",
    "create_engine",
    "engine_options",
    "engine_url",
]

publish_context()  # the pool finds the request through current_transaction()

logger = logging.getLogger("wsgi_pgconn.sqlalchemy")

#: The SQLAlchemy dialects (``postgresql+<driver>``) that can share the middleware's connection.
SUPPORTED_DRIVERS = ("psycopg2", "psycopg")
#: Key of ``record_info`` marking the pool entries that hold a request's connection.
_REQUEST_ENTRY = "wsgi_pgconn.request"
#: create_engine() options that cannot apply to the request's connection.
_REFUSED_OPTIONS = {
    "poolclass": "the pool class must be PgConnPool",
    "pool": "the pool must be a PgConnPool built by create_engine",
    "isolation_level": (
        "inside requests the isolation level is the middleware's "
        "(WSGI_PGCONN_ISOLATION_LEVEL); for connections outside requests use "
        "engine.execution_options(isolation_level=...)"
    ),
}
#: Statements of a cursor that must run inside the savepoint of the transaction.
_STATEMENT_METHODS = frozenset(
    {"callproc", "copy", "copy_expert", "copy_from", "copy_to", "stream"}
)

_savepoint_numbers = itertools.count(1)
# The middleware connection whose SQLAlchemy pool entry is being created on this thread.
_adopting = threading.local()


class RequestEnded(PgConnError, RuntimeError):
    """A SQLAlchemy connection checked out during a request was used after the request ended.

    Close sessions and connections at the end of each request (Flask-SQLAlchemy
    does; with a ``scoped_session``, call ``remove()``).
    """


# -- the connection SQLAlchemy sees inside a request ------------------------------------------


class RequestConnection:
    """The request's connection as SQLAlchemy's DBAPI connection: a transaction is a savepoint.

    Attributes and methods other than the ones below are the request's
    connection's (``info``, ``closed``, ``notices``, ...). ``cursor()``
    returns the connection's own cursors, except the first one of each
    SQLAlchemy transaction, a thin wrapper whose first statement carries the
    ``SAVEPOINT``.
    """

    __slots__ = (
        "__weakref__",
        "_conn",
        "_driver",
        "_outcome",
        "_pipeline",
        "_psycopg3",
        "_savepoint",
        "_txn",
    )

    def __init__(self, driver: drivers.Driver, pipeline: bool) -> None:
        self._driver = driver
        self._psycopg3 = driver.name == "psycopg"
        self._pipeline = pipeline
        self._conn: Any = None
        self._txn: weakref.ref[RequestTransaction] | None = None
        self._outcome: str | None = None
        self._savepoint: str | None = None

    def __repr__(self) -> str:
        state = "detached" if self._conn is None else f"on {self._conn!r}"
        return f"<wsgi_pgconn.sqlalchemy.RequestConnection {state}>"

    # -- bookkeeping of the pool ---------------------------------------------------

    def _attach(self, conn: Any, txn: RequestTransaction) -> None:
        self._conn = conn
        self._txn = weakref.ref(txn)
        self._outcome = txn.outcome
        self._savepoint = None

    def _detach(self) -> Any:
        conn, self._conn = self._conn, None
        self._txn = None
        self._savepoint = None
        return conn

    def _request(self) -> RequestTransaction | None:
        """The request this connection was checked out for, while it still holds it."""
        ref = self._txn
        if ref is None or self._conn is None:
            return None
        txn = ref()
        if txn is None:
            return None
        outcome = txn.outcome
        if txn.environ.get(TRANSACTION_KEY) is not txn:
            return None  # released
        if outcome != self._outcome:
            # The request's transaction ended (the early COMMIT before a streamed
            # body): the savepoint went with it; the next statement makes another.
            self._outcome = outcome
            self._savepoint = None
        return txn

    def _live(self) -> Any:
        if self._request() is None:
            raise RequestEnded(
                "this SQLAlchemy connection was checked out during a request that has ended "
                "(or is used outside it): close sessions and connections at the end of each "
                "request (scoped_session.remove(); Flask-SQLAlchemy does it)"
            )
        return self._conn

    def _refuse(self, what: str) -> NoReturn:
        raise self._driver.TransactionManaged(
            f"{what} is not possible on the request's connection: the request's transaction "
            "belongs to wsgi_pgconn's middleware (set WSGI_PGCONN_ISOLATION_LEVEL for the "
            "isolation level of requests); a SQLAlchemy transaction inside a request is a "
            "savepoint of it"
        )

    # -- statements ------------------------------------------------------------------

    def _name(self) -> str:
        return f"wsgi_pgconn_sa_{next(_savepoint_numbers)}"

    def _run(self, conn: Any, statement: str) -> None:
        cur = conn.cursor()
        try:
            if self._psycopg3:
                cur.execute(statement, prepare=False)
            else:
                cur.execute(statement)
        finally:
            cur.close()

    def _ensure_savepoint(self) -> None:
        """Open the transaction's savepoint now, as a statement of its own, if not open."""
        conn = self._live()
        if self._savepoint is None:
            name = self._name()
            self._run(conn, "SAVEPOINT " + name)
            self._savepoint = name

    def _execute_first(
        self, cursor: Any, query: Any, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Execute the transaction's first statement with the SAVEPOINT in front of it."""
        conn = self._live()
        if self._savepoint is not None:  # another cursor of this transaction went first
            return cursor.execute(query, params, *args, **kwargs)
        name = self._name()
        if self._psycopg3:
            if not (self._pipeline and conn._wsgi_pgconn_pipeline):
                self._run(conn, "SAVEPOINT " + name)
                self._savepoint = name
                return cursor.execute(query, params, *args, **kwargs)
            result: list[Any] = []

            def run() -> None:
                conn.execute("SAVEPOINT " + name, prepare=False)
                self._savepoint = name
                result.append(cursor.execute(query, params, *args, **kwargs))

            if conn._pipeline is not None:  # the application's own pipeline
                run()
            else:
                # One pipeline: BEGIN (when the request's transaction begins
                # here), SAVEPOINT and the statement go out together.
                self._driver.pipelined(conn, run)
            return result[0]
        prefixed = _prefixed(query, "SAVEPOINT " + name + "; ", cursor)
        if prefixed is None:
            self._run(conn, "SAVEPOINT " + name)
            self._savepoint = name
            return cursor.execute(query, params, *args, **kwargs)
        # The SAVEPOINT runs first even when the statement then fails.
        self._savepoint = name
        return cursor.execute(prefixed, params, *args, **kwargs)

    # -- the DBAPI connection --------------------------------------------------------

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        conn = self._live()
        if self._savepoint is not None:
            return conn.cursor(*args, **kwargs)
        if (args and args[0]) or kwargs.get("name"):
            # A server-side cursor declares itself: the savepoint goes first, alone.
            self._ensure_savepoint()
            return conn.cursor(*args, **kwargs)
        return _SavepointCursor(conn.cursor(*args, **kwargs), self)

    def commit(self) -> None:
        """End the SQLAlchemy transaction, keeping its work in the request's transaction."""
        conn = self._live()
        name, self._savepoint = self._savepoint, None
        if name is not None and conn.info.transaction_status == INERROR:
            # COMMIT of a failed transaction rolls it back: the same here.
            self._run(conn, "ROLLBACK TO SAVEPOINT " + name)

    def rollback(self) -> None:
        """Undo what was done on the request's connection since the SQLAlchemy transaction began."""
        if self._request() is None:
            if self._savepoint is not None and self._conn is not None:
                self._savepoint = None
                logger.warning(
                    "a SQLAlchemy transaction on the request's connection was still open when "
                    "the request ended: its work was committed or rolled back with the "
                    "request. Close sessions at the end of each request "
                    "(scoped_session.remove(); Flask-SQLAlchemy does it)"
                )
            return  # the request ended: nothing of this transaction is left
        conn = self._conn
        name, self._savepoint = self._savepoint, None
        if name is None or conn.closed or conn.info.transaction_status == IDLE:
            return  # no statement ran, or the transaction that held the savepoint ended
        self._run(conn, "ROLLBACK TO SAVEPOINT " + name)

    def close(self) -> None:
        """The middleware keeps the connection: nothing to do."""

    @property
    def closed(self) -> Any:
        conn = self._conn
        return True if conn is None else conn.closed

    @property
    def autocommit(self) -> bool:
        return False

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if value:
            self._refuse("autocommit (isolation_level='AUTOCOMMIT')")

    def set_autocommit(self, value: bool) -> None:
        if value:
            self._refuse("autocommit (isolation_level='AUTOCOMMIT')")

    def set_isolation_level(self, level: Any) -> None:
        self._refuse("changing the isolation level")

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("changing the session characteristics")

    def set_read_only(self, value: Any) -> None:
        self._refuse("changing read-only")

    def set_deferrable(self, value: Any) -> None:
        self._refuse("changing deferrable")

    def set_client_encoding(self, encoding: Any) -> None:
        self._refuse("changing the client encoding")

    def tpc_begin(self, *args: Any, **kwargs: Any) -> None:
        self._refuse("two-phase commit")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._live(), name)


class _Psycopg3RequestConnection(RequestConnection):
    """The psycopg 3 flavour: ``Connection.execute()`` too runs inside the savepoint."""

    __slots__ = ()

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        cur = self.cursor()
        cur.execute(query, params, **kwargs)
        return cur._cursor if isinstance(cur, _SavepointCursor) else cur


def _refused_attribute(name: str) -> property:
    """A connection attribute that reads through and cannot be set inside a request."""

    def get(self: RequestConnection) -> Any:
        return getattr(self._live(), name)

    def set_value(self: RequestConnection, value: Any) -> None:
        self._refuse(f"setting {name}")

    return property(get, set_value)


for _name in ("isolation_level", "readonly", "read_only", "deferrable"):
    setattr(RequestConnection, _name, _refused_attribute(_name))
del _name


def _prefixed(query: Any, prefix: str, cursor: Any) -> Any:
    """``prefix`` + ``query`` (str, bytes or psycopg2.sql), or None when that cannot be done."""
    if isinstance(query, str):
        return prefix + query if query.strip() else None
    if isinstance(query, bytes):
        return prefix.encode("ascii") + query if query.strip() else None
    as_string = getattr(query, "as_string", None)
    if as_string is not None:
        text = as_string(cursor)
        return prefix + text if isinstance(text, str) and text.strip() else None
    return None


class _SavepointCursor:
    """The first cursor of a SQLAlchemy transaction: its first statement opens the savepoint."""

    __slots__ = ("_cursor", "_owner")

    def __init__(self, cursor: Any, owner: RequestConnection) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_owner", owner)

    def execute(self, query: Any, params: Any = None, *args: Any, **kwargs: Any) -> Any:
        return self._owner._execute_first(self._cursor, query, params, args, kwargs)

    def executemany(self, query: Any, params_seq: Any, *args: Any, **kwargs: Any) -> Any:
        self._owner._ensure_savepoint()
        return self._cursor.executemany(query, params_seq, *args, **kwargs)

    # The hot paths of reading results, without __getattr__.
    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        return self._cursor.fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        return self._cursor.fetchall()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> Any:
        return self._cursor.rowcount

    def close(self) -> None:
        self._cursor.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)

    def __enter__(self) -> _SavepointCursor:
        self._cursor.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self._cursor.__exit__(*exc_info)

    def __getattr__(self, name: str) -> Any:
        if name in _STATEMENT_METHODS:
            self._owner._ensure_savepoint()
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)


# -- the pool --------------------------------------------------------------------------------


class _Lineage:
    """What a pool and the pools ``engine.dispose()`` recreates from it share."""

    def __init__(self, pool: PgConnPool) -> None:
        self.pool = weakref.ref(pool)
        self.lock = threading.Lock()
        #: Whether the dialect's first-connect initialization has run.
        self.initialized = False


#: Every live engine lineage, for :func:`configure`.
_LINEAGES: weakref.WeakSet[_Lineage] = weakref.WeakSet()


class PgConnPool(QueuePool):
    """SQLAlchemy's QueuePool outside requests; the request's connection inside one.

    Built by :func:`create_engine` / :func:`engine_options` (``poolclass``);
    every QueuePool option applies to the connections it opens outside
    requests. Only the ``postgresql+psycopg2`` and ``postgresql+psycopg``
    dialects are accepted, and the one used must match the middleware's
    driver (``WSGI_PGCONN_DRIVER``).
    """

    def __init__(self, creator: Any, **kwargs: Any) -> None:
        super().__init__(creator, **kwargs)
        dialect = self._dialect
        driver_name = getattr(dialect, "driver", None)
        if getattr(dialect, "name", None) != "postgresql" or driver_name not in SUPPORTED_DRIVERS:
            raise ConfigurationError(
                "wsgi_pgconn.sqlalchemy needs a postgresql+psycopg2:// or postgresql+psycopg:// "
                f"engine, not {getattr(dialect, 'name', '?')}+{driver_name}"
            )
        self._driver: drivers.Driver = drivers.load(driver_name)
        self._managed: type = self._driver.ManagedConnection
        pipeline = False
        if driver_name == "psycopg":
            pipeline = bool(cast(Any, dialect).loaded_dbapi.Pipeline.is_supported())
        self._pipeline = pipeline
        self._lineage = _Lineage(self)
        _LINEAGES.add(self._lineage)
        #: middleware connection -> pool entries holding it that no request uses now.
        self._idle: weakref.WeakKeyDictionary[Any, list[ConnectionPoolEntry]] = (
            weakref.WeakKeyDictionary()
        )
        # Pool entries are made by the creator: it hands over the middleware
        # connection being adopted, else opens an ordinary connection.
        ordinary = self._invoke_creator

        def invoke_creator(record: ConnectionPoolEntry) -> DBAPIConnection:
            conn: DBAPIConnection | None = getattr(_adopting, "conn", None)
            return ordinary(record) if conn is None else conn

        self._invoke_creator = cast(Any, invoke_creator)

    def recreate(self) -> PgConnPool:
        pool = super().recreate()
        assert isinstance(pool, PgConnPool)
        _LINEAGES.discard(pool._lineage)
        pool._lineage = self._lineage
        self._lineage.pool = weakref.ref(pool)
        return pool

    def _create_connection(self) -> ConnectionPoolEntry:
        record = super()._create_connection()
        self._lineage.initialized = True  # the connect events (first-connect included) ran
        return record

    # -- checkout and checkin ------------------------------------------------------

    def _do_get(self) -> ConnectionPoolEntry:
        txn = current_transaction()
        if txn is None or getattr(_adopting, "ordinary", False):
            return super()._do_get()
        conn = txn.connection
        idle = self._idle.get(conn)
        record = cast(_ConnectionRecord, idle.pop()) if idle else self._adopt(conn, txn)
        proxy = cast(RequestConnection, record.dbapi_connection)
        proxy._attach(conn, txn)
        # Nothing to ping, nothing to recycle: the middleware checked the
        # connection and decides its life.
        record.fresh = True
        record.starttime = time.time()
        return record

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        if not record.record_info or _REQUEST_ENTRY not in record.record_info:
            super()._do_return_conn(record)
            return
        proxy = record.dbapi_connection
        if not isinstance(proxy, RequestConnection):
            return  # invalidated or detached: dropped (the middleware checks the connection)
        conn = proxy._detach()
        if conn is not None and not conn.closed:
            self._idle.setdefault(conn, []).append(record)

    # -- the pool entries of middleware connections -----------------------------------

    def _adopt(self, conn: Any, txn: RequestTransaction | None) -> _ConnectionRecord:
        """A new pool entry for ``conn``: SQLAlchemy's connect events run on it now."""
        if not isinstance(conn, self._managed):
            raise ConfigurationError(
                f"this engine uses {self._driver.name} (postgresql+{self._driver.name}://), but "
                f"the middleware's connection is {type(conn).__module__}.{type(conn).__name__}: "
                f"set WSGI_PGCONN_DRIVER={self._driver.name}, or use the middleware's driver in "
                "the engine's URL"
            )
        if txn is not None and not self._lineage.initialized:
            self._initialize_elsewhere()
        _adopting.conn = conn
        try:
            record = cast(_ConnectionRecord, self._create_connection())
        except self._driver.TransactionManaged as exc:
            if txn is None:
                raise
            raise type(exc)(
                f"{exc} (raised by a 'connect' listener of the SQLAlchemy engine, run when the "
                "engine first met this connection inside a request: give "
                "configure=wsgi_pgconn.sqlalchemy.configure to the middleware, so that "
                "connect listeners run when the connection opens, outside any transaction)"
            ) from exc
        finally:
            _adopting.conn = None
        psycopg3 = self._driver.name == "psycopg"
        proxy_class = _Psycopg3RequestConnection if psycopg3 else RequestConnection
        record.dbapi_connection = cast(Any, proxy_class(self._driver, self._pipeline))
        info = record.record_info
        assert info is not None
        info[_REQUEST_ENTRY] = True
        return record

    def _initialize_elsewhere(self) -> None:
        """The dialect's first-connect initialization, on an ordinary connection of this pool.

        It ends with a rollback, which the request's connection cannot do.
        """
        with self._lineage.lock:
            if self._lineage.initialized:
                return
            logger.warning(
                "the SQLAlchemy engine met its first connection inside a request: it opened a "
                "connection of its own pool to initialize itself. Give "
                "configure=wsgi_pgconn.sqlalchemy.configure to the middleware "
                "(wsgi_pgconn.flask.PgConn does) to initialize it on the middleware's "
                "connections instead"
            )
            _adopting.ordinary = True  # QueuePool may call _do_get() again
            try:
                record = super()._do_get()
                super()._do_return_conn(record)
            finally:
                _adopting.ordinary = False

    def _prepare(self, conn: Any) -> None:
        """Run SQLAlchemy's per-connection setup on ``conn`` (outside any request)."""
        if not isinstance(conn, self._managed) or self._idle.get(conn):
            return
        record = self._adopt(conn, None)
        self._idle.setdefault(conn, []).append(record)


def configure(conn: Any) -> None:
    """The middleware's ``configure`` hook: SQLAlchemy's per-connection setup, when it opens.

    For every engine built with :func:`create_engine` or :func:`engine_options`
    (of the middleware's driver): the dialect's first-connect initialization
    (once per engine), its connect hooks (psycopg2's UUID typecaster, hstore,
    ...) and the application's ``connect`` listeners, on ``conn`` in
    autocommit, outside any transaction. ``PgConnMiddleware(app,
    configure=wsgi_pgconn.sqlalchemy.configure)``; to combine it with a hook
    of your own, call both from one function. They run once per connection
    (not again after ``reset=discard``).
    """
    for lineage in list(_LINEAGES):
        pool = lineage.pool()
        if pool is not None:
            pool._prepare(conn)


# -- building engines --------------------------------------------------------------------------


def engine_options(**options: Any) -> dict[str, Any]:
    """``create_engine()`` keyword arguments that put the engine on the request's connection.

    For Flask-SQLAlchemy: ``app.config["SQLALCHEMY_ENGINE_OPTIONS"] =
    engine_options()``. Other options (``pool_size``, ``pool_pre_ping``,
    ``echo``, ...) pass through and apply outside requests; ``poolclass``,
    ``pool`` and ``isolation_level`` are refused with a ConfigurationError.
    """
    for name, why in _REFUSED_OPTIONS.items():
        if name in options:
            raise ConfigurationError(f"create_engine option {name!r} is not allowed: {why}")
    return {**options, "poolclass": PgConnPool}


def create_engine(url: str | sqlalchemy.engine.URL | None = None, **options: Any) -> Engine:
    """``sqlalchemy.create_engine(url, **engine_options(**options))``.

    ``url`` defaults to :func:`engine_url` (the middleware's database and driver).
    """
    return sqlalchemy.create_engine(
        engine_url() if url is None else url, **engine_options(**options)
    )


def engine_url(dsn: str | None = None, *, driver: str | None = None) -> sqlalchemy.engine.URL:
    """The SQLAlchemy URL of the middleware's database, for the middleware's driver.

    ``dsn`` is a ``postgresql://`` URL or a libpq ``key=value`` string
    (default: ``DATABASE_URL``); ``driver`` defaults to ``WSGI_PGCONN_DRIVER``
    (``auto``: psycopg 3 if installed, else psycopg2). For example
    ``postgresql://app@db/app`` becomes ``postgresql+psycopg://app@db/app``.
    Parameters other than host, port, user, password and dbname go to the
    URL's query (SQLAlchemy hands them to the driver).
    """
    settings = _config.parse(os.environ, dsn=dsn, driver=driver)
    name = drivers.resolve(settings.driver)
    params = dict(drivers.load(name).parse_conninfo(settings.dsn)) if settings.dsn else {}
    host = params.pop("host", None)
    port = params.pop("port", None)
    if (host is not None and ("," in host or host.startswith(("/", "@")))) or (
        port is not None and not port.isdigit()
    ):
        # Several hosts, or a socket directory: in the query, as libpq spells them.
        params.update({k: v for k, v in (("host", host), ("port", port)) if v is not None})
        host = port = None
    return sqlalchemy.engine.URL.create(
        f"postgresql+{name}",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=host,
        port=int(port) if port is not None else None,
        database=params.pop("dbname", None),
        query=params,
    )
