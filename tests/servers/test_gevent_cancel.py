"""gunicorn's gevent worker: a query cut short by gevent.Timeout is cancelled on the server.

The view runs ``pg_sleep(3)`` under ``gevent.Timeout(0.3)`` and answers 504
when the timeout fires. Without a cancel request the statement would keep
running (and holding its locks) for the full 3 seconds after the response;
pg_stat_activity, seen from a connection of the test, must show it gone
within a second of the answer.

The server runs the driver of this test run (``WSGI_PGCONN_DRIVER``):
psycopg 3 waits through gevent's patched ``select`` on its own; psycopg2
needs psycogreen's wait callback, which the application module installs.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dbapi
import pytest
from _serverkit import Probe, server_env

from wsgi_pgconn.tooling.bench import servers

pytestmark = pytest.mark.slow

SLEEP = 3.0
TIMEOUT = 0.3

APP = '''
"""A view whose pg_sleep is cut short by gevent.Timeout (for test_gevent_cancel)."""
import os

import gevent

if os.environ.get("WSGI_PGCONN_DRIVER") == "psycopg2":
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

from wsgi_pgconn import PgConnMiddleware, get_connection


def app(environ, start_response):
    if environ["PATH_INFO"] == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    conn = get_connection(environ)
    try:
        with gevent.Timeout({timeout}):
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep({sleep})")
    except gevent.Timeout:
        start_response("504 Gateway Timeout", [("Content-Type", "text/plain")])
        return [b"timed out"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept"]


application = PgConnMiddleware(app)
'''


@pytest.fixture
def gevent_available(gunicorn_available: None) -> None:
    python = servers.gunicorn_python()
    for module in ("gevent", "psycogreen", dbapi.NAME):
        if not servers.python_has(python, module):
            pytest.skip(f"{module} is not installed beside gunicorn (.ci/install-servers.sh)")


@pytest.fixture
def app_tree() -> Iterator[str]:
    """A world-readable copy of the package, plus the application module above."""
    root = servers.stage([servers.package_dir()])
    Path(root, "gevent_cancel_app.py").write_text(APP.format(timeout=TIMEOUT, sleep=SLEEP))
    servers.make_world_readable(root)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def sleeping(probe: Probe, app_name: str) -> int:
    return len(
        probe.rows(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            app_name,
        )
    )


def test_gevent_timeout_cancels_the_query(
    gevent_available: None, app_tree: str, app_dsn: Any, probe: Probe, run_server: Any
) -> None:
    app_name = "srv-" + uuid.uuid4().hex[:10]
    server = run_server(
        servers.gunicorn_server(
            "gevent_cancel_app:application",
            workers=1,
            worker_class="gevent",
            python_path=[app_tree],
            env=server_env(app_dsn(app_name), WSGI_PGCONN_DRIVER=dbapi.NAME),
            name="gunicorn-gevent",
        ),
        app_name,
    )
    started = time.monotonic()
    status, _, body = servers.http_get(server.port, "/sleep", timeout=30)
    answered = time.monotonic() - started
    assert (status, body) == (504, b"timed out"), server.log_tail()
    assert answered < SLEEP / 2
    probe.wait_for("the abandoned pg_sleep to stop", lambda: sleeping(probe, app_name) == 0, 1.0)
    stopped = time.monotonic() - started
    print(f"gevent.Timeout: answered after {answered:.2f}s, query gone after {stopped:.2f}s")
    assert stopped < SLEEP - 1
    assert "cancelling it" in Path(server.log_path).read_text(errors="replace")
    # The worker serves on: the next request gets a working connection.
    status, _, _ = servers.http_get(server.port, "/health", timeout=10)
    assert status == 200
