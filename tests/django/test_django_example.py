"""examples/django, run the way its README says: manage.py migrate, shell, test, runserver,
and mod_wsgi-express in daemon mode.

Each command runs in a subprocess with the example's own settings, which
read DATABASE_URL: here a database of its own on the run's server.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from djtest_helpers import query

from wsgi_pgconn.tooling.bench import servers

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "django"
SECRET = "example-tests-secret"

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def example_db(pg: Any) -> Iterator[str]:
    """A fresh database for the example (dropped at the end); its name."""
    name = "wsgi_pgconn_example_" + uuid.uuid4().hex[:8]
    admin = psycopg2.connect(pg.dsn(dbname="postgres", application_name="example-admin"))
    admin.autocommit = True
    try:
        query(admin, f'CREATE DATABASE "{name}"')
        yield name
        query(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        query(admin, f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="module")
def example_env(pg: Any, example_db: str) -> dict[str, str]:
    """The process environment the README's commands run with."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DJANGO_SETTINGS_MODULE", "DATABASE_URL")
        and not key.startswith(("WSGI_PGCONN_", "PYTEST_"))
    }
    env.update(
        DATABASE_URL=pg.dsn(dbname=example_db),
        DJANGO_SECRET_KEY=SECRET,
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def manage(example_env: dict[str, str]) -> Run:
    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=EXAMPLE,
            env=example_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    return run


@pytest.fixture(scope="module")
def migrated(manage: Run) -> str:
    result = manage("migrate")
    assert "Applying notes.0001_initial... OK" in result.stdout
    return result.stdout


@pytest.fixture
def db(pg: Any, example_db: str) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(pg.dsn(dbname=example_db, application_name="example-check"))
    conn.autocommit = True
    query(conn, "TRUNCATE notes_note, notes_audit")
    try:
        yield conn
    finally:
        conn.close()


def test_migrate_and_management_commands(
    migrated: str, manage: Run, db: psycopg2.extensions.connection
) -> None:
    assert "[X] 0001_initial" in manage("showmigrations", "notes").stdout
    assert "No migrations to apply" in manage("migrate").stdout
    # The adapter's checks ran (INSTALLED_APPS) and found wsgi.py wrapped.
    assert "System check identified no issues" in manage("check", "--tag", "wsgi_pgconn").stdout
    code = "from notes.models import Note; Note.objects.create(title='from shell')"
    manage("shell", "-c", code)
    # Outside requests: Django's autocommit, as with its own backend.
    assert query(db, "SELECT title FROM notes_note") == [("from shell",)]


def test_the_examples_own_test_suite(migrated: str, manage: Run, example_db: str) -> None:
    """Django's test runner: test client, full WSGI stack, test database dropped at the end."""
    result = manage("test", "notes", "--noinput", "-v", "2")
    assert "Ran 6 tests" in result.stderr
    assert result.stderr.rstrip().endswith(
        f"Destroying test database for alias 'default' ('test_{example_db}')..."
    )


# -- serving ---------------------------------------------------------------------------


def request(port: int, path: str, data: dict[str, str] | None = None) -> tuple[int, bytes]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, data=body, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def exercise(port: int, db: psycopg2.extensions.connection) -> list[int]:
    """The example's views over HTTP; the backend pids that served the creates."""
    pids = []
    for title in ("one", "two", "three"):
        status, body = request(port, "/notes/", {"title": title})
        assert status == 201, body
        pids.append(json.loads(body)["pid"])
    status, _ = request(port, "/notes/failing", {"title": "doomed"})
    assert status == 500
    status, body = request(port, "/notes/export.csv")
    assert status == 200
    assert [line.split(",")[1] for line in body.decode().splitlines()[1:]] == [
        "one",
        "two",
        "three",
    ]
    assert query(db, "SELECT title FROM notes_note ORDER BY id") == [
        ("one",),
        ("two",),
        ("three",),
    ]
    assert query(db, "SELECT action, title FROM notes_audit ORDER BY id") == [
        ("create", "one"),
        ("create", "two"),
        ("create", "three"),
        ("export", "3 notes"),
    ]
    return pids


def wait_for_output(proc: subprocess.Popen[bytes], text: bytes, timeout: float = 30) -> bytes:
    """Read the process's output (unbuffered) until it contains ``text``; all that was read."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while text not in seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"no {text!r} within {timeout} s:\n{seen.decode()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"exited before {text!r}:\n{seen.decode()}")
            seen += chunk
    return seen


def test_the_development_server(
    migrated: str, example_env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    """runserver serves WSGI_APPLICATION (the middleware).

    runserver starts a thread per request; wsgi_pgconn recognises it at the
    first request and, the scope being unset, uses the pool scope: one
    connection serves the sequential requests (thread scope would open one
    per request).
    """
    port = servers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=EXAMPLE,
        env=example_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    started = b""
    try:
        started = wait_for_output(proc, b"Quit the server with")
        pids = exercise(port, db)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    output = (started + rest).decode()
    assert len(set(pids)) == 1, pids  # kept between requests, though each has its thread
    assert "note 'three' committed" in output  # the on_commit callback's log line
    assert "RuntimeError: something went wrong after the writes" in output


def test_mod_wsgi_daemon_mode(
    migrated: str, example_env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    python = servers.venv_python()
    if servers.mod_wsgi_express() is None or not servers.python_has(python, "django"):
        message = (
            "mod_wsgi-express with Django not found in the servers' venv "
            f"({servers.server_venv()}): run bash .ci/install-servers.sh"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tree = servers.stage([servers.package_dir(), (str(EXAMPLE), "example")])
    env = {key: value for key, value in example_env.items() if key != "PYTHONPATH"}
    server = servers.mod_wsgi_server(
        f"{tree}/example/notesite/wsgi.py",
        processes=2,
        threads=2,
        python_path=[tree, f"{tree}/example"],
        env=env,
        name="mod_wsgi-django",
    )
    try:
        server.start(ready_path="/notes/", ready_status=200)
        pids = exercise(server.port, db)
        pids += [
            json.loads(request(server.port, "/notes/", {"title": f"n{n}"})[1])["pid"]
            for n in range(8)
        ]
        sessions = query(
            db,
            "SELECT pid, state FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE 'wsgi\\_pgconn[%%'",
        )
    finally:
        server.cleanup()
        shutil.rmtree(tree, ignore_errors=True)
    # Persistent connections: at most one per daemon thread, reused.
    assert len(set(pids)) <= 4
    assert 0 < len(sessions) <= 4
    assert all(state == "idle" for _, state in sessions), sessions
