"""Greenlets, pool order, exit and SIGTERM: in this process, or in a child running gevent.

The gevent checks run in the servers' venv (``.ci/install-servers.sh``), which
has gevent and psycogreen; the child imports this checkout's package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import dbapi
import pytest

from wsgi_pgconn import get_connection
from wsgi_pgconn.scopes import close_all_registries
from wsgi_pgconn.tooling.bench import servers

REPO = Path(__file__).resolve().parents[1]


def backends(admin: Any, app_name: str) -> list[tuple[int, str]]:
    """(pid, state) of the server connections tagged with app_name."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            (app_name,),
        )
        return [(pid, state) for pid, state in cur.fetchall()]


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)  # polling interval


def sleeper(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    seconds = float(environ.get("QUERY_STRING") or 0)
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (seconds,))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def call(mw: Any, query: str = "") -> str:
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": query}
    body = mw(environ, lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(body)
    close = getattr(body, "close", None)
    if close is not None:
        close()
    return statuses[0]


# -- the pool serves waiters in order ----------------------------------------------------


def test_pool_hands_a_returned_connection_to_the_waiter_not_a_newcomer(make_mw):
    """A connection given back while a request waits goes to that request, not to the next caller.

    Before, the thread that gave it back could take it again at once (the
    waiter had been notified but not yet run): under load, waiters starved.
    """
    mw = make_mw(sleeper, scope="pool", pool_size=1, pool_timeout=10)
    assert call(mw) == "200 OK"
    registry = mw.registry
    rec = registry.checkout()
    order: list[str] = []

    def waiter() -> None:
        got = registry.checkout()
        order.append("waiter")
        registry.checkin(got, False)

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: registry.stats()["pool_waits"] == 1, 10, "the waiter to wait")
    registry.checkin(rec, False)
    again = registry.checkout()  # must queue behind the waiter
    order.append("newcomer")
    registry.checkin(again, False)
    thread.join(10)
    assert order == ["waiter", "newcomer"]


# -- exit: idle connections closed at once, busy ones left to their requests ---------------


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_exit_closes_idle_connections_without_waiting_for_busy_ones(
    make_mw, admin, app_name, scope
):
    """Issue 11 item 7: the exit hook never waits for a query another thread is running."""
    mw = make_mw(sleeper, scope=scope, pool_size=4)
    results: list[str] = []
    idle_done = threading.Event()

    def idle_request() -> None:
        results.append(call(mw))
        idle_done.set()

    threading.Thread(target=idle_request).start()  # leaves an idle connection
    assert idle_done.wait(10)
    busy = threading.Thread(target=lambda: results.append(call(mw, "1.5")))
    busy.start()
    wait_until(
        lambda: [s for _, s in backends(admin, app_name)].count("active") == 1,
        10,
        "the slow query to run",
    )
    started = time.monotonic()
    close_all_registries()
    took = time.monotonic() - started
    assert took < 0.5, f"the exit hook waited {took:.2f} s for a connection in use"
    # The idle connection is gone; the busy one goes on with its request.
    wait_until(lambda: len(backends(admin, app_name)) == 1, 10, "the idle connection to close")
    assert [s for _, s in backends(admin, app_name)] == ["active"]
    busy.join(10)
    assert results == ["200 OK", "200 OK"]


# -- SIGTERM -------------------------------------------------------------------------------


SIGTERM_SCRIPT = """
import os, signal, sys, time
from wsgi_pgconn import PgConnMiddleware, get_connection
if sys.argv[1] == "theirs":
    def theirs(signum, frame):
        print("their handler ran", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, theirs)
def app(environ, start_response):
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT 1")
    start_response("200 OK", [])
    return [b"ok"]
mw = PgConnMiddleware(app, dsn=sys.argv[2])
b"".join(mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, lambda *a: None))
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("not stopped", flush=True)
"""


@pytest.mark.cluster_only("reads the server log")
def test_sigterm_closes_idle_connections_and_dies_as_before(pg, test_db, app_name, admin):
    """Nothing handles SIGTERM: the connection is closed, then the process dies of SIGTERM."""
    dsn = pg.dsn(dbname=test_db, application_name=app_name, options="-c log_min_messages=debug1")
    start = len(pg.read_log())
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, "default", dsn],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert proc.stdout.splitlines() == ["ready"], proc.stderr
    wait_until(lambda: not backends(admin, app_name), 10, "the backend to exit")
    log = pg.read_log()[start:]
    assert "unexpected EOF" not in log, log


def test_sigterm_is_left_to_a_handler_the_application_installed(dsn):
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_SCRIPT, "theirs", dsn],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ready", "their handler ran"], proc.stderr


# -- gevent, in the servers' venv ----------------------------------------------------------


