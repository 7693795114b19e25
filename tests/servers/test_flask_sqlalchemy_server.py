"""The Flask-SQLAlchemy example (examples/flask-sqlalchemy) under gunicorn gthread.

Concurrent ORM writes that succeed (201) and that fail after
``db.session.commit()`` (500), streams and pages; then the ledger: every 2xx
write is in the table exactly once, nothing of a 5xx one is. The engine's
own connections carry another application_name than the middleware's: none
may appear while requests are served. The servers' venv runs psycopg2 (both
drivers are covered in-process by tests/sqlalchemy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from _serverkit import Probe, server_env

from wsgi_pgconn.tooling.bench import servers

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "flask-sqlalchemy"
TABLE = "example_sa_item"


def driver() -> str:
    """psycopg2: the servers' venv has no psycopg 3 (the drivers are compared in-process)."""
    return "psycopg2"


@pytest.fixture(scope="module")
def fsa_tree(gunicorn_available: None) -> Iterator[str]:
    """World-readable copy of the package and the example (as ``fsa_example``)."""
    python = servers.gunicorn_python()
    for module in ("flask_sqlalchemy", driver()):
        if not servers.python_has(python, module):
            pytest.fail(
                f"{module} is missing beside gunicorn: run `bash .ci/install-servers.sh`",
                pytrace=False,
            )
    root = servers.stage([servers.package_dir(), (str(EXAMPLE), "fsa_example")])
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fsa_table(pg: Any, servers_db: str) -> str:
    """The example's table, created by the example itself (outside requests)."""
    dsn = pg.dsn(tcp=False, dbname=servers_db, application_name="servers-admin")
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", str(EXAMPLE / "app.py"), "init-db"],
        env={**os.environ, "DATABASE_URL": dsn, "WSGI_PGCONN_DRIVER": driver()},
        check=True,
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    return TABLE


def post(port: int, path: str, form: dict[str, str]) -> tuple[int, bytes]:
    body = "&".join(f"{k}={v}" for k, v in form.items()).encode()
    status, _, payload = servers.http_get(
        port,
        path,
        timeout=30,
        method="POST",
        body=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    return status, payload


def test_gunicorn_gthread_ledger(
    gunicorn_available: None,
    fsa_tree: str,
    fsa_table: str,
    app_dsn: Any,
    probe: Probe,
    run_server: Any,
) -> None:
    app_name = "fsa-" + uuid.uuid4().hex[:10]
    sa_name = app_name + "-sa"
    sa_uri = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from wsgi_pgconn.sqlalchemy import engine_url; "
            "print(engine_url(sys.argv[1], driver=sys.argv[2])"
            ".render_as_string(hide_password=False))",
            app_dsn(sa_name),
            driver(),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.strip()
    server = run_server(
        servers.gunicorn_server(
            "wsgi:application",
            workers=2,
            threads=4,
            worker_class="gthread",
            python_path=[fsa_tree + "/fsa_example", fsa_tree],
            env=server_env(
                app_dsn(app_name),
                SQLALCHEMY_DATABASE_URI=sa_uri,
                WSGI_PGCONN_DRIVER=driver(),
            ),
            name="gunicorn-gthread-fsa",
        ),
        app_name,
    )
    port = server.port
    prefix = app_name + "-"

    def write(i: int) -> tuple[str, int, bytes]:
        name = f"{prefix}{i}"
        status, payload = post(port, "/fail" if i % 4 == 3 else "/items", {"name": name})
        return name, status, payload

    def stream(n: int) -> tuple[int, bytes]:
        status, _, payload = servers.http_get(port, f"/stream?n={n}", timeout=30)
        return status, payload

    with ThreadPoolExecutor(max_workers=8) as pool:
        writes = [pool.submit(write, i) for i in range(80)]
        streams = [pool.submit(stream, 300 + i) for i in range(4)]
        pages = [pool.submit(servers.http_get, port, "/", 30) for _ in range(16)]
        written = [f.result() for f in writes]
        streamed = [(300 + i, f.result()) for i, f in enumerate(streams)]
        paged = [f.result() for f in pages]

    committed = []
    for name, status, payload in written:
        if status == 201:
            assert json.loads(payload)["name"] == name
            committed.append(name)
        else:
            assert status == 500, payload[:300]
    assert len(committed) == 60
    for n, (status, payload) in streamed:
        assert status == 200
        assert payload.decode().splitlines() == [*map(str, range(1, n + 1)), "end"]
    for status, _, payload in paged:
        assert status == 200, payload[:300]
        assert b"items</h1>" in payload

    rows = [
        n for (n,) in probe.rows(f"SELECT name FROM {TABLE} WHERE starts_with(name, %s)", prefix)
    ]
    assert sorted(rows) == sorted(committed)  # each 201 once; no 500 row, ORM or raw
    assert probe.count(sa_name) == 0  # the engine opened no connection of its own
    backends = probe.backends(app_name)
    assert 0 < len(backends) <= 2 * 4
    probe.wait_for(
        f"{app_name}'s connections to be idle",
        lambda: all(state == "idle" for _, state, _ in probe.backends(app_name)),
        timeout=10,
    )
