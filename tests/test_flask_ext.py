"""The Flask extension (wsgi_pgconn.flask): configuration from app.config, get_connection(),
Flask's test client (streamed responses, unclosed responses), Flask-SQLAlchemy on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import flask
import pytest
import sqlalchemy
from flask.testing import FlaskClient
from flask_sqlalchemy import SQLAlchemy
from test_core_helpers import (  # noqa: F401 - clean_env_fixture is a pytest fixture
    backends,
    clean_env_fixture,
    idle_in_transaction,
    query,
)

from wsgi_pgconn import ConfigurationError, PgConnMiddleware, drivers
from wsgi_pgconn.flask import EXTENSION_KEY, PgConn, get_connection, settings_from_config
from wsgi_pgconn.sqlalchemy import engine_options


def driver() -> str:
    return drivers.resolve(os.environ.get("WSGI_PGCONN_DRIVER") or "auto")


@pytest.fixture
def apps() -> Iterator[Callable[..., flask.Flask]]:
    """Flask apps with PgConn(app, **options); their connections are closed afterwards."""
    made: list[flask.Flask] = []

    def make(config: dict[str, Any] | None = None, **options: Any) -> flask.Flask:
        app = flask.Flask(__name__)
        app.config.update(config or {})
        PgConn(app, **options)
        made.append(app)
        return app

    yield make
    for app in made:
        PgConn.middleware(app).close()


def insert_app(apps: Callable[..., flask.Flask], dsn: str, table: str) -> flask.Flask:
    app = apps({"DATABASE_URL": dsn, "WSGI_PGCONN_SCOPE": "thread"})

    def insert(key: str) -> None:
        with get_connection().cursor() as cur:
            cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (key,))

    @app.get("/ok/<key>")
    def ok(key: str) -> str:
        insert(key)
        return "ok"

    @app.get("/raise/<key>")
    def fail(key: str) -> str:
        insert(key)
        raise RuntimeError("the view failed")

    @app.get("/stream/<key>")
    def stream(key: str) -> flask.Response:
        insert(key + "-view")

        @flask.stream_with_context
        def body() -> Iterator[str]:
            yield "a"
            insert(key + "-body")  # after the view's COMMIT: committed when closed
            yield "b"

        return flask.Response(body())

    return app


def keys(admin: Any, table: str) -> list[str]:
    return [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")]


# -- configuration ------------------------------------------------------------------------


def test_settings_from_app_config(clean_env: None, dsn: str) -> None:
    app = flask.Flask(__name__)
    app.config.update(
        DATABASE_URL=dsn,
        WSGI_PGCONN_SCOPE="pool",
        WSGI_PGCONN_POOL_SIZE=3,  # not a string: fine in app.config
        WSGI_PGCONN_MAX_AGE="none",
        WSGI_PGCONN_EXEMPT_PATHS=["/health"],
        WSGI_PGCONN_CHECK="",  # empty: unset
        OTHER="ignored",
    )
    PgConn(app, pool_timeout=2)
    settings = PgConn.middleware(app).settings
    assert (settings.dsn, settings.scope, settings.pool_size) == (dsn, "pool", 3)
    assert (settings.max_age, settings.exempt_paths, settings.pool_timeout) == (
        None,
        ("/health",),
        2.0,
    )
    assert settings.check == "socket"
    assert isinstance(app.extensions[EXTENSION_KEY], PgConnMiddleware)


def test_precedence(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PGCONN_SCOPE", "process")
    monkeypatch.setenv("WSGI_PGCONN_POOL_SIZE", "7")
    monkeypatch.setenv("WSGI_PGCONN_MAX_AGE", "60")
    app = flask.Flask(__name__)
    app.config.update(WSGI_PGCONN_SCOPE="pool", WSGI_PGCONN_MAX_AGE="none")
    PgConn(app, scope="thread")
    settings = PgConn.middleware(app).settings
    assert settings.scope == "thread"  # keyword > app.config > environment
    assert settings.max_age is None  # app.config's "none" beats the environment
    assert settings.pool_size == 7


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("WSGI_PGCONN_SCOPE", "threads", "expected one of"),
        ("WSGI_PGCONN_POOL_SIZE", 0, "greater than 0"),
        ("WSGI_PGCONN_STATEMENT_TIMEOUT", "5 parsecs", "duration"),
        ("DATABASE_URL", 42, "must be a string"),
    ],
)
def test_bad_values_name_the_config_key(key: str, value: Any, accepted: str) -> None:
    with pytest.raises(ConfigurationError, match=accepted) as raised:
        settings_from_config({key: value})
    assert f"app.config[{key!r}]" in str(raised.value)
    app = flask.Flask(__name__)
    app.config[key] = value
    with pytest.raises(ConfigurationError, match=key):
        PgConn(app)


def test_database_url_from_sqlalchemy_uri(clean_env: None) -> None:
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = "postgresql+psycopg2://u:p%40ss@db.example:5433/app"
    PgConn(app)
    params = drivers.load().parse_conninfo(PgConn.middleware(app).settings.dsn)
    assert params == {
        "user": "u",
        "password": "p@ss",
        "host": "db.example",
        "port": "5433",
        "dbname": "app",
    }
    other = flask.Flask(__name__)
    other.config["SQLALCHEMY_DATABASE_URI"] = "sqlite:///x.db"
    PgConn(other)
    assert PgConn.middleware(other).settings.dsn == ""


def test_init_app_twice_and_unknown_arguments() -> None:
    app = flask.Flask(__name__)
    ext = PgConn()
    ext.init_app(app)
    with pytest.raises(RuntimeError, match="already installed"):
        ext.init_app(app)
    with pytest.raises(TypeError, match="sope"):
        PgConn(sope="thread")


# -- requests -------------------------------------------------------------------------------


def test_commit_and_rollback(
    apps: Callable[..., flask.Flask], dsn: str, table: str, admin: Any
) -> None:
    client = insert_app(apps, dsn, table).test_client()
    assert client.get("/ok/a").status_code == 200
    assert client.get("/raise/b").status_code == 500
    assert client.get("/ok/c").status_code == 200
    assert keys(admin, table) == ["a", "c"]


def test_get_connection_outside_the_middleware() -> None:
    app = flask.Flask(__name__)
    errors: list[BaseException] = []

    @app.get("/")
    def view() -> str:
        try:
            get_connection()
        except LookupError as exc:
            errors.append(exc)
        return ""

    app.test_client().get("/")
    assert "PgConnMiddleware" in str(errors[0])


def test_streamed_responses_with_the_test_client(
    apps: Callable[..., flask.Flask], dsn: str, table: str, admin: Any, app_name: str
) -> None:
    """Read and closed by default: the body's work is committed, the connection given back."""
    client = insert_app(apps, dsn, table).test_client()
    for key in ("x", "y"):
        response = client.get(f"/stream/{key}")
        assert response.data == b"ab"
    assert keys(admin, table) == ["x-view", "x-body", "y-view", "y-body"]
    assert [state for _, state in backends(admin, app_name)] == ["idle"]
    assert idle_in_transaction(admin) == []


