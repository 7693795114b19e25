"""A statement abandoned by its request is cancelled on the server (issue 11, item 3).

An exception raised into the wait for a statement's result (a server's
request timeout, derived from BaseException like mod_wsgi 6's; gevent.Timeout
under a gevent worker) makes the request give up on its connection while the
statement still runs. Closing the connection alone would leave it running,
and holding its locks, until it ends: the middleware sends a cancel request
first. Checked from pg_stat_activity on an admin connection.

The exception is raised from a SIGALRM handler into the test's own (main)
thread while it waits for ``pg_sleep(3)``: psycopg 3 waits in a loop that
runs signal handlers; psycopg2 does so only through a wait callback (here
``psycopg2.extras.wait_select``, the psycopg2 docs' recipe for interruptible
queries; under gevent, psycogreen's), and without one cannot be interrupted
at all. The same under a real gunicorn gevent worker: tests/servers.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import _faultkit as kit
import dbapi
import pytest
from test_core_helpers import call, get_connection

SLEEP = 3.0  # seconds the statement would run if nobody cancelled it
TIMEOUT = 0.3  # when the "server" gives up on the request


class RequestTimeout(BaseException):
    """What a server's request timeout raises into the request (not an Exception)."""


@pytest.fixture
def interruptible() -> Iterator[None]:
    """psycopg2: a wait callback, so that a query can be interrupted at all."""
    if not dbapi.PSYCOPG2:
        yield
        return
    import psycopg2.extensions
    import psycopg2.extras

    psycopg2.extensions.set_wait_callback(psycopg2.extras.wait_select)
    try:
        yield
    finally:
        psycopg2.extensions.set_wait_callback(None)


@pytest.fixture
def timeout_after() -> Iterator[Any]:
    """``arm(seconds)``: raise RequestTimeout in this thread after ``seconds`` (SIGALRM)."""
    assert threading.current_thread() is threading.main_thread()

    def interrupt(signum: int, frame: Any) -> None:
        raise RequestTimeout(f"the request took longer than {TIMEOUT}s")

    previous = signal.signal(signal.SIGALRM, interrupt)

    def arm(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)

    try:
        yield arm
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sleeping_app(environ: dict[str, Any], start_response: Any) -> Any:
    """``/sleep``, ``/sleep-second``: pg_sleep in the view (first or second statement);
    ``/stream``: pg_sleep while the body is sent; ``/``: no sleep."""
    conn = get_connection(environ)
    path = environ["PATH_INFO"]
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            yield b"first\n"
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(%s)", (SLEEP,))
            yield b"never\n"

        return body()
    with conn.cursor() as cur:
        if path == "/sleep-second":  # not the transaction's first statement
            cur.execute("SELECT 1")
        cur.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (SLEEP if path != "/" else 0,))
        (pid, _) = cur.fetchone()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(pid).encode()]


def sleeping(admin: kit.Admin, app_name: str) -> list[int]:
    """Backends of the test still running a pg_sleep."""
    return [
        pid
        for (pid,) in admin.rows(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND state = 'active' AND query LIKE '%%pg_sleep%%'",
            app_name,
        )
    ]


@pytest.mark.usefixtures("interruptible")
@pytest.mark.parametrize("path", ["/sleep", "/sleep-second", "/stream"])
def test_statement_abandoned_by_an_exception_is_cancelled(
    path: str,
    make_mw: Any,
    fadmin: kit.Admin,
    app_name: str,
    timeout_after: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mw = make_mw(sleeping_app)
    assert call(mw, "/").code == 200  # the connection is open: only the statement is timed
    # /stream: call() reads the body, and closes it when its iteration raises.
    started = time.monotonic()
    timeout_after(TIMEOUT)
    with pytest.raises(RequestTimeout):
        call(mw, path)
    interrupted = time.monotonic() - started
    assert interrupted < SLEEP / 2, f"the exception came only after {interrupted:.2f}s"
    # Without a cancel request the backend would sleep on for about 2.7 s.
    kit.deadline_wait(
        lambda: not sleeping(fadmin, app_name), 1.0, "the abandoned pg_sleep to stop"
    )
    stopped = time.monotonic() - started
    print(f"{path}: interrupted after {interrupted:.2f}s, statement gone after {stopped:.2f}s")
    assert stopped < SLEEP - 1
    assert any("cancelling it" in r.getMessage() for r in caplog.records)
    # The connection it was on is discarded; the next request gets a working one.
    assert call(mw, "/").code == 200
    stats = mw.stats()
    assert stats["discarded"]["broken"] == 1
    assert stats["in_use"] == 0
