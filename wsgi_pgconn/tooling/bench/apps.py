"""WSGI applications served by the benchmark, one per kind of connection handling.

A server imports ``wsgi_pgconn.tooling.bench.apps`` (or
``wsgi_pgconn.tooling.bench.django_app``, ``wsgi_pgconn.tooling.bench.fsa_app``)
and serves ``application``; which one is built is chosen by environment
variables that the runner sets for the server process:

``WSGI_PGCONN_BENCH_APP``        connect | handheld | pgconn | threadedpool | psycopgpool
                                 | sqlalchemy
``WSGI_PGCONN_BENCH_DSN``        libpq connection string or URL
``WSGI_PGCONN_BENCH_SCOPE``      wsgi_pgconn scope (pgconn only)
``WSGI_PGCONN_BENCH_POOL_SIZE``  per-process pool size (pool-like variants)
``WSGI_PGCONN_BENCH_GREEN``      ``1``: under gevent (pgconn only: psycopg2's wait callback)
``WSGI_PGCONN_DRIVER``           the row's driver: psycopg2 or psycopg (the other one
                                 is kept out of the process, see :mod:`.rowdriver`);
                                 ``threadedpool`` and ``sqlalchemy`` are psycopg2's,
                                 ``psycopgpool`` psycopg 3's

Every variant does the same work per request: the three queries of
:func:`run_page` inside one transaction, then commit. Nothing here imports a
driver at module level: the runner imports this module for its constants.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PAGE_TABLE = "wsgi_pgconn_bench_item"
PAGE_ROWS = 100

#: The page names the driver that served it ("backend 1234, psycopg2"): the runner checks it.
DRIVER_IN_PAGE = re.compile(rb"backend \d+, (\w+)")

FetchOne = Callable[..., Sequence[Any]]

_counter = itertools.count()
_counter_lock = threading.Lock()


def _next_id() -> int:
    with _counter_lock:
        return next(_counter) % PAGE_ROWS + 1


def cursor_fetchone(cursor: Any) -> FetchOne:
    """Adapt a DB-API cursor to the ``fetchone(sql, params)`` that :func:`run_page` takes."""

    def fetchone(sql: str, params: Sequence[Any] | None = None) -> Sequence[Any]:
        cursor.execute(sql, params)
        row: Sequence[Any] = cursor.fetchone()
        return row

    return fetchone


def run_page(fetchone: FetchOne, driver: str) -> bytes:
    """The three small queries of the page; returns the response body.

    ``fetchone(sql, params)`` runs one statement and returns its first row;
    ``driver`` (the module that served the page) is named in the body, where
    the runner checks it.
    """
    row = fetchone("SELECT id, name FROM " + PAGE_TABLE + " WHERE id = %s", (_next_id(),))
    (count,) = fetchone("SELECT count(*) FROM " + PAGE_TABLE)
    (backend,) = fetchone("SELECT pg_backend_pid()")
    return page_body(row[0], row[1], count, backend, driver)


def page_body(item: object, name: object, count: object, backend: object, driver: str) -> bytes:
    return (
        "<!doctype html><title>bench</title>"
        f"<p>item {item}: {name}</p><p>{count} items</p><p>backend {backend}, {driver}</p>\n"
    ).encode("ascii")


def respond(start_response: StartResponse, body: bytes, status: str = "200 OK") -> Iterable[bytes]:
    start_response(
        status,
        [("Content-Type", "text/html; charset=us-ascii"), ("Content-Length", str(len(body)))],
    )
    return [body]


def _error(start_response: StartResponse, exc: BaseException) -> Iterable[bytes]:
    return respond(start_response, f"{type(exc).__name__}\n".encode(), "500 Internal Server Error")


def _pool_size() -> int:
    return int(os.environ.get("WSGI_PGCONN_BENCH_POOL_SIZE") or 4)


def make_connect_app(dsn: str, driver: str) -> WSGIApplication:
    """Connect per request (the baseline): connect, three queries, commit, close."""
    from wsgi_pgconn.tooling.bench.rowdriver import connect_function

    connect = connect_function(driver)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            conn = connect(dsn)
        except Exception as exc:
            return _error(start_response, exc)
        try:
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur), driver)
            conn.commit()
        except Exception as exc:
            return _error(start_response, exc)
        finally:
            conn.close()
        return respond(start_response, body)

    return application


def make_handheld_app(dsn: str, driver: str) -> WSGIApplication:
    """One persistent connection per thread, managed by hand (the upper bound).

    The driver's default mode: BEGIN before the first query (a round trip of
    its own), the three queries, COMMIT: five round trips.
    """
    from wsgi_pgconn.tooling.bench.rowdriver import connect_function, error_class

    connect = connect_function(driver)
    error = error_class(driver)
    local = threading.local()

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        conn: Any = getattr(local, "conn", None)
        try:
            if conn is None or conn.closed:
                conn = local.conn = connect(dsn)
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur), driver)
            conn.commit()
        except Exception as exc:
            if conn is not None and not conn.closed:
                try:
                    conn.rollback()
                except error:
                    conn.close()
            return _error(start_response, exc)
        return respond(start_response, body)

    return application


def make_pgconn_app(dsn: str, scope: str, driver: str) -> WSGIApplication:
    """The page behind :class:`wsgi_pgconn.PgConnMiddleware`.

    With ``WSGI_PGCONN_BENCH_GREEN=1`` (gunicorn's gevent worker) psycopg2
    waits through gevent (:func:`wsgi_pgconn.green.patch_psycopg2`), as the
    docs tell a gevent deployment to do; psycopg 3 needs nothing.
    """
    from wsgi_pgconn import PgConnMiddleware, get_connection

    if os.environ.get("WSGI_PGCONN_BENCH_GREEN") == "1" and driver == "psycopg2":
        from wsgi_pgconn import green

        green.patch_psycopg2()

    def page(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with get_connection(environ).cursor() as cur:
            body = run_page(cursor_fetchone(cur), driver)
        return respond(start_response, body)

    if scope == "pool":
        return PgConnMiddleware(page, dsn=dsn, scope=scope, driver=driver, pool_size=_pool_size())
    return PgConnMiddleware(page, dsn=dsn, scope=scope, driver=driver)


def make_threadedpool_app(dsn: str) -> WSGIApplication:
    """psycopg2.pool.ThreadedConnectionPool, getconn/putconn around each request.

    minconn = maxconn: psycopg2's pool closes a returned connection whenever
    it already holds ``minconn`` idle ones, so a smaller minconn would make it
    reconnect on most requests.  (It opens them all at import.)
    """
    import psycopg2
    from psycopg2.pool import ThreadedConnectionPool

    size = _pool_size()
    pool = ThreadedConnectionPool(size, size, dsn)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        conn = pool.getconn()
        broken = False
        try:
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur), "psycopg2")
            conn.commit()
        except Exception as exc:
            try:
                conn.rollback()
            except psycopg2.Error:
                broken = True
            return _error(start_response, exc)
        finally:
            pool.putconn(conn, close=broken or bool(conn.closed))
        return respond(start_response, body)

    return application


def make_psycopgpool_app(dsn: str) -> WSGIApplication:
    """psycopg_pool.ConnectionPool (psycopg 3), ``with pool.connection()`` around each request.

    min_size = max_size (the pool's own default when only min_size is given):
    the connections stay open. ``pool.connection()`` commits at the end of
    its block (BEGIN, the three queries, COMMIT) and rolls back on an error;
    the pool does not check a connection on checkout (its default).
    """
    from psycopg_pool import ConnectionPool

    size = _pool_size()
    pool: ConnectionPool[Any] = ConnectionPool(dsn, min_size=size, max_size=size, open=True)
    pool.wait()

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            with pool.connection() as conn, conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur), "psycopg")
        except Exception as exc:
            return _error(start_response, exc)
        return respond(start_response, body)

    return application


def make_sqlalchemy_app(dsn: str) -> WSGIApplication:
    """SQLAlchemy's QueuePool with pool_pre_ping=True, raw SQL through the Connection."""
    import psycopg2

    sqlalchemy: Any = importlib.import_module("sqlalchemy")
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: psycopg2.connect(dsn),
        pool_size=_pool_size(),
        max_overflow=0,
        pool_pre_ping=True,
    )

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            with engine.connect() as conn:

                def fetchone(sql: str, params: Sequence[Any] | None = None) -> Sequence[Any]:
                    row: Sequence[Any] = conn.exec_driver_sql(sql, params).one()
                    return row

                body = run_page(fetchone, "psycopg2")
                conn.commit()
        except Exception as exc:
            return _error(start_response, exc)
        return respond(start_response, body)

    return application


#: The applications that exist for one driver only.
ONE_DRIVER = {"threadedpool": "psycopg2", "sqlalchemy": "psycopg2", "psycopgpool": "psycopg"}


def make_application(
    kind: str | None = None,
    dsn: str | None = None,
    scope: str | None = None,
    driver: str | None = None,
) -> WSGIApplication:
    """The application of ``kind`` (default: the environment's) on ``driver``.

    ``driver`` defaults to ``WSGI_PGCONN_DRIVER``; the other driver is kept
    out of the process first (:func:`.rowdriver.isolate`).
    """
    from wsgi_pgconn.tooling.bench.rowdriver import isolate

    kind = kind or os.environ["WSGI_PGCONN_BENCH_APP"]
    dsn = dsn or os.environ["WSGI_PGCONN_BENCH_DSN"]
    driver = isolate(driver or ONE_DRIVER.get(kind))
    if ONE_DRIVER.get(kind, driver) != driver:
        raise ValueError(f"the {kind} application runs on {ONE_DRIVER[kind]} only, not {driver}")
    if kind == "connect":
        return make_connect_app(dsn, driver)
    if kind == "handheld":
        return make_handheld_app(dsn, driver)
    if kind == "pgconn":
        scope = scope or os.environ.get("WSGI_PGCONN_BENCH_SCOPE") or "thread"
        return make_pgconn_app(dsn, scope, driver)
    if kind == "threadedpool":
        return make_threadedpool_app(dsn)
    if kind == "psycopgpool":
        return make_psycopgpool_app(dsn)
    if kind == "sqlalchemy":
        return make_sqlalchemy_app(dsn)
    raise ValueError(f"unknown benchmark application {kind!r}")


if os.environ.get("WSGI_PGCONN_BENCH_APP"):
    application = make_application()
