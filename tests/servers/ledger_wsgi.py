"""The application the server tests of greenlets, uWSGI, waitress and werkzeug serve.

Configured by its environment (the server's):

* ``APP_TABLE``: the ledger table (``k text``); ``/write?k=KEY`` inserts KEY,
  and with ``&sleep=S`` then runs ``pg_sleep(S)`` in the same transaction.
* ``APP_GEVENT_PATCH=1``: ``gevent.monkey.patch_all()`` first (what a
  ``wsgi.py`` does under uWSGI's ``--gevent`` without ``--gevent-monkey-patch``).
* ``APP_PSYCOGREEN=psycogreen`` or ``=wsgi_pgconn``: psycopg2 waits through gevent
  (psycogreen's wait callback, or wsgi_pgconn.green.patch_psycopg2's).
* ``APP_WARM=1``: one request served at import (a warm-up query in the
  process that loads the application: the uWSGI master without ``--lazy-apps``).

``/sleep?s=S`` runs ``pg_sleep(S)``; ``/whoami`` answers the process id, the
backend pid and the connection's application_name; ``/stats`` the
middleware's stats; ``/health`` needs no connection (exempt).
"""

from __future__ import annotations

import os

if os.environ.get("APP_GEVENT_PATCH") == "1":
    from gevent import monkey

    monkey.patch_all()

import io
import json
import logging
import sys
import urllib.parse

from wsgi_pgconn import PgConnMiddleware, get_connection

logging.basicConfig(
    stream=sys.stderr,
    level=logging.DEBUG if os.environ.get("APP_DEBUG") == "1" else logging.INFO,
    format="%(process)d %(levelname)s %(name)s: %(message)s",
)

if os.environ.get("APP_PSYCOGREEN") == "psycogreen":
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
elif os.environ.get("APP_PSYCOGREEN") == "wsgi_pgconn":
    from wsgi_pgconn import green

    green.patch_psycopg2()

TABLE = os.environ.get("APP_TABLE", "ledger")


def _reply(start_response, status, body, content_type="text/plain"):  # type: ignore[no-untyped-def]
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return [data]


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ.get("PATH_INFO", "")
    query = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
    if path == "/health":
        return _reply(start_response, "200 OK", "ok\n")
    if path == "/stats":
        stats = application.stats()
        return _reply(
            start_response,
            "200 OK",
            json.dumps({"pid": os.getpid(), **stats}, default=str),
            "application/json",
        )
    conn = get_connection(environ)
    with conn.cursor() as cur:
        if path == "/write":
            cur.execute(f"INSERT INTO {TABLE} (k) VALUES (%s)", (query["k"],))
            if "sleep" in query:
                cur.execute("SELECT pg_sleep(%s)", (float(query["sleep"]),))
            return _reply(start_response, "200 OK", f"wrote {query['k']}\n")
        if path == "/sleep":
            cur.execute("SELECT pg_sleep(%s)", (float(query.get("s", "0.2")),))
            return _reply(start_response, "200 OK", "slept\n")
        if path == "/whoami":
            cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
            backend, app_name = cur.fetchone()
            return _reply(
                start_response,
                "200 OK",
                json.dumps({"pid": os.getpid(), "backend": backend, "application_name": app_name}),
                "application/json",
            )
    return _reply(start_response, "404 Not Found", "not found\n")


application = PgConnMiddleware(app, exempt_paths="/health,/stats")

if os.environ.get("APP_WARM") == "1":
    # A warm-up query at import, as an application filling a cache would do.
    _environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/whoami",
        "QUERY_STRING": "",
        "SERVER_NAME": "warmup",
        "SERVER_PORT": "0",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
    }
    _body = b"".join(application(_environ, lambda status, headers, exc_info=None: None))
    print("warm-up at import in pid", os.getpid(), _body.decode(), file=sys.stderr, flush=True)
