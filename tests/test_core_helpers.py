"""Helpers shared by the wsgi_pgconn test modules (this module holds no tests).

* :func:`stack` builds ``validator(PgConnMiddleware(validator(app)))``, so
  every test runs the middleware under ``wsgiref.validate`` on both sides.
* :func:`call` runs one request directly (no test client), for threads.
* :class:`FixedThreadPool` simulates a WSGI server's fixed pool of worker
  threads: every job names the worker that runs it, so a test can send
  several requests to the same thread, as a real server does.
* :class:`RoundTrips` counts the statements the server executed for the
  ``rt_dsn`` role (pg_stat_statements, track_utility on): one call is one
  round trip, since psycopg2 sends one statement per round trip.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.validate import validator

import psycopg2
import pytest
from werkzeug.test import EnvironBuilder

from wsgi_pgconn import PgConnMiddleware, get_connection

with warnings.catch_warnings():
    # WebOb (under webtest) imports the stdlib cgi module, deprecated since 3.11;
    # only that import-time warning is silenced, and only here.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    import webtest

__all__ = [
    "RT_ROLE",
    "WAIT",
    "FixedThreadPool",
    "Gate",
    "Response",
    "RoundTrips",
    "backends",
    "call",
    "clean_env_fixture",
    "deadline_poll",
    "environ_for",
    "formatted",
    "get_connection",
    "idle_in_transaction",
    "log_records",
    "pid_app",
    "query",
    "rt_dsn_fixture",
    "rt_fixture",
    "rt_role_fixture",
    "stack",
    "threads_fixture",
    "wait_backends_gone",
    "webtest",
]

RT_ROLE = "wsgi_pgconn_rt"
WAIT = 10.0  # seconds: the most any test waits for an event that should come at once


# -- the same small helpers as conftest's (not imported from it: pytest replaces
# sys.modules["conftest"] as it loads the conftest.py of each test directory) --


def query(conn: Any, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def backends(admin: Any, app_name: str) -> list[tuple[int, str]]:
    """(pid, state) of the server connections tagged with app_name."""
    return [
        (pid, state)
        for pid, state in query(
            admin,
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            app_name,
        )
    ]


def idle_in_transaction(admin: Any) -> list[tuple[Any, ...]]:
    """Every connection idle in transaction, whoever owns it."""
    return query(
        admin,
        "SELECT pid, application_name, query FROM pg_stat_activity "
        "WHERE state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()",
    )


# -- WSGI plumbing -----------------------------------------------------------------


def stack(
    make_mw: Callable[..., PgConnMiddleware], app: Any, **kwargs: Any
) -> tuple[Any, PgConnMiddleware]:
    """``(validator(mw), mw)`` with ``mw = make_mw(validator(app), **kwargs)``."""
    mw = make_mw(validator(app), **kwargs)
    return validator(mw), mw


@dataclass
class Response:
    status: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def code(self) -> int:
        return int(self.status[:3])

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def environ_for(path: str = "/", *, multithread: bool = True, **extra: Any) -> dict[str, Any]:
    builder = EnvironBuilder(path=path, multithread=multithread)
    try:
        environ: dict[str, Any] = builder.get_environ()
    finally:
        builder.close()
    environ.update(extra)
    return environ


def call(wsgi: Any, path: str = "/", *, multithread: bool = True, **extra: Any) -> Response:
    """One request straight to ``wsgi`` (already validator-wrapped); body read and closed."""
    environ = environ_for(path, multithread=multithread, **extra)
    started: list[Any] = []
    written: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if exc_info is not None and started:
            raise exc_info[1].with_traceback(exc_info[2])
        started[:] = [status, headers]
        return written.append

    result = wsgi(environ, start_response)
    try:
        chunks = list(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    assert started, "no start_response"
    return Response(started[0], started[1], b"".join([*written, *chunks]))


def pid_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers with the backend pid of its connection (one query)."""
    conn = get_connection(environ)
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
    body = str(pid).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


@pytest.fixture(name="clean_env")
def clean_env_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """No DATABASE_URL, WSGI_PGCONN_* or libpq PG* variables from the caller's environment."""
    import os

    from wsgi_pgconn.config import SETTINGS

    for var, _ in SETTINGS.values():
        monkeypatch.delenv(var, raising=False)
    for var in list(os.environ):
        if var.startswith("PG"):
            monkeypatch.delenv(var)


# -- threads -------------------------------------------------------------------------


