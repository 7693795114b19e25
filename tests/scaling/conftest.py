"""Fixtures of the scaling tests: roles, PgBouncer and pgpool-II in front of the test cluster.

The poolers are started once per session on the throwaway cluster of the
``pg`` fixture (they reach it over its unix socket, so the cluster must be
the throwaway one, not WSGI_PGCONN_TEST_DSN). Each pooler logs in to
PostgreSQL as a role of its own, so ``pg_stat_activity.usename`` tells its
server connections apart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from scaling_names import (
    APP_DB,
    CLIENT_USER,
    LIMITED_DB,
    LIMITED_ROLE,
    LIMITED_TIMEOUT,
    PGPOOL_ROLE,
    POOL_ROLE,
    ROLES,
    Target,
)
from scaling_servers import PgBouncer, PgPool


def _admin_exec(pg: Any, dbname: str, *statements: str) -> None:
    conn = psycopg2.connect(pg.dsn(dbname=dbname, application_name="scaling-setup"))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def scaling_roles(pg: Any, test_db: str) -> Iterator[tuple[str, ...]]:
    """Login roles (no password: they only log in over the trusted unix socket)."""
    statements = []
    for role in ROLES:
        statements += [
            f"DROP ROLE IF EXISTS {role}",
            f"CREATE ROLE {role} LOGIN",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public "
            f"GRANT ALL ON TABLES TO {role}",
            f"ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public "
            f"GRANT ALL ON SEQUENCES TO {role}",
        ]
    statements.append(f"ALTER ROLE {LIMITED_ROLE} SET statement_timeout = '{LIMITED_TIMEOUT}'")
    _admin_exec(pg, test_db, *statements)
    yield ROLES
    _admin_exec(
        pg,
        test_db,
        *[f"DROP OWNED BY {role}" for role in ROLES],
        *[f"DROP ROLE {role}" for role in ROLES],
    )


def _bouncer(pg: Any, test_db: str, mode: str, pool_size: int) -> PgBouncer:
    return PgBouncer(
        pg,
        pool_mode=mode,
        pool_size=pool_size,
        databases={
            APP_DB: {"dbname": test_db, "user": POOL_ROLE},
            LIMITED_DB: {"dbname": test_db, "user": LIMITED_ROLE},
        },
        users={CLIENT_USER: secrets.token_urlsafe(18)},
    )


@pytest.fixture(scope="session")
def bouncer_tx(pg: Any, test_db: str, scaling_roles: Any) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode, 4 server connections per database."""
    bouncer = _bouncer(pg, test_db, "transaction", 4)
    try:
        yield bouncer.start()
    finally:
        bouncer.cleanup()


@pytest.fixture(scope="session")
def bouncer_session(pg: Any, test_db: str, scaling_roles: Any) -> Iterator[PgBouncer]:
    """PgBouncer in session mode, 16 server connections per database."""
    bouncer = _bouncer(pg, test_db, "session", 16)
    try:
        yield bouncer.start()
    finally:
        bouncer.cleanup()


@pytest.fixture
def bouncer_one(pg: Any, test_db: str, scaling_roles: Any) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode with ONE server connection: every client shares it."""
    bouncer = _bouncer(pg, test_db, "transaction", 1)
    try:
        yield bouncer.start()
    finally:
        bouncer.cleanup()


@pytest.fixture(scope="session")
def pgpool(pg: Any, test_db: str, scaling_roles: Any) -> Iterator[PgPool]:
    """pgpool-II in raw mode with connection caching (no load balancing, no replication)."""
    pool = PgPool(pg, users={PGPOOL_ROLE: secrets.token_urlsafe(18)}, children=16, max_pool=1)
    try:
        yield pool.start()
    finally:
        pool.cleanup()


POOLED = ("pgbouncer-transaction", "pgbouncer-session", "pgpool")


@pytest.fixture(params=POOLED)
def pooled(request: pytest.FixtureRequest, test_db: str, app_name: str) -> Target:
    """Each pooler in turn."""
    name = request.param
    if name == "pgpool":
        pool: PgPool = request.getfixturevalue("pgpool")
        return Target(
            name, pool.dsn(test_db, PGPOOL_ROLE, application_name=app_name), "session", PGPOOL_ROLE
        )
    if name == "pgbouncer-transaction":
        bouncer: PgBouncer = request.getfixturevalue("bouncer_tx")
        mode = "transaction"
    else:
        bouncer = request.getfixturevalue("bouncer_session")
        mode = "session"
    dsn = bouncer.dsn(APP_DB, CLIENT_USER, application_name=app_name)
    return Target(name, dsn, mode, POOL_ROLE)
