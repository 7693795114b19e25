"""A small Flask application on wsgi_pgconn.

Run it with one command (a throwaway PostgreSQL is started when
DATABASE_URL is unset)::

    python examples/flask/app.py

or serve ``wsgi.py`` with a real server (see README.md beside this file).

The middleware gives each request one connection and one transaction:
views never commit, roll back or close.  A view that raises (Flask answers
500) is rolled back; a streamed response commits when the server closes it.
"""

import argparse
import contextlib
import html
import os
import signal
import sys

import flask

from wsgi_pgconn import PgConnMiddleware, get_connection

TABLE = "example_item"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS " + TABLE + " ("
    " id bigserial PRIMARY KEY,"
    " name text NOT NULL,"
    " created timestamptz NOT NULL DEFAULT now())"
)
EXEMPT_PATHS = ["/health"]


def db():
    """The connection of the current request (owned by the middleware)."""
    return get_connection(flask.request.environ)


def init_db(dsn):
    """Create the example's table (idempotent)."""
    import psycopg2

    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
        conn.commit()
    finally:
        conn.close()


def _item(row):
    return {"id": row[0], "name": row[1], "created": row[2].isoformat()}


def create_app(dsn=None, **middleware_settings):
    """Build the Flask app wrapped in :class:`PgConnMiddleware`.

    ``dsn`` and ``middleware_settings`` (``scope=...``, ``pool_size=...``)
    default to the environment: DATABASE_URL, WSGI_PGCONN_SCOPE, ...
    Under mod_wsgi, values given with SetEnv / ``--setenv`` are honoured too.
    """
    app = flask.Flask(__name__)

    @app.get("/")
    def index():
        # The page: three small queries, one transaction.
        with db().cursor() as cur:
            cur.execute("SELECT count(*) FROM " + TABLE)
            (count,) = cur.fetchone()
            cur.execute("SELECT name FROM " + TABLE + " ORDER BY id DESC LIMIT 5")
            latest = [name for (name,) in cur.fetchall()]
            cur.execute("SELECT pg_backend_pid(), now()")
            backend, now = cur.fetchone()
        items = "".join(f"<li>{html.escape(name)}</li>" for name in latest)
        return (
            "<!doctype html><title>wsgi_pgconn + Flask</title>"
            f"<h1>{count} items</h1><ul>{items}</ul><p>backend {backend} at {now.isoformat()}</p>\n"
        )

    @app.post("/items")
    def add_item():
        payload = flask.request.get_json(silent=True) or {}
        name = payload.get("name") or flask.request.form.get("name")
        if not name:
            return {"error": "name is required"}, 400
        with db().cursor() as cur:
            cur.execute(
                "INSERT INTO " + TABLE + " (name) VALUES (%s) RETURNING id, name, created", (name,)
            )
            item = _item(cur.fetchone())
        return item, 201  # committed by the middleware after this returns

    @app.get("/items")
    def list_items():
        with db().cursor() as cur:
            cur.execute("SELECT id, name, created FROM " + TABLE + " ORDER BY id")
            return {"items": [_item(row) for row in cur.fetchall()]}

    @app.route("/fail", methods=["GET", "POST"])
    def fail():
        name = flask.request.values.get("name", "written by /fail")
        with db().cursor() as cur:
            cur.execute("INSERT INTO " + TABLE + " (name) VALUES (%s)", (name,))
        # Flask turns this into a 500 response, and the middleware rolls the
        # INSERT back.
        raise RuntimeError("/fail always fails after writing a row")

    @app.get("/stream")
    def stream():
        count = min(max(flask.request.args.get("n", 1000, type=int), 0), 1_000_000)
        conn = db()  # fetched now: the generator runs after the view has returned

        def rows():
            # A server-side cursor: rows are fetched 200 at a time while the
            # body is being sent, inside the request's transaction.
            with conn.cursor(name="example_stream") as cur:
                cur.itersize = 200
                cur.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) AS i", (count,))
                for i, digest in cur:
                    yield f"{i} {digest}\n"
            yield "end\n"

        return flask.Response(flask.stream_with_context(rows()), mimetype="text/plain")

    @app.get("/health")
    def health():
        # An exempt path: no connection is taken for it.
        return {"ok": True, "database": "wsgi_pgconn.connection" in flask.request.environ}

    @app.cli.command("init-db")
    def init_db_command():
        """Create the example's table in DATABASE_URL."""
        init_db(os.environ["DATABASE_URL"])

    middleware_settings.setdefault("exempt_paths", EXEMPT_PATHS)
    app.wsgi_app = PgConnMiddleware(app.wsgi_app, dsn=dsn, **middleware_settings)
    return app


app = create_app()


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run the wsgi_pgconn Flask example on Flask's development server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)
    # Turn SIGTERM into SystemExit so the throwaway cluster is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    dsn = os.environ.get("DATABASE_URL")
    with contextlib.ExitStack() as stack:
        if not dsn:
            from wsgi_pgconn.tooling.tempdb import TemporaryCluster

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