def test_unbuffered_response_closed_by_a_with_block(
    apps: Callable[..., flask.Flask], dsn: str, table: str, admin: Any
) -> None:
    client = insert_app(apps, dsn, table).test_client()
    with client.get("/stream/x", buffered=False) as response:
        assert response.status_code == 200
        assert keys(admin, table) == ["x-view"]  # committed before the status was sent
        assert b"".join(response.response) == b"ab"
    assert keys(admin, table) == ["x-view", "x-body"]
    assert client.get("/ok/z").status_code == 200


def test_unbuffered_response_left_open(
    apps: Callable[..., flask.Flask], dsn: str, table: str, admin: Any
) -> None:
    """The next request on the thread says what to do instead of hanging or failing vaguely."""
    client = insert_app(apps, dsn, table).test_client()
    response = client.get("/stream/x", buffered=False)
    with pytest.raises(RuntimeError, match=r"buffered=False\) as response:") as raised:
        client.get("/ok/z")
    assert "buffered=True" in str(raised.value)
    with pytest.raises(RuntimeError, match="never closed"):
        client.get("/ok/z")  # still open: still refused
    response.close()
    assert client.get("/ok/z").status_code == 200
    assert keys(admin, table) == ["x-view", "z"]  # the unread body's work was rolled back


def test_a_forgotten_response_is_collected(
    apps: Callable[..., flask.Flask], dsn: str, table: str, admin: Any
) -> None:
    client = insert_app(apps, dsn, table).test_client()
    client.get("/stream/x", buffered=False)  # not kept: garbage once the cycle is collected
    assert client.get("/ok/z").status_code == 200
    assert keys(admin, table) == ["x-view", "z"]