GEVENT_SCRIPT = r"""
import json, logging, sys, time
order = sys.argv[2]
if order == "driver-first":  # psycopg imported before monkey-patching (gunicorn --preload)
    import psycopg  # noqa
from gevent import monkey
monkey.patch_all()
import gevent
import wsgi_pgconn
from wsgi_pgconn import ConfigurationError, PgConnMiddleware, get_connection, green

dsn = sys.argv[1]
warnings = []
class Catch(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.getLogger("wsgi_pgconn").addHandler(Catch())

def app(environ, start_response):
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (float(environ.get("QUERY_STRING") or 0),))
    start_response("200 OK", [])
    return [b"ok"]

def call(mw, query=""):
    statuses = []
    body = mw({"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": query},
              lambda status, headers, exc_info=None: statuses.append(status))
    b"".join(body)
    return statuses[0]

out = {}
try:
    PgConnMiddleware(app, dsn=dsn, scope="thread")
    out["thread_refused"] = None
except ConfigurationError as exc:
    out["thread_refused"] = str(exc)
PgConnMiddleware(app, dsn=dsn, scope="thread", greenlets="off")  # insisting is allowed

if order == "callback":
    green.patch_psycopg2()
mw = PgConnMiddleware(app, dsn=dsn, pool_size=2)
call(mw)
registry = mw.registry
out["scope"] = registry.scope
out["poller"] = type(registry._idle[0].poller).__module__
# Two 0.3 s queries in two greenlets at once: 0.3 s if the driver yields, 0.6 s if it blocks.
start = time.monotonic()
jobs = [gevent.spawn(call, mw, "0.3") for _ in range(2)]
gevent.joinall(jobs, timeout=10)
out["concurrent"] = time.monotonic() - start
out["statuses"] = [j.value for j in jobs]

# A newcomer does not take a connection given back while a greenlet waits.
one = PgConnMiddleware(app, dsn=dsn, scope="process")
call(one)
out["process_scope"] = [one.registry.scope, one.registry.settings.pool_size]
reg = one.registry
rec = reg.checkout()
seen = []
def waiter():
    got = reg.checkout(); seen.append("waiter"); reg.checkin(got, False)
g = gevent.spawn(waiter)
gevent.sleep(0)
reg.checkin(rec, False)
again = reg.checkout(); seen.append("newcomer"); reg.checkin(again, False)
g.join(5)
out["order"] = seen
# A waiter killed while it waits must not be handed the connection.
rec = reg.checkout()
g = gevent.spawn(reg.checkout)
gevent.sleep(0)
g.kill(block=True)
reg.checkin(rec, False)
start = time.monotonic()
try:
    again = reg.checkout(); reg.checkin(again, False)
except Exception as exc:
    out["after_kill_error"] = repr(exc)
out["after_kill"] = time.monotonic() - start

if order == "callback":
    # A query abandoned by its greenlet is cancelled on the server.
    slow = gevent.spawn(call, mw, "3")
    import psycopg2
    watch = psycopg2.connect(dsn)
    watch.autocommit = True
    deadline = time.monotonic() + 5
    running = 0
    while not running and time.monotonic() < deadline:  # until the server runs it
        gevent.sleep(0.01)
        with watch.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                " AND query LIKE '%pg_sleep(%' AND pid <> pg_backend_pid()"
                " AND application_name = current_setting('application_name')"
            )
            running = cur.fetchone()[0]
    watch.close()
    out["was_running"] = running
    slow.kill(block=True, timeout=5)
    out["killed"] = True
out["warnings"] = warnings
mw.close(); one.close()
print(json.dumps(out), flush=True)
"""


def run_gevent(dsn: str, order: str) -> dict[str, Any]:
    python = servers.venv_python()
    if not servers.python_has(python, "gevent"):
        message = "gevent not found in the servers' venv: run bash .ci/install-servers.sh"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    assert python is not None
    proc = subprocess.run(
        [python, "-c", textwrap.dedent(GEVENT_SCRIPT), dsn, order],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO), "WSGI_PGCONN_DRIVER": dbapi.NAME},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def check_green(out: dict[str, Any]) -> None:
    assert out["thread_refused"] is not None
    assert "greenlets" in out["thread_refused"]
    assert "WSGI_PGCONN_GREENLETS=off" in out["thread_refused"]
    assert out["scope"] == "pool"
    assert not out["poller"].startswith("gevent"), out["poller"]  # poll(0) must not yield
    assert out["statuses"] == ["200 OK", "200 OK"]
    assert out["concurrent"] < 0.55, out  # the two queries ran at once
    assert out["process_scope"] == ["pool", 1]
    assert out["order"] == ["waiter", "newcomer"]
    assert out["after_kill"] < 1.0, out  # not left to the killed waiter


@pytest.mark.slow
def test_gevent_pool_and_liveness(dsn):
    # psycopg2 with wsgi_pgconn's wait callback; psycopg imported before gevent patched select.
    out = run_gevent(dsn, "callback" if dbapi.PSYCOPG2 else "driver-first")
    check_green(out)
    assert not [w for w in out["warnings"] if "blocks" in w], out["warnings"]


@pytest.mark.slow
@pytest.mark.skipif(not dbapi.PSYCOPG2, reason="psycopg2's wait callback")
def test_gevent_cancels_an_abandoned_query(dsn, admin, app_name):
    """A greenlet killed during a query: the query is cancelled on the server, not left running."""
    out = run_gevent(dsn, "callback")
    assert out["was_running"] == 1, out  # killed while the server ran it
    assert out["killed"], out
    # The killed request's pg_sleep(3) began less than a second ago: cancelled, it is gone.

    def sleeping() -> int:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND query LIKE %s AND state = 'active'",
                (app_name, "%pg_sleep%"),
            )
            (count,) = cur.fetchone()
        return int(count)

    wait_until(lambda: sleeping() == 0, 1.0, "the abandoned query to be cancelled")


@pytest.mark.slow
@pytest.mark.skipif(not dbapi.PSYCOPG2, reason="psycopg2's wait callback")
def test_gevent_psycopg2_without_wait_callback_warns_once(dsn):
    out = run_gevent(dsn, "plain")
    blocking = [w for w in out["warnings"] if "blocks the whole" in w]
    assert len(blocking) == 1, out["warnings"]
    assert "patch_psycopg2" in blocking[0]
