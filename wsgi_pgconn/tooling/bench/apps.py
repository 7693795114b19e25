"""WSGI applications served by the benchmark, one per kind of connection handling.

A server imports ``wsgi_pgconn.tooling.bench.apps`` (or
``wsgi_pgconn.tooling.bench.django_app``) and serves ``application``; which
one is built is chosen by environment variables that the runner sets for the
server process:

``WSGI_PGCONN_BENCH_APP``        connect | handheld | pgconn | threadedpool | sqlalchemy
``WSGI_PGCONN_BENCH_DSN``        libpq connection string or URL
``WSGI_PGCONN_BENCH_SCOPE``      wsgi_pgconn scope (pgconn only)
``WSGI_PGCONN_BENCH_POOL_SIZE``  per-process pool size (pool-like variants)

Every variant does the same work per request: the three queries of
:func:`run_page` inside one transaction, then commit.
"""

from __future__ import annotations

import importlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

PAGE_TABLE = "wsgi_pgconn_bench_item"
PAGE_ROWS = 100

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


def run_page(fetchone: FetchOne) -> bytes:
    """The three small queries of the page; returns the response body.

    ``fetchone(sql, params)`` runs one statement and returns its first row.
    """
    row = fetchone("SELECT id, name FROM " + PAGE_TABLE + " WHERE id = %s", (_next_id(),))
    (count,) = fetchone("SELECT count(*) FROM " + PAGE_TABLE)
    (backend,) = fetchone("SELECT pg_backend_pid()")
    return (
        "<!doctype html><title>bench</title>"
        f"<p>item {row[0]}: {row[1]}</p><p>{count} items</p><p>backend {backend}</p>\n"
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


def make_connect_app(dsn: str) -> WSGIApplication:
    """Connect per request (the baseline): connect, three queries, commit, close."""

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            conn = psycopg2.connect(dsn)
        except Exception as exc:
            return _error(start_response, exc)
        try:
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur))
            conn.commit()
        except Exception as exc:
            return _error(start_response, exc)
        finally:
            conn.close()
        return respond(start_response, body)

    return application


def make_handheld_app(dsn: str) -> WSGIApplication:
    """One persistent connection per thread, managed by hand (the upper bound)."""
    local = threading.local()

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        conn: psycopg2.extensions.connection | None = getattr(local, "conn", None)
        try:
            if conn is None or conn.closed:
                conn = local.conn = psycopg2.connect(dsn)
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur))
            conn.commit()
        except Exception as exc:
            if conn is not None and not conn.closed:
                try:
                    conn.rollback()
                except psycopg2.Error:
                    conn.close()
            return _error(start_response, exc)
        return respond(start_response, body)

    return application


def make_pgconn_app(dsn: str, scope: str) -> WSGIApplication:
    """The page behind :class:`wsgi_pgconn.PgConnMiddleware`."""
    from wsgi_pgconn import PgConnMiddleware, get_connection

    def page(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        with get_connection(environ).cursor() as cur:
            body = run_page(cursor_fetchone(cur))
        return respond(start_response, body)

    if scope == "pool":
        return PgConnMiddleware(page, dsn=dsn, scope=scope, pool_size=_pool_size())
    return PgConnMiddleware(page, dsn=dsn, scope=scope)


def make_threadedpool_app(dsn: str) -> WSGIApplication:
    """psycopg2.pool.ThreadedConnectionPool, getconn/putconn around each request.

    minconn = maxconn: psycopg2's pool closes a returned connection whenever
    it already holds ``minconn`` idle ones, so a smaller minconn would make it
    reconnect on most requests.  (It opens them all at import.)
    """
    from psycopg2.pool import ThreadedConnectionPool

    size = _pool_size()
    pool = ThreadedConnectionPool(size, size, dsn)

    def application(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        conn = pool.getconn()
        broken = False
        try:
            with conn.cursor() as cur:
                body = run_page(cursor_fetchone(cur))
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


def make_sqlalchemy_app(dsn: str) -> WSGIApplication:
    """SQLAlchemy's QueuePool with pool_pre_ping=True, raw SQL through the Connection."""
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

                body = run_page(fetchone)
                conn.commit()
        except Exception as exc:
            return _error(start_response, exc)
        return respond(start_response, body)

    return application


def make_application(
    kind: str | None = None, dsn: str | None = None, scope: str | None = None
) -> WSGIApplication:
    kind = kind or os.environ["WSGI_PGCONN_BENCH_APP"]
    dsn = dsn or os.environ["WSGI_PGCONN_BENCH_DSN"]
    if kind == "connect":
        return make_connect_app(dsn)
    if kind == "handheld":
        return make_handheld_app(dsn)
    if kind == "pgconn":
        return make_pgconn_app(dsn, scope or os.environ.get("WSGI_PGCONN_BENCH_SCOPE") or "thread")
    if kind == "threadedpool":
        return make_threadedpool_app(dsn)
    if kind == "sqlalchemy":
        return make_sqlalchemy_app(dsn)
    raise ValueError(f"unknown benchmark application {kind!r}")


if os.environ.get("WSGI_PGCONN_BENCH_APP"):
    application = make_application()