def test_own_test_client_class_kept(clean_env: None) -> None:
    class MyClient(FlaskClient):
        marker = True

    app = flask.Flask(__name__)
    app.test_client_class = MyClient
    PgConn(app)
    client = app.test_client()
    assert isinstance(client, MyClient)
    assert client.open.__func__.__qualname__.startswith("_BufferedClient")  # type: ignore[attr-defined]


# -- Flask-SQLAlchemy --------------------------------------------------------------------------


@pytest.fixture
def fsa_app(
    pg: Any, test_db: str, app_name: str, table: str
) -> Iterator[tuple[flask.Flask, SQLAlchemy, Any]]:
    """Flask-SQLAlchemy on the request's connection: (app, db, Item model)."""
    dsn = pg.dsn(dbname=test_db, application_name=app_name)
    url = sqlalchemy.engine.make_url(pg.url(dbname=test_db, application_name=app_name + "-sa")).set(
        drivername=f"postgresql+{driver()}"
    )
    app_config = {
        "DATABASE_URL": dsn,
        "SQLALCHEMY_DATABASE_URI": url,
        "SQLALCHEMY_ENGINE_OPTIONS": engine_options(),
    }
    db = SQLAlchemy()

    class Item(db.Model):  # type: ignore[name-defined, misc]
        __tablename__ = table
        id = sqlalchemy.Column(sqlalchemy.Integer, primary_key=True)
        k = sqlalchemy.Column(sqlalchemy.Text)
        pos = sqlalchemy.Column(sqlalchemy.Integer, nullable=False, default=1)

    app = flask.Flask(__name__)
    app.config.update(app_config)
    db.init_app(app)
    PgConn(app)

    @app.post("/items/<key>")
    def add(key: str) -> tuple[str, int]:
        db.session.add(Item(k=key))
        db.session.commit()
        if flask.request.args.get("then") == "raise":
            raise RuntimeError("after the commit")
        return key, 201

    @app.get("/pids")
    def pids() -> str:
        orm = db.session.scalar(sqlalchemy.text("SELECT pg_backend_pid()"))
        return f"{orm} {get_connection().info.backend_pid}"

    yield app, db, Item
    PgConn.middleware(app).close()
    with app.app_context():
        db.engine.dispose()


def test_flask_sqlalchemy(
    fsa_app: tuple[flask.Flask, SQLAlchemy, Any], admin: Any, table: str, app_name: str
) -> None:
    app, _db, _item = fsa_app
    client = app.test_client()
    assert client.post("/items/a").status_code == 201
    assert client.post("/items/b?then=raise").status_code == 500  # committed, then failed
    assert client.post("/items/c").status_code == 201
    assert keys(admin, table) == ["a", "c"]
    pairs = {client.get("/pids").text for _ in range(20)}
    (pair,) = pairs
    orm, raw = pair.split()
    assert orm == raw
    assert [pid for pid, _ in backends(admin, app_name)] == [int(raw)]
    assert backends(admin, app_name + "-sa") == []  # no connection of SQLAlchemy's own
    assert idle_in_transaction(admin) == []


def test_misspelt_app_config_keys_are_reported(
    apps: Callable[..., flask.Flask], dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from test_core_helpers import formatted, log_records

    from wsgi_pgconn import config

    monkeypatch.setattr(config, "_warned", set())
    misspelt = config.ENV_PREFIX + "POOLSIZE"  # kept apart: tests/test_tooling.py lists names
    with log_records(logging.WARNING) as records:
        apps({"DATABASE_URL": dsn, misspelt: 8})
    (line,) = formatted(records)
    assert f"in app.config: {misspelt} (did you mean WSGI_PGCONN_POOL_SIZE?)" in line
    with pytest.raises(ConfigurationError, match=f"in app.config: {misspelt}"):
        apps({"DATABASE_URL": dsn, misspelt: 8, "WSGI_PGCONN_STRICT": True})
