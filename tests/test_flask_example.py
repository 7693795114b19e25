"""The Flask example (examples/flask/app.py) in-process, through werkzeug's test client."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from wsgi_pgconn.tooling.bench.servers import free_port, http_get
from wsgi_pgconn.tooling.tempdb import BINDIR_ENV

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flask" / "app.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wsgi_pgconn_flask_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example(dsn: str) -> Iterator[tuple[ModuleType, Any]]:
    module = load_example()
    module.init_db(dsn)
    app = module.create_app(dsn, scope="thread")
    try:
        yield module, app
    finally:
        app.wsgi_app.close()


def names(admin: Any, prefix: str) -> list[str]:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT name FROM example_item WHERE starts_with(name, %s) ORDER BY id", (prefix,)
        )
        return [n for (n,) in cur.fetchall()]


def test_pages(example: tuple[ModuleType, Any], admin: Any, app_name: str) -> None:
    _, app = example
    client = app.test_client()
    prefix = app_name + "-"
    # buffered=True: the test client then closes each response, as a WSGI
    # server does; an unclosed response would keep this thread's connection.

    created = client.post("/items", json={"name": prefix + "a"}, buffered=True)
    assert created.status_code == 201
    assert created.json["name"] == prefix + "a"
    assert client.post("/items", data={"name": prefix + "b"}, buffered=True).status_code == 201
    assert client.post("/items", json={}, buffered=True).status_code == 400

    failed = client.post("/fail", data={"name": prefix + "rolled-back"}, buffered=True)
    assert failed.status_code == 500
    assert names(admin, prefix) == [prefix + "a", prefix + "b"]  # the /fail row was rolled back

    listed = client.get("/items", buffered=True).json["items"]
    assert [i["name"] for i in listed if i["name"].startswith(prefix)] == [
        prefix + "a",
        prefix + "b",
    ]

    page = client.get("/", buffered=True)
    assert page.status_code == 200
    assert b"items</h1>" in page.data

    with client.get("/stream?n=450") as streamed:
        lines = streamed.get_data(as_text=True).splitlines()
    assert len(lines) == 451
    assert lines[0].startswith("1 ")
    assert lines[-1] == "end"

    health = client.get("/health", buffered=True)
    assert health.json == {"ok": True, "database": False}


@pytest.mark.cluster_only("runs the example on a throwaway cluster of its own")
def test_one_command_run_with_embedded_cluster(tmp_path: Path) -> None:
    """``python examples/flask/app.py`` with DATABASE_URL unset starts a throwaway cluster."""

    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and (k == BINDIR_ENV or not k.startswith("WSGI_PGCONN_"))
    }
    env["PYTHONPATH"] = str(EXAMPLE.parents[2])
    err = tmp_path / "stderr.txt"
    with open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    status, _, body = http_get(
                        port,
                        "/items",
                        timeout=5,
                        method="POST",
                        body=b"name=x",
                        headers={"Content-Type": "application/x-www-form-urlencoded"},
                    )
                    break
                except OSError:
                    assert time.monotonic() < deadline, err.read_text()
                    time.sleep(0.1)
            assert status == 201, body
            assert http_get(port, "/")[0] == 200
        finally:
            proc.terminate()
            proc.wait(30)
    text = err.read_text()
    assert "DATABASE_URL is unset" in text
    assert "throwaway PostgreSQL" in text
    assert proc.returncode == 128 + 15  # SIGTERM handled: the cluster was removed


def test_import_opens_no_connection(
    dsn: str, admin: Any, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wsgi.py-style import (configured from DATABASE_URL) connects only at the first request."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    module = load_example()
    with admin.cursor() as cur:
        cur.execute(module.SCHEMA)
    try:
        assert backends(admin, app_name) == 0
        assert module.app.test_client().get("/", buffered=True).status_code == 200
        assert backends(admin, app_name) == 1
    finally:
        module.app.wsgi_app.close()


def backends(admin: Any, app_name: str) -> int:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        )
        (count,) = cur.fetchone()
    return int(count)


def test_wsgi_entry_point_exposes_application() -> None:
    """examples/flask/wsgi.py (what the servers load) defines ``application``."""
    code = (
        "import runpy, sys; ns = runpy.run_path(sys.argv[1]); "
        "app = ns['application']; print(type(app).__name__, type(app.wsgi_app).__name__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(EXAMPLE.parents[2])
    out = subprocess.run(
        [sys.executable, "-c", code, str(EXAMPLE.parent / "wsgi.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert out.stdout.split() == ["Flask", "PgConnMiddleware"]