class FixedThreadPool:
    """N long-lived worker threads, like a threaded WSGI server's fixed pool.

    ``submit(i, fn)`` runs ``fn()`` on worker ``i`` and returns a Future;
    ``each(fn)`` runs ``fn(i)`` on every worker and returns the results in
    worker order (waiting at most :data:`WAIT` seconds).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._queues: list[queue.Queue[Any]] = [queue.Queue() for _ in range(size)]
        self._threads = [
            threading.Thread(target=self._work, args=(q,), name=f"worker-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _work(jobs: queue.Queue[Any]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # reported to the test through the future
                    future.set_exception(exc)

    def submit(self, worker: int, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queues[worker].put((fn, future))
        return future

    def each(self, fn: Callable[[int], Any]) -> list[Any]:
        futures = [self.submit(i, lambda i=i: fn(i)) for i in range(self.size)]
        return [f.result(timeout=WAIT) for f in futures]

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} did not stop"


@pytest.fixture(name="threads")
def threads_fixture() -> Iterator[Callable[[int], FixedThreadPool]]:
    pools: list[FixedThreadPool] = []

    def make(size: int) -> FixedThreadPool:
        pool = FixedThreadPool(size)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


# -- the server side -------------------------------------------------------------------


def deadline_poll(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        threading.Event().wait(0.01)  # polling interval, not synchronisation


def wait_backends_gone(admin: Any, pids: Iterable[int]) -> None:
    """Poll pg_stat_activity until none of ``pids`` is listed (the backends have exited)."""
    wanted = sorted(set(pids))
    deadline_poll(
        lambda: not query(admin, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", wanted),
        f"backends {wanted} to exit",
    )


@pytest.fixture(name="rt_role", scope="session")
def rt_role_fixture(pg: Any, test_db: str) -> Iterator[tuple[str, str]]:
    """A login role used only by round-trip-counting tests: (name, password); dropped at the end."""
    password = "rt-" + uuid.uuid4().hex

    def run(*statements: str) -> None:
        conn = psycopg2.connect(pg.dsn(dbname=test_db))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    run(f"DROP ROLE IF EXISTS {RT_ROLE}")
    run(f"CREATE ROLE {RT_ROLE} LOGIN SUPERUSER PASSWORD '{password}'")
    yield RT_ROLE, password
    # A superuser with a password must not outlive the run on somebody's own server.
    # (Each test module that imports this fixture has an instance of its own: the
    # role may already be gone.)
    run(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{RT_ROLE}'",
        f"DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{RT_ROLE}') THEN "
        f"DROP OWNED BY {RT_ROLE}; DROP ROLE {RT_ROLE}; END IF; END $$",
    )


@pytest.fixture(name="rt_dsn")
def rt_dsn_fixture(pg: Any, test_db: str, app_name: str, rt_role: tuple[str, str]) -> str:
    """Like ``dsn`` but as the round-trip role, so pg_stat_statements can be filtered by it."""
    user, password = rt_role
    result: str = pg.dsn(dbname=test_db, user=user, password=password, application_name=app_name)
    return result


class RoundTrips:
    """Statements the server ran for :data:`RT_ROLE` in the test database since :meth:`reset`."""

    def __init__(self, pg: Any, test_db: str) -> None:
        self._dsn = pg.dsn(dbname=test_db, application_name="rt-counter")

    def _run(self, sql: str) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(self._dsn)
        conn.autocommit = True
        try:
            return query(conn, sql)
        finally:
            conn.close()

    def reset(self) -> None:
        self._run("SELECT pg_stat_statements_reset()")

    def counts(self) -> collections.Counter[str]:
        rows = self._run(
            "SELECT s.query, s.calls FROM pg_stat_statements s "
            "JOIN pg_roles r ON r.oid = s.userid "
            "JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE r.rolname = '{RT_ROLE}' AND d.datname = current_database()"
        )
        counter: collections.Counter[str] = collections.Counter()
        for text, calls in rows:
            counter[" ".join(text.split())] += int(calls)
        return counter

    def total(self) -> int:
        return sum(self.counts().values())


@pytest.fixture(name="rt")
def rt_fixture(pg: Any, test_db: str, pg_stat_statements: None) -> RoundTrips:
    return RoundTrips(pg, test_db)


# -- logs ------------------------------------------------------------------------------


@contextlib.contextmanager
def log_records(level: int = logging.DEBUG) -> Iterator[list[logging.LogRecord]]:
    """Every record the "wsgi_pgconn" logger emits inside the block (at ``level`` or above)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("wsgi_pgconn")
    handler = Collect(level)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def formatted(records: list[logging.LogRecord]) -> list[str]:
    """Each record as a handler would print it, traceback included."""
    fmt = logging.Formatter("%(levelname)s %(name)s %(message)s")
    return [fmt.format(r) for r in records]


@dataclass
class Gate:
    """Lets a test hold a request inside the application until it says go."""

    entered: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)

    def pass_through(self) -> None:
        self.entered.set()
        assert self.go.wait(WAIT), "the test never opened the gate"
