"""Django for the adapter's tests: settings, test databases, and a WSGI stack per test.

Django is set up when this file is imported (test modules import models).
The test databases are created by Django's own test runner functions
(``setup_databases``) on the run's PostgreSQL server (the ``pg`` fixture)
before the first test here, migrated with ``migrate`` through the adapter,
and dropped at the end of the run by ``teardown_databases``, while the
middlewares built by the tests still hold connections to them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import django
import psycopg2
import psycopg2.extensions
import pytest

os.environ["DJANGO_SETTINGS_MODULE"] = "djtest_settings"
django.setup()

from django.conf import settings  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import connections  # noqa: E402
from django.test.utils import (  # noqa: E402
    setup_databases,
    setup_test_environment,
    teardown_databases,
    teardown_test_environment,
)
from djtest_helpers import TestApp, query  # noqa: E402

from wsgi_pgconn.django import DjangoPgConnMiddleware  # noqa: E402

ALIASES = ("default", "other")


@pytest.fixture(scope="session", autouse=True)
def django_databases(pg: Any) -> Iterator[dict[str, str]]:
    """Create (and at the end drop) the test databases of every alias; name -> dsn."""
    params = psycopg2.extensions.parse_dsn(pg.dsn())
    for alias in ALIASES:
        settings.DATABASES[alias].update(
            HOST=params.get("host", ""),
            PORT=params.get("port", ""),
            USER=params.get("user", ""),
            PASSWORD=params.get("password", ""),
        )
    setup_test_environment()
    old_config = setup_databases(verbosity=0, interactive=False, aliases=set(ALIASES))
    try:
        yield {alias: pg.dsn(dbname=connections[alias].settings_dict["NAME"]) for alias in ALIASES}
    finally:
        connections.close_all()
        try:
            teardown_databases(old_config, verbosity=0)
        finally:
            teardown_test_environment()


@pytest.fixture
def test_dsn(django_databases: dict[str, str]) -> str:
    """Connection string of the default alias's test database."""
    return django_databases["default"]


@pytest.fixture
def djadmin(test_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """An autocommit connection to the test database, for setting up and checking."""
    conn = psycopg2.connect(test_dsn, application_name="djadmin")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET lock_timeout = '10s'")
    try:
        yield conn
    finally:
        conn.close()


@pytest.fixture
def make_app() -> Iterator[Callable[..., Any]]:
    """``make_app(**kwargs)``: a webtest TestApp over DjangoPgConnMiddleware(Django)."""
    built: list[DjangoPgConnMiddleware] = []

    def make(*, wsgi: Any = None, **kwargs: Any) -> Any:
        if wsgi is None:
            wsgi = DjangoPgConnMiddleware(get_wsgi_application(), **kwargs)
            built.append(wsgi)
        return TestApp(wsgi)

    yield make
    for middleware in built:
        middleware.close()


@pytest.fixture
def clean(djadmin: psycopg2.extensions.connection) -> Iterator[None]:
    """Empty tables before the test; afterwards nobody may be left idle in a transaction."""
    query(djadmin, "TRUNCATE djtest_app_item, djtest_app_loginfailure")
    yield
    connections.close_all()  # this thread's Django connections (outside requests)
    leftovers = query(
        djadmin,
        "SELECT pid, application_name, state, query FROM pg_stat_activity "
        "WHERE datname = current_database() AND state LIKE 'idle in transaction%%'",
    )
    assert leftovers == []
