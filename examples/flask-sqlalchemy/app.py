"""Flask-SQLAlchemy on wsgi_pgconn: the ORM on the request's connection and transaction.

Run it with one command (a throwaway PostgreSQL is started when
DATABASE_URL is unset)::

    python examples/flask-sqlalchemy/app.py

or serve ``wsgi.py`` with a real server (see README.md beside this file).

Each request is one transaction of the middleware. ``db.session.commit()``
keeps the session's work in it (the middleware commits it when the
response succeeds); a view that raises after committing (Flask answers 500)
loses everything it did; ``db.session.rollback()`` undoes the session's work
since its last commit. Raw SQL on ``get_connection()`` shares the
transaction.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import signal
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import flask
import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from wsgi_pgconn.flask import PgConn, get_connection
from wsgi_pgconn.sqlalchemy import engine_options, engine_url

TABLE = "example_sa_item"
EXEMPT_PATHS = ["/health"]


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Item(db.Model):  # type: ignore[name-defined, misc]
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
    name: Mapped[str] = mapped_column(sa.Text)
    created: Mapped[datetime] = mapped_column(
        sa.DateTime(timezone=True), server_default=sa.func.now()
    )

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "created": self.created.isoformat()}


def init_db(dsn: str | None = None) -> None:
    """Create the example's table (idempotent), with an engine of its own."""
    engine = sa.create_engine(engine_url(dsn))
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()


def create_app(dsn: str | None = None, **middleware_settings: Any) -> flask.Flask:
    """The Flask app, with Flask-SQLAlchemy and wsgi_pgconn on the same database.

    ``dsn`` defaults to DATABASE_URL; ``middleware_settings`` (``scope=...``,
    ...) to the environment (WSGI_PGCONN_SCOPE, ...) and ``app.config``.
    """
    app = flask.Flask(__name__)
    app.config["DATABASE_URL"] = dsn or os.environ.get("DATABASE_URL", "")
    # The ORM's engine: the same database, through the middleware's driver;
    # inside requests it runs on the request's connection (outside requests,
    # e.g. `flask init-db`, it has a pool of its own).
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("SQLALCHEMY_DATABASE_URI") or engine_url(
        app.config["DATABASE_URL"] or None
    )
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options()
    app.config.setdefault("WSGI_PGCONN_EXEMPT_PATHS", EXEMPT_PATHS)
    db.init_app(app)
    PgConn(app, **middleware_settings)

    @app.get("/")
    def index() -> str:
        # The page: three small ORM queries, one transaction.
        count = db.session.scalar(sa.select(sa.func.count()).select_from(Item))
        latest = db.session.scalars(sa.select(Item.name).order_by(Item.id.desc()).limit(5)).all()
        backend, now = db.session.execute(sa.select(sa.func.pg_backend_pid(), sa.func.now())).one()
        items = "".join(f"<li>{html.escape(name)}</li>" for name in latest)
        return (
            "<!doctype html><title>wsgi_pgconn + Flask-SQLAlchemy</title>"
            f"<h1>{count} items</h1><ul>{items}</ul>"
            f"<p>backend {backend} at {now.isoformat()}</p>\n"
        )

    @app.post("/items")
    def add_item() -> Any:
        payload = flask.request.get_json(silent=True) or {}
        name = payload.get("name") or flask.request.form.get("name")
        if not name:
            return {"error": "name is required"}, 400
        item = Item(name=name)
        db.session.add(item)
        db.session.commit()  # kept in the request's transaction; the middleware commits it
        return item.as_dict(), 201

    @app.get("/items")
    def list_items() -> Any:
        items = db.session.scalars(sa.select(Item).order_by(Item.id)).all()
        return {"items": [item.as_dict() for item in items]}

    @app.route("/fail", methods=["GET", "POST"])
    def fail() -> Any:
        name = flask.request.values.get("name", "written by /fail")
        db.session.add(Item(name=name))
        db.session.commit()
        with get_connection().cursor() as cur:  # raw SQL, same transaction
            cur.execute(f"INSERT INTO {TABLE} (name) VALUES (%s)", (name + " (raw)",))
        # Flask answers 500: the middleware rolls back both rows, committed
        # by the session or not.
        raise RuntimeError("/fail always fails after writing two rows")

    @app.post("/rename")
    def rename() -> Any:
        """Rename the items named ``old`` unless one is already named ``new`` (then 409)."""
        old, new = flask.request.values["old"], flask.request.values["new"]
        for item in db.session.scalars(sa.select(Item).where(Item.name == old)):
            item.name = new
        db.session.flush()
        if db.session.scalar(sa.select(sa.func.count()).where(Item.name == new)) > 1:
            db.session.rollback()  # undoes the renames, nothing else
            return {"error": f"{new!r} exists"}, 409
        db.session.commit()
        return {"renamed": old}

    @app.get("/stream")
    def stream() -> flask.Response:
        count = min(max(flask.request.args.get("n", 1000, type=int), 0), 1_000_000)

        @flask.stream_with_context
        def rows() -> Iterator[str]:
            # A server-side cursor (yield_per) read while the body is sent,
            # in the transaction of the body.
            query = sa.select(sa.func.generate_series(1, count).label("i")).execution_options(
                yield_per=200
            )
            for (i,) in db.session.execute(query):
                yield f"{i}\n"
            yield "end\n"

        return flask.Response(rows(), mimetype="text/plain")

    @app.get("/health")
    def health() -> Any:
        # An exempt path: no connection is taken for it.
        return {"ok": True, "database": "wsgi_pgconn.connection" in flask.request.environ}

    @app.cli.command("init-db")
    def init_db_command() -> None:
        """Create the example's table in DATABASE_URL."""
        init_db(app.config["DATABASE_URL"] or None)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the wsgi_pgconn Flask-SQLAlchemy example on Flask's development server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    # Turn SIGTERM into SystemExit so the throwaway cluster is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    dsn = os.environ.get("DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if not dsn:
            from wsgi_pgconn.tempdb import TemporaryCluster

            cluster = stack.enter_context(TemporaryCluster())
            dsn = cluster.url()
            print(
                "DATABASE_URL is unset: using an embedded default, a throwaway PostgreSQL "
                f"cluster on {cluster.host}:{cluster.port} that is deleted when this program "
                "stops. Set DATABASE_URL to use your own database.",
                file=sys.stderr,
            )
        init_db(dsn)
        # Flask's development server starts a new thread for every request, so
        # per-thread connections would last one request: use a small pool here.
        scope = os.environ.get("WSGI_PGCONN_SCOPE") or "pool"
        create_app(dsn, scope=scope).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
