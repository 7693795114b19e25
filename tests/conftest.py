"""Shared fixtures: a real PostgreSQL for every test.

The suite starts a throwaway cluster (wsgi_pgconn.tooling.tempdb) from the
machine's PostgreSQL server programs, or uses the server named by
WSGI_PGCONN_TEST_DSN (a superuser connection string). With neither, the run
fails and says how to provide one.

With WSGI_PGCONN_TEST_DSN the suite starts no PostgreSQL of its own: tests
marked ``cluster_only`` (they restart or stop the server, read its log, put a
pooler or a standby next to it, or start clusters of their own) are skipped
with their reason, and so are the tests that count round trips with
pg_stat_statements when that server does not load it. The databases the run
creates are dropped at its end (and a leftover of an interrupted run at its
start), so it can run again.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import urllib.parse
import uuid

# The driver of this run (WSGI_PGCONN_DRIVER, default auto). With psycopg2 the
# suite runs as on a machine without psycopg 3: importing it fails, and
# Django's backend falls back to psycopg2 as it would there.
if os.environ.get("WSGI_PGCONN_DRIVER") == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from psycopg2 import sql

from wsgi_pgconn import PgConnMiddleware
from wsgi_pgconn.tooling.tempdb import TempClusterError, TemporaryCluster

TEST_DB = "wsgi_pgconn_test"
TEST_DSN_ENV = "WSGI_PGCONN_TEST_DSN"
PG_STAT_STATEMENTS_MISSING = (
    "counts round trips with pg_stat_statements, which the server of "
    f"{TEST_DSN_ENV} does not load (shared_preload_libraries); the throwaway cluster does"
)


def _quiet_dummy_threads_at_exit() -> None:
    """Keep CPython 3.13.0-3.13.5 from printing a traceback per leftover dummy thread at exit.

    Those releases print "Exception ignored in: <function
    _DeleteDummyThreadOnDel.__del__ ...> TypeError: 'NoneType' object does
    not support the context manager protocol" for every dummy thread still
    referenced at interpreter shutdown: the finalizer reads module globals that
    shutdown has already set to None (CPython gh-130522, fixed in 3.13.6). The
    suite makes many of them: the middleware logs at DEBUG from a thread-local
    destructor, after the ending thread has left threading's registry, and
    logging's current_thread() then registers a dummy thread. The replacement
    below does what the original does, with the lock and the registry bound
    when it is defined, which is how 3.13.6 fixed it; nothing changes on other
    versions.
    """
    if not (3, 13, 0) <= sys.version_info[:3] < (3, 13, 6):
        return
    cls: Any = getattr(threading, "_DeleteDummyThreadOnDel", None)
    if cls is None:
        return

    def __del__(
        self: Any,
        _lock: Any = threading._active_limbo_lock,
        _registry: Any = threading._active,
    ) -> None:
        with _lock:
            if _registry.get(self._tident) is self._dummy_thread:
                _registry.pop(self._tident, None)

    cls.__del__ = __del__


_quiet_dummy_threads_at_exit()


def external_dsn() -> str:
    """The connection string of WSGI_PGCONN_TEST_DSN, or "" (the throwaway cluster)."""
    return os.environ.get(TEST_DSN_ENV, "").strip()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not external_dsn():
        return
    for item in items:
        marker = item.get_closest_marker("cluster_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else "needs the throwaway cluster"
            item.add_marker(pytest.mark.skip(reason=f"{reason}: {TEST_DSN_ENV} is set"))


class ExternalServer:
    """The server named by WSGI_PGCONN_TEST_DSN: connection strings and databases only.

    What only the throwaway cluster can do (restart, stop, read its log, its
    socket directory and OS user) skips the test that asks, with the reason;
    tests that need it are marked ``cluster_only`` and skipped before they start.
    """

    def __init__(self, dsn: str) -> None:
        self._params = psycopg2.extensions.parse_dsn(dsn)
        self.password: str = self._params.get("password", "")
        conn = psycopg2.connect(dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT current_user, current_setting('port')")
                row = cur.fetchone()
                assert row is not None
                self.user: str = row[0]
                self.port = int(row[1])
        finally:
            conn.close()
        self.host: str = self._params.get("host", "")
        self.dbname: str = self._params.get("dbname", "") or self.user

    def dsn(self, *, tcp: bool = True, dbname: str | None = None, **params: Any) -> str:
        """The connection string with ``params``; ``tcp`` is ignored (there is one way in)."""
        merged = {**self._params, **{k: str(v) for k, v in params.items()}}
        if dbname is not None:
            merged["dbname"] = dbname
        result: str = psycopg2.extensions.make_dsn(**merged)
        return result

    def url(self, *, tcp: bool = True, dbname: str | None = None, **params: Any) -> str:
        """The same as a postgresql:// URL."""
        merged = psycopg2.extensions.parse_dsn(self.dsn(dbname=dbname, **params))
        quote = urllib.parse.quote
        user = quote(merged.pop("user", ""), safe="")
        password = merged.pop("password", "")
        host = merged.pop("host", "")
        port = merged.pop("port", "")
        db = quote(merged.pop("dbname", ""), safe="")
        if host.startswith("/"):  # a socket directory goes in the query
            merged["host"] = host
            host = ""
        netloc = user + (":" + quote(password, safe="") if password else "")
        netloc += "@" + host + (":" + port if port else "")
        query = urllib.parse.urlencode(merged, quote_via=quote, safe="/")
        return f"postgresql://{netloc}/{db}" + ("?" + query if query else "")

    def create_database(self, name: str) -> None:
        conn = psycopg2.connect(self.dsn(application_name="wsgi_pgconn-tests-admin"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()

    def _cluster_only(self, what: str) -> Any:
        pytest.skip(f"{what}: only the throwaway cluster can, and {TEST_DSN_ENV} is set")

    def restart(self, *args: Any, **kwargs: Any) -> None:
        self._cluster_only("restarts the server")

    def stop(self, *args: Any, **kwargs: Any) -> None:
        self._cluster_only("stops the server")

    def start(self, *args: Any, **kwargs: Any) -> None:
        self._cluster_only("starts the server")

    def read_log(self) -> str:
        return str(self._cluster_only("reads the server log"))

    @property
    def socket_dir(self) -> Any:
        return self._cluster_only("uses the server's unix socket directory")

    @property
    def os_user(self) -> Any:
        return self._cluster_only("runs programs as the server's OS user")


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """The PostgreSQL server of this run (TemporaryCluster or ExternalServer)."""
    external = external_dsn()
    if external:
        yield ExternalServer(external)
        return
    try:
        cluster = TemporaryCluster(
            settings={
                "shared_preload_libraries": "'pg_stat_statements'",
                "pg_stat_statements.track_utility": "on",
            }
        ).start()
    except TempClusterError as exc:
        pytest.fail(
            "the tests need PostgreSQL: install the server (apt-get install postgresql, "
            "whose initdb/pg_ctl are found in /usr/lib/postgresql/*/bin) or set "
            f"{TEST_DSN_ENV} to a superuser connection string.\n{exc}",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _drop_database(pg: Any, name: str) -> None:
    conn = psycopg2.connect(pg.dsn(application_name="wsgi_pgconn-tests-admin"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            cur.execute(statement.format(sql.Identifier(name)))
    finally:
        conn.close()


@pytest.fixture(scope="session")
def test_db(pg: Any) -> Iterator[str]:
    """The name of a database created for this run (dropped at its end)."""
    _drop_database(pg, TEST_DB)  # left behind by a run that was killed
    pg.create_database(TEST_DB)
    conn = psycopg2.connect(pg.dsn(dbname=TEST_DB))
    conn.autocommit = True
    try:
        # Not installed on that server: the tests that count round trips skip.
        with conn.cursor() as cur, contextlib.suppress(psycopg2.Error):
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        conn.close()
    try:
        yield TEST_DB
    finally:
        _drop_database(pg, TEST_DB)


@pytest.fixture(scope="session")
def pg_stat_statements(pg: Any, test_db: str) -> None:
    """Skip unless the server counts statements (pg_stat_statements, utility statements too)."""
    conn = psycopg2.connect(pg.dsn(dbname=test_db))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            try:
                cur.execute("SELECT count(*) FROM pg_stat_statements")
                cur.execute("SELECT current_setting('pg_stat_statements.track_utility')")
                row = cur.fetchone()
            except psycopg2.Error:
                row = None
    finally:
        conn.close()
    if row is None or row[0] != "on":
        if external_dsn():
            pytest.skip(PG_STAT_STATEMENTS_MISSING)
        pytest.fail("the throwaway cluster should load pg_stat_statements")


@pytest.fixture
def app_name() -> str:
    """A unique application_name, to find this test's connections in pg_stat_activity."""
    return "t-" + uuid.uuid4().hex[:12]


@pytest.fixture
def dsn(pg: Any, test_db: str, app_name: str) -> str:
    """TCP + password connection string to the test database, tagged with app_name."""
    result: str = pg.dsn(dbname=test_db, application_name=app_name)
    return result


@pytest.fixture
def admin(pg: Any, test_db: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit superuser connection for setting up and checking."""
    conn = psycopg2.connect(pg.dsn(dbname=test_db, application_name="admin"))
    conn.autocommit = True
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def make_mw(dsn: str) -> Iterator[Callable[..., PgConnMiddleware]]:
    """Build middlewares on the test database; their connections are closed afterwards."""
    built: list[PgConnMiddleware] = []

    def make(app: Any, **kwargs: Any) -> PgConnMiddleware:
        kwargs.setdefault("dsn", dsn)
        mw = PgConnMiddleware(app, **kwargs)
        built.append(mw)
        return mw

    yield make
    for mw in built:
        mw.close()


def query(conn: psycopg2.extensions.connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def backends(admin: psycopg2.extensions.connection, app_name: str) -> list[tuple[int, str]]:
    """(pid, state) of the server connections tagged with app_name."""
    return [
        (pid, state)
        for pid, state in query(
            admin,
            "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
            app_name,
        )
    ]


def idle_in_transaction(admin: psycopg2.extensions.connection) -> list[tuple[Any, ...]]:
    """Every connection idle in transaction, whoever owns it."""
    return query(
        admin,
        "SELECT pid, application_name, query FROM pg_stat_activity "
        "WHERE state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()",
    )


@pytest.fixture
def table(admin: psycopg2.extensions.connection) -> Iterator[str]:
    """A fresh table ``(id serial, k text unique)`` with a deferred check; dropped after."""
    name = "t_" + uuid.uuid4().hex[:10]
    query(
        admin,
        f"CREATE TABLE {name} (id serial PRIMARY KEY, k text, "
        f"pos int NOT NULL DEFAULT 1, "
        f"CONSTRAINT {name}_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)",
    )
    yield name
    query(admin, f"DROP TABLE IF EXISTS {name}")
