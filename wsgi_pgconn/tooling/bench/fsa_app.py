"""The benchmark page as a Flask-SQLAlchemy app, on three kinds of connections.

The ``fsa-*`` rows of ``python -m wsgi_pgconn.bench``. A server imports this
module and serves ``application``; environment variables choose the variant:

``WSGI_PGCONN_BENCH_FSA``        ``own`` (Flask-SQLAlchemy's own QueuePool),
                                 ``own-ping`` (the same with ``pool_pre_ping``),
                                 ``pgconn`` (on wsgi_pgconn: ``engine_options()``
                                 and the Flask extension)
``WSGI_PGCONN_BENCH_DSN``        libpq connection string or URL
``WSGI_PGCONN_BENCH_SCOPE``      wsgi_pgconn scope (``pgconn`` only; default thread)
``WSGI_PGCONN_BENCH_POOL_SIZE``  QueuePool size, or wsgi_pgconn's pool size (default 4)
``WSGI_PGCONN_DRIVER``           the row's driver (psycopg2 or psycopg; the other one is
                                 kept out of the process, see :mod:`.rowdriver`)

The page is the benchmark's: the item of a rotating id (``Session.get``), the
number of items, the backend pid, through the session of the request, on
``wsgi_pgconn_bench_item`` (id, name). It does not commit: Flask-SQLAlchemy
ends the session at the end of the request (a rollback), as a read-only page
of a Flask-SQLAlchemy site does. The page names the driver SQLAlchemy uses.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import Any

import flask
import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from wsgi_pgconn.tooling.bench.apps import PAGE_ROWS, PAGE_TABLE, page_body
from wsgi_pgconn.tooling.bench.rowdriver import isolate

KINDS = ("own", "own-ping", "pgconn")

_counter = itertools.count()
_counter_lock = threading.Lock()


def _next_id() -> int:
    with _counter_lock:
        return next(_counter) % PAGE_ROWS + 1


def make_application(
    kind: str | None = None,
    dsn: str | None = None,
    scope: str | None = None,
    pool_size: int | None = None,
    driver: str | None = None,
) -> flask.Flask:
    """The Flask app of variant ``kind`` (default: the environment's) on ``driver``.

    ``driver`` defaults to ``WSGI_PGCONN_DRIVER``; the other driver is kept
    out of the process first (:func:`.rowdriver.isolate`).
    """
    from wsgi_pgconn.sqlalchemy import engine_options, engine_url

    driver = isolate(driver)
    kind = kind or os.environ["WSGI_PGCONN_BENCH_FSA"]
    if kind not in KINDS:
        raise ValueError(f"unknown Flask-SQLAlchemy benchmark variant {kind!r}")
    dsn = dsn or os.environ["WSGI_PGCONN_BENCH_DSN"]
    size = pool_size or int(os.environ.get("WSGI_PGCONN_BENCH_POOL_SIZE") or 4)

    class Base(DeclarativeBase):
        pass

    db = SQLAlchemy(model_class=Base)

    class BenchItem(db.Model):  # type: ignore[name-defined, misc]
        __tablename__ = PAGE_TABLE
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = engine_url(dsn, driver=driver)
    if kind == "pgconn":
        from wsgi_pgconn.flask import PgConn

        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options()
        scope = scope or os.environ.get("WSGI_PGCONN_BENCH_SCOPE") or "thread"
        extra: dict[str, Any] = {"pool_size": size} if scope == "pool" else {}
        db.init_app(app)
        PgConn(app, dsn=dsn, scope=scope, driver=driver, **extra)
    else:
        app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {
            "pool_size": size,
            "max_overflow": 0,
            "pool_pre_ping": kind == "own-ping",
        }
        db.init_app(app)

    with app.app_context():
        used = str(db.engine.dialect.driver)  # the DB-API module SQLAlchemy loaded

    @app.get("/")
    def page() -> flask.Response:
        row = db.session.get(BenchItem, _next_id())
        assert row is not None
        count = db.session.scalar(sa.select(sa.func.count()).select_from(BenchItem))
        backend = db.session.scalar(sa.select(sa.func.pg_backend_pid()))
        body = page_body(row.id, row.name, count, backend, used)
        return flask.Response(body, content_type="text/html; charset=us-ascii")

    return app


if os.environ.get("WSGI_PGCONN_BENCH_FSA"):
    application = make_application()
