"""The Flask-SQLAlchemy example (examples/flask-sqlalchemy) under Flask's test client.

The same checks run under gunicorn in tests/servers/test_flask_sqlalchemy_server.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sa_helpers import driver_name
from test_core_helpers import backends, idle_in_transaction, query

from wsgi_pgconn.tempdb import BINDIR_ENV
from wsgi_pgconn.tooling.bench.servers import free_port, http_get

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask-sqlalchemy" / "app.py"


def load_example() -> ModuleType:
    name = "wsgi_pgconn_fsa_example"
    if name in sys.modules:  # one module: its models are declared once
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example(
    dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch, pg: Any, test_db: str
) -> Iterator[tuple[ModuleType, Any]]:
    module = load_example()
    module.init_db(dsn)
    sa_dsn = pg.dsn(dbname=test_db, application_name=app_name + "-sa")
    monkeypatch.setenv(
        "SQLALCHEMY_DATABASE_URI",
        module.engine_url(sa_dsn, driver=driver_name()).render_as_string(hide_password=False),
    )
    monkeypatch.setenv("WSGI_PGCONN_DRIVER", driver_name())
    app = module.create_app(dsn, scope="thread")
    try:
        yield module, app
    finally:
        app.wsgi_app.close()
        with app.app_context():
            module.db.engine.dispose()


def names(admin: Any, prefix: str) -> list[str]:
    return [
        n
        for (n,) in query(
            admin,
            "SELECT name FROM example_sa_item WHERE starts_with(name, %s) ORDER BY id",
            prefix,
        )
    ]


def test_pages(example: tuple[ModuleType, Any], admin: Any, app_name: str) -> None:
    _, app = example
    client = app.test_client()
    prefix = app_name + "-"

    created = client.post("/items", json={"name": prefix + "a"})
    assert created.status_code == 201
    assert created.json["name"] == prefix + "a"
    assert client.post("/items", data={"name": prefix + "b"}).status_code == 201
    assert client.post("/items", json={}).status_code == 400

    assert client.post("/fail", data={"name": prefix + "lost"}).status_code == 500
    assert names(admin, prefix) == [prefix + "a", prefix + "b"]  # neither /fail row

    renamed = client.post("/rename", data={"old": prefix + "a", "new": prefix + "b"})
    assert renamed.status_code == 409
    assert client.post("/rename", data={"old": prefix + "a", "new": prefix + "c"}).json == {
        "renamed": prefix + "a"
    }
    assert names(admin, prefix) == [prefix + "c", prefix + "b"]

    listed = [i["name"] for i in client.get("/items").json["items"]]
    assert [n for n in listed if n.startswith(prefix)] == [prefix + "c", prefix + "b"]

    page = client.get("/")
    assert page.status_code == 200
    assert b"items</h1>" in page.data

    lines = client.get("/stream?n=450").get_data(as_text=True).splitlines()
    assert lines == [*map(str, range(1, 451)), "end"]

    assert client.get("/health").json == {"ok": True, "database": False}
    assert backends(admin, app_name + "-sa") == []  # the engine opened nothing of its own
    assert len(backends(admin, app_name)) == 1
    assert idle_in_transaction(admin) == []


def test_ledger(example: tuple[ModuleType, Any], admin: Any, app_name: str) -> None:
    """Every 2xx write is in the table once; nothing of a 5xx one is."""
    _, app = example
    client = app.test_client()
    prefix = app_name + "-"
    answered: dict[str, int] = {}
    for i in range(60):
        name = f"{prefix}{i}-{uuid.uuid4().hex[:6]}"
        path = "/fail" if i % 3 == 2 else "/items"
        response = client.post(path, data={"name": name})
        answered[name] = response.status_code
        if response.status_code == 201:
            assert json.loads(response.data)["name"] == name
    rows = names(admin, prefix)
    assert sorted(rows) == sorted(n for n, code in answered.items() if code == 201)
    assert len(rows) == len(set(rows))
    assert sorted(set(answered.values())) == [201, 500]


@pytest.mark.cluster_only("runs the example on a throwaway cluster of its own")
def test_one_command_run_with_embedded_cluster(tmp_path: Path) -> None:
    """``python examples/flask-sqlalchemy/app.py`` with DATABASE_URL unset starts a cluster."""
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "SQLALCHEMY_DATABASE_URI")
        and (k in (BINDIR_ENV, "WSGI_PGCONN_DRIVER") or not k.startswith("WSGI_PGCONN_"))
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
                except OSError:  # not listening yet
                    assert time.monotonic() < deadline, err.read_text()
                    time.sleep(0.1)
            assert status == 201, body
            assert http_get(port, "/fail", method="POST")[0] == 500
            assert json.loads(http_get(port, "/items")[2])["items"][0]["name"] == "x"
            assert len(json.loads(http_get(port, "/items")[2])["items"]) == 1
        finally:
            proc.terminate()
            proc.wait(30)
    text = err.read_text()
    assert "DATABASE_URL is unset" in text
    assert proc.returncode == 128 + 15  # SIGTERM handled: the cluster was removed
