"""Outside requests the backend is Django's: management commands, test databases, drivers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2.extensions
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.utils import OperationalError
from djtest_helpers import TestApp, new_key, query

from wsgi_pgconn import PgConnMiddleware, get_connection
from wsgi_pgconn.django import DjangoPgConnMiddleware, database_dsn

REPO = Path(__file__).resolve().parents[2]


def pid_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A plain WSGI app that queries on the request's connection."""
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(pid).encode()]


# -- management commands -------------------------------------------------------------------


@pytest.mark.usefixtures("clean")
def test_management_commands_run_as_with_djangos_backend(make_app: Any) -> None:
    make_app().get(f"/write/{new_key()}")  # a middleware is live and holds a connection
    assert connection.in_request is False
    assert connection.get_autocommit() is True
    with connection.cursor() as cur:  # Django's own connection, set up by Django
        cur.execute("SELECT current_setting('TimeZone')")
        assert cur.fetchone() == ("Asia/Tokyo",)

    out = io.StringIO()
    call_command("migrate", verbosity=1, stdout=out)
    assert "No migrations to apply" in out.getvalue()
    call_command("showmigrations", "djtest_app", stdout=(out := io.StringIO()))
    assert "[X] 0001_initial" in out.getvalue()
    call_command("sqlmigrate", "djtest_app", "0001", stdout=(out := io.StringIO()))
    assert "DEFERRABLE INITIALLY DEFERRED" in out.getvalue()
    call_command("inspectdb", "djtest_app_loginfailure", stdout=(out := io.StringIO()))
    assert "class DjtestAppLoginfailure(models.Model):" in out.getvalue()
    call_command("check", databases=[DEFAULT_DB_ALIAS])

    # Schema changes, both ways, on the other alias's database.
    call_command("migrate", "djtest_app", "zero", database="other", verbosity=0)
    assert "djtest_app_item" not in connections["other"].introspection.table_names()
    call_command("migrate", "djtest_app", database="other", verbosity=0)
    assert "djtest_app_item" in connections["other"].introspection.table_names()


# -- test databases ------------------------------------------------------------------------


@pytest.fixture
def scratch(djadmin: psycopg2.extensions.connection) -> Iterator[str]:
    """A database alias of its own, with no test database yet (none left behind either)."""
    alias = "scratch"
    server = {key: settings.DATABASES["default"][key] for key in ("HOST", "PORT", "USER")}
    config = {
        "ENGINE": "wsgi_pgconn.django",
        "NAME": "wsgi_pgconn_django_scratch",
        "PASSWORD": settings.DATABASES["default"]["PASSWORD"],
        **server,
    }
    # configure_settings fills in Django's defaults (and insists on a "default").
    configured = connections.configure_settings(
        {DEFAULT_DB_ALIAS: dict(settings.DATABASES[DEFAULT_DB_ALIAS]), alias: config}
    )
    connections.settings[alias] = configured[alias]
    try:
        yield alias
    finally:
        connections[alias].close()
        del connections[alias]
        del connections.settings[alias]
        query(djadmin, "DROP DATABASE IF EXISTS test_wsgi_pgconn_django_scratch WITH (FORCE)")


def middleware_sessions(djadmin: psycopg2.extensions.connection, dbname: str) -> int:
    """Sessions on ``dbname`` with the application_name wsgi_pgconn gives its connections."""
    rows = query(
        djadmin,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
        "AND application_name LIKE 'wsgi\\_pgconn[%%'",
        dbname,
    )
    return int(rows[0][0])


def database_exists(djadmin: psycopg2.extensions.connection, dbname: str) -> bool:
    return bool(query(djadmin, "SELECT 1 FROM pg_database WHERE datname = %s", dbname))


def test_the_test_database_is_dropped_while_the_middleware_holds_connections(
    scratch: str, djadmin: psycopg2.extensions.connection
) -> None:
    creation = connections[scratch].creation
    old_name = connections[scratch].settings_dict["NAME"]
    test_name = creation.create_test_db(verbosity=0, autoclobber=True)
    assert test_name == "test_wsgi_pgconn_django_scratch"
    middleware = DjangoPgConnMiddleware(pid_app, alias=scratch, scope="pool", pool_size=2)
    try:
        TestApp(middleware).get("/")
        # Connected to the database the settings name now: the test database.
        assert database_dsn(scratch).count(f"dbname={test_name}") == 1
        assert middleware_sessions(djadmin, test_name) == 1
        creation.destroy_test_db(old_name, verbosity=0)
    finally:
        middleware.close()
    assert not database_exists(djadmin, test_name)


@pytest.mark.slow  # PostgreSQL waits 5 s for the other session before DROP DATABASE fails
def test_without_the_adapter_a_held_connection_blocks_the_drop(
    scratch: str, djadmin: psycopg2.extensions.connection, pg: Any
) -> None:
    """The control case: a middleware Django cannot close keeps the test database alive."""
    creation = connections[scratch].creation
    old_name = connections[scratch].settings_dict["NAME"]
    test_name = creation.create_test_db(verbosity=0, autoclobber=True)
    middleware = PgConnMiddleware(pid_app, dsn=pg.dsn(dbname=test_name))
    try:
        TestApp(middleware).get("/")
        with pytest.raises(OperationalError, match="is being accessed by other users"):
            creation.destroy_test_db(old_name, verbosity=0)
    finally:
        middleware.close()
    creation.destroy_test_db(old_name, verbosity=0)
    assert not database_exists(djadmin, test_name)


# -- the driver ------------------------------------------------------------------------------


PROBE = textwrap.dedent(
    """
    import django
    from django.conf import settings

    settings.configure(DATABASES={"default": {"ENGINE": "wsgi_pgconn.django", "NAME": "x"}})
    django.setup()
    from django.db import connections

    print("loaded", connections["default"].vendor, type(connections["default"]).__module__)
    """
)


def run_probe(tmp_path: Path, *extra_path: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_path), str(REPO)])
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- building the middleware ---------------------------------------------------------------


def test_the_helper_checks_its_arguments_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsgi_pgconn import ConfigurationError

    monkeypatch.setenv("DATABASE_URL", "not a connection string")  # not the helper's concern
    with pytest.raises(ConfigurationError, match=r"alias of WSGI_PGCONN_SCOPE\)='everywhere'"):
        DjangoPgConnMiddleware(pid_app, scope="everywhere")
    with pytest.raises(TypeError, match="takes its connection string from"):
        DjangoPgConnMiddleware(pid_app, dsn="dbname=x")
    DjangoPgConnMiddleware(pid_app, scope="pool", pool_size=2).close()


def test_the_helper_needs_the_adapters_engine() -> None:
    from django.core.exceptions import ImproperlyConfigured

    options = connections["other"].settings_dict
    engine = options["ENGINE"]
    connections["other"].close()
    del connections["other"]
    options["ENGINE"] = "django.db.backends.postgresql"
    try:
        middleware = DjangoPgConnMiddleware(pid_app, alias="other")
        with pytest.raises(ImproperlyConfigured, match=r"set it to 'wsgi_pgconn\.django'"):
            TestApp(middleware).get("/")
    finally:
        connections["other"].close()
        del connections["other"]
        options["ENGINE"] = engine
