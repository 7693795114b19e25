"""Shared fixtures: a real PostgreSQL for every test.

The suite starts a throwaway cluster (wsgi_pgconn.tooling.tempdb) from the machine's
PostgreSQL server binaries, or uses the server named by WSGI_PGCONN_TEST_DSN
(a superuser connection string; tests that restart the server need the
throwaway cluster). With neither, the run fails and says how to provide one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from wsgi_pgconn import PgConnMiddleware
from wsgi_pgconn.tooling.tempdb import TempClusterError, TemporaryCluster

TEST_DB = "wsgi_pgconn_test"


class ExternalServer:
    """A server named by WSGI_PGCONN_TEST_DSN (it cannot be restarted by the suite)."""

    def __init__(self, dsn: str) -> None:
        self._params = psycopg2.extensions.parse_dsn(dsn)
        self.password = self._params.get("password", "")

    def dsn(self, *, tcp: bool = True, dbname: str | None = None, **params: Any) -> str:
        merged = {**self._params, **params}
        if dbname is not None:
            merged["dbname"] = dbname
        return psycopg2.extensions.make_dsn(**merged)

    def create_database(self, name: str) -> None:
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def __getattr__(self, name: str) -> Any:
        raise pytest.fail.Exception(
            f"this test needs the throwaway cluster ({name}); unset WSGI_PGCONN_TEST_DSN"
        )


@pytest.fixture(scope="session")
def pg() -> Iterator[Any]:
    """The PostgreSQL server of this run (TemporaryCluster or ExternalServer)."""
    external = os.environ.get("WSGI_PGCONN_TEST_DSN")
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
            f"WSGI_PGCONN_TEST_DSN to a superuser connection string.\n{exc}",
            pytrace=False,
        )
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def test_db(pg: Any) -> str:
    """The name of a database created for this run."""
    pg.create_database(TEST_DB)
    conn = psycopg2.connect(pg.dsn(dbname=TEST_DB))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    finally:
        conn.close()
    return TEST_DB


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
