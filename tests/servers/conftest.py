"""Fixtures for the real-server tests: mod_wsgi-express and gunicorn serving the Flask example.

The servers come from the venv that ``.ci/install-servers.sh`` builds
(``$WSGI_PGCONN_SERVER_VENV``, default ``/opt/wsgi-pgconn-servers``).  When
they are missing the tests fail naming that script; outside CI (``CI``
unset) they are skipped instead.

The code served is a world-readable copy of this checkout (the package and
examples/flask), so the daemon user of mod_wsgi can read it wherever the
checkout lives.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from _serverkit import TABLE, PendingRequests, Probe

from wsgi_pgconn.tooling.bench import servers

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flask"
INSTALL = "bash .ci/install-servers.sh"


def missing(what: str) -> None:
    message = (
        f"{what} not found: run `{INSTALL}` (it installs apache2/apache2-dev, wrk, pgbouncer and "
        f"a venv with mod_wsgi, gunicorn, flask and psycopg2 at {servers.server_venv()}; "
        "WSGI_PGCONN_SERVER_VENV names another venv)"
    )
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def mod_wsgi_available() -> None:
    if servers.mod_wsgi_express() is None:
        missing("mod_wsgi-express")
    python = servers.venv_python()
    if not (servers.python_has(python, "flask") and servers.python_has(python, "psycopg2")):
        missing("flask/psycopg2 in the servers' venv")


@pytest.fixture(scope="session")
def gunicorn_available() -> None:
    python = servers.gunicorn_python()
    if python is None:
        missing("gunicorn")
    if not (servers.python_has(python, "flask") and servers.python_has(python, "psycopg2")):
        missing("flask/psycopg2 beside gunicorn")


@pytest.fixture(scope="session")
def served_tree() -> Iterator[str]:
    """World-readable copy of the package and the Flask example (as ``flask_example``)."""
    root = servers.stage([servers.package_dir(), (str(EXAMPLE), "flask_example")])
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def servers_db(pg: Any) -> Iterator[str]:
    """A database of its own for the server tests, with the example's table."""
    name = "wsgi_pgconn_srv_" + uuid.uuid4().hex[:8]
    _admin(pg, f'CREATE DATABASE "{name}"')
    setup = psycopg2.connect(pg.dsn(tcp=False, dbname=name, application_name="servers-admin"))
    try:
        with setup.cursor() as cur:
            cur.execute(
                f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, name text NOT NULL,"
                " created timestamptz NOT NULL DEFAULT now())"
            )
        setup.commit()
    finally:
        setup.close()
    yield name
    # A fresh connection: other suites restart the server during the session.
    _admin(pg, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(pg: Any, statement: str) -> None:
    conn = psycopg2.connect(pg.dsn(tcp=False, application_name="servers-admin"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def probe(pg: Any, servers_db: str) -> Iterator[Probe]:
    p = Probe(pg.dsn(tcp=False, dbname=servers_db, application_name="servers-probe"))
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def pending() -> Iterator[Callable[[int], PendingRequests]]:
    made: list[PendingRequests] = []

    def make(port: int) -> PendingRequests:
        p = PendingRequests(port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def app_dsn(pg: Any, servers_db: str) -> Callable[..., str]:
    """TCP + password connection string to the servers' database, tagged ``app_name``."""

    def make(app_name: str, **params: str) -> str:
        dsn: str = pg.dsn(tcp=True, dbname=servers_db, application_name=app_name, **params)
        return dsn

    return make


@pytest.fixture
def run_server(probe: Probe) -> Iterator[Callable[[servers.Server, str], servers.Server]]:
    """Start a server; at teardown stop it and wait until its connections have left."""
    started: list[tuple[servers.Server, str]] = []

    def start(server: servers.Server, app_name: str) -> servers.Server:
        started.append((server, app_name))
        server.start(ready_path="/health", ready_status=200, timeout=30)
        return server

    yield start
    for server, app_name in started:
        server.stop()
        try:
            probe.wait_for(f"{server.name}'s connections to close", probe.none_of(app_name), 15)
        finally:
            server.cleanup()
