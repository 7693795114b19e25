"""Configuration (issue 2): environment, keyword arguments, the first request's environ,
errors that name the variable, and a password that never shows."""

from __future__ import annotations

import inspect
import logging
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.validate import validator

import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    backends,
    clean_env_fixture,
    formatted,
    log_records,
    query,
    wait_backends_gone,
    webtest,
)

from wsgi_pgconn import ConfigurationError, PgConnMiddleware, get_connection
from wsgi_pgconn.config import SETTINGS
from wsgi_pgconn.tooling.ports import free_port

pytestmark = pytest.mark.usefixtures("clean_env")


def show_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers ``name=value`` lines for the settings named in the query string."""
    conn = get_connection(environ)
    names = [n for n in environ.get("QUERY_STRING", "").split(",") if n]
    lines = []
    for name in names:
        if name == "database":
            (value,) = query(conn, "SELECT current_database()")[0]
        else:
            (value,) = query(conn, "SELECT current_setting(%s)", name)[0]
        lines.append(f"{name}={value}")
    body = "\n".join(lines).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def shown(client: Any, *names: str, **kwargs: Any) -> dict[str, str]:
    text = client.get("/?" + ",".join(names), **kwargs).text
    return dict(line.split("=", 1) for line in text.splitlines())


@pytest.fixture
def env_mw() -> Iterator[Callable[..., tuple[Any, PgConnMiddleware]]]:
    """Like make_mw but without a default dsn: for configuration from the environment."""
    built: list[PgConnMiddleware] = []

    def make(app: Any = show_app, **kwargs: Any) -> tuple[Any, PgConnMiddleware]:
        mw = PgConnMiddleware(validator(app), **kwargs)
        built.append(mw)
        return webtest.TestApp(validator(mw)), mw

    yield make
    for mw in built:
        mw.close()


# -- bad values fail at construction -----------------------------------------------------

BAD_VALUES = [
    ("WSGI_PGCONN_MAX_AGE", "abc", "max_age", "number of seconds"),
    ("WSGI_PGCONN_MAX_AGE", "-5", "max_age", "number of seconds"),
    ("WSGI_PGCONN_MAX_IDLE", "soon", "max_idle", "number of seconds"),
    ("WSGI_PGCONN_SCOPE", "threads", "scope", "'thread', 'process', 'pool'"),
    ("WSGI_PGCONN_ISOLATION_LEVEL", "snapshot", "isolation_level", "'read committed'"),
    ("WSGI_PGCONN_POOL_SIZE", "0", "pool_size", "whole number greater than 0"),
    ("WSGI_PGCONN_POOL_SIZE", "two", "pool_size", "whole number"),
    ("WSGI_PGCONN_POOL_TIMEOUT", "0", "pool_timeout", "number of seconds"),
    ("WSGI_PGCONN_STATEMENT_TIMEOUT", "5 parsecs", "statement_timeout", "milliseconds"),
    ("WSGI_PGCONN_IDLE_IN_TRANSACTION_TIMEOUT", "x", "idle_in_transaction_timeout", "milliseconds"),
    ("WSGI_PGCONN_CONNECT_TIMEOUT", "0", "connect_timeout", "number of seconds"),
    ("WSGI_PGCONN_RESET", "truncate", "reset", "'rollback', 'discard'"),
    ("WSGI_PGCONN_CHECK", "ping", "check", "'socket', 'query'"),
    ("WSGI_PGCONN_EXEMPT_PATHS", "health", "exempt_paths", "start with '/'"),
    ("WSGI_PGCONN_POOLER", "pgbouncer", "pooler", "'none', 'session', 'transaction'"),
    ("WSGI_PGCONN_RETRIES", "-1", "retries", "whole number"),
]


@pytest.mark.parametrize(
    ("var", "value", "keyword", "accepted"),
    BAD_VALUES,
    ids=[f"{v}={x}" for v, x, _, _ in BAD_VALUES],
)
def test_bad_environment_value_fails_at_construction(
    var: str, value: str, keyword: str, accepted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(show_app)
    message = str(info.value)
    assert var in message
    assert repr(value) in message
    assert accepted in message


@pytest.mark.parametrize(
    ("var", "value", "keyword", "accepted"),
    BAD_VALUES,
    ids=[f"{k}={x}" for _, x, k, _ in BAD_VALUES],
)
def test_bad_keyword_value_fails_at_construction(
    var: str, value: str, keyword: str, accepted: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(show_app, **{keyword: value})
    message = str(info.value)
    assert keyword in message
    assert var in message  # the environment alias is named too
    assert repr(value) in message
    assert accepted in message


def test_every_setting_is_a_keyword_only_argument_and_a_variable() -> None:
    params = inspect.signature(PgConnMiddleware).parameters
    for name, (var, _) in SETTINGS.items():
        assert name in params, name
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is None, name  # None: "not given, use the environment"
        assert var == "DATABASE_URL" or var == "WSGI_PGCONN_" + name.upper(), (name, var)


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="WSGI_PGCONN_SCOPE"):
        PgConnMiddleware(show_app, scope="global")


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        PgConnMiddleware(show_app, pool_sise=3)  # type: ignore[call-arg]


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in {
        "WSGI_PGCONN_SCOPE": "pool",
        "WSGI_PGCONN_POOL_SIZE": "7",
        "WSGI_PGCONN_MAX_AGE": "300",
        "WSGI_PGCONN_MAX_IDLE": "60",
        "WSGI_PGCONN_ISOLATION_LEVEL": "REPEATABLE_READ",
        "WSGI_PGCONN_STATEMENT_TIMEOUT": "5s",
        "WSGI_PGCONN_RESET": "discard",
        "WSGI_PGCONN_CHECK": "query",
        "WSGI_PGCONN_EXEMPT_PATHS": "/health, /static/",
        "WSGI_PGCONN_CONNECT_TIMEOUT": "3",
    }.items():
        monkeypatch.setenv(var, value)
    s = PgConnMiddleware(show_app).settings
    assert (s.scope, s.pool_size, s.max_age, s.max_idle) == ("pool", 7, 300.0, 60.0)
    assert s.isolation_level == "repeatable read"
    assert (s.statement_timeout, s.reset, s.check) == (5000, "discard", "query")
    assert s.exempt_paths == ("/health", "/static")
    assert s.connect_timeout == 3


def test_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PGCONN_SCOPE", "")
    monkeypatch.setenv("WSGI_PGCONN_MAX_AGE", "")
    s = PgConnMiddleware(show_app).settings
    assert (s.scope, s.max_age) == ("thread", None)


def test_explicit_argument_wins_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, env_mw: Any, dsn: str, test_db: str
) -> None:
    monkeypatch.setenv("WSGI_PGCONN_SCOPE", "pool")
    monkeypatch.setenv("WSGI_PGCONN_POOL_SIZE", "2")
    monkeypatch.setenv("WSGI_PGCONN_MAX_AGE", "abc")  # never parsed: the keyword wins
    monkeypatch.setenv("DATABASE_URL", f"host=127.0.0.1 port={free_port()} dbname=nowhere")
    client, mw = env_mw(dsn=dsn, scope="thread", max_age=60)
    assert (mw.settings.scope, mw.settings.pool_size, mw.settings.max_age) == ("thread", 2, 60.0)
    assert shown(client, "database") == {"database": test_db}
    assert mw.stats()["scope"] == "thread"


# -- DATABASE_URL and libpq ---------------------------------------------------------------


def test_database_url_as_url_with_query_parameters(
    monkeypatch: pytest.MonkeyPatch, env_mw: Any, pg: Any, test_db: str, app_name: str
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL",
        pg.url(dbname=test_db, application_name=app_name, options="-c work_mem=5MB"),
    )
    client, _ = env_mw()
    assert shown(client, "database", "application_name", "work_mem") == {
        "database": test_db,
        "application_name": app_name,
        "work_mem": "5MB",
    }


def test_database_url_as_key_value(
    monkeypatch: pytest.MonkeyPatch, env_mw: Any, pg: Any, test_db: str, app_name: str
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", pg.dsn(dbname=test_db, application_name=app_name, options="-c work_mem=3MB")
    )
    client, _ = env_mw()
    assert shown(client, "database", "application_name", "work_mem") == {
        "database": test_db,
        "application_name": app_name,
        "work_mem": "3MB",
    }


def test_without_database_url_libpq_variables_apply(
    monkeypatch: pytest.MonkeyPatch, env_mw: Any, pg: Any, test_db: str, app_name: str
) -> None:
    for var, value in {
        "PGHOST": pg.host,
        "PGPORT": str(pg.port),
        "PGUSER": pg.user,
        "PGPASSWORD": pg.password,
        "PGDATABASE": test_db,
        "PGAPPNAME": app_name,
        "PGOPTIONS": "-c work_mem=6MB",
    }.items():
        monkeypatch.setenv(var, value)
    client, mw = env_mw()
    assert mw.settings.dsn == ""
    assert shown(client, "database", "application_name", "work_mem") == {
        "database": test_db,
        "application_name": app_name,
        "work_mem": "6MB",
    }


def test_isolation_level_setting(env_mw: Any, dsn: str) -> None:
    client, _ = env_mw(dsn=dsn, isolation_level="serializable")
    assert shown(client, "transaction_isolation") == {"transaction_isolation": "serializable"}
    client, _ = env_mw(dsn=dsn)
    assert shown(client, "transaction_isolation") == {"transaction_isolation": "read committed"}


# -- the first request's environ (mod_wsgi SetEnv) --------------------------------------------


def test_settings_in_the_first_request_environ_are_honoured_then_fixed(
    env_mw: Any, pg: Any, test_db: str, app_name: str
) -> None:
    client, mw = env_mw()
    first = {
        "DATABASE_URL": pg.dsn(dbname=test_db, application_name=app_name),
        "WSGI_PGCONN_SCOPE": "pool",
        "WSGI_PGCONN_POOL_SIZE": "3",
        "WSGI_PGCONN_ISOLATION_LEVEL": "repeatable read",
    }
    assert shown(client, "application_name", "transaction_isolation", extra_environ=first) == {
        "application_name": app_name,
        "transaction_isolation": "repeatable read",
    }
    assert (mw.settings.scope, mw.settings.pool_size) == ("pool", 3)
    assert mw.stats()["scope"] == "pool"
    later = {
        "DATABASE_URL": f"host=127.0.0.1 port={free_port()} dbname=nowhere",
        "WSGI_PGCONN_SCOPE": "thread",
        "WSGI_PGCONN_ISOLATION_LEVEL": "serializable",
    }
    assert shown(client, "application_name", "transaction_isolation", extra_environ=later) == {
        "application_name": app_name,
        "transaction_isolation": "repeatable read",
    }
    assert mw.settings.scope == "pool"


def test_keyword_wins_over_the_request_environ(
    env_mw: Any, dsn: str, pg: Any, app_name: str
) -> None:
    client, mw = env_mw(dsn=dsn, scope="thread")
    environ = {
        "DATABASE_URL": f"host=127.0.0.1 port={free_port()} dbname=nowhere",
        "WSGI_PGCONN_SCOPE": "pool",
        "WSGI_PGCONN_STATEMENT_TIMEOUT": "4s",
    }
    assert shown(client, "application_name", "statement_timeout", extra_environ=environ) == {
        "application_name": app_name,
        "statement_timeout": "4s",
    }
    assert mw.settings.scope == "thread"


def test_bad_value_in_the_first_request_environ_fails_every_request(env_mw: Any, dsn: str) -> None:
    client, _ = env_mw(dsn=dsn)
    for _ in range(2):
        with pytest.raises(ConfigurationError) as info:
            client.get("/", extra_environ={"WSGI_PGCONN_MAX_AGE": "abc"})
        assert "WSGI_PGCONN_MAX_AGE" in str(info.value)
        assert "'abc'" in str(info.value)
    with pytest.raises(ConfigurationError):
        client.get("/")  # the configuration is fixed, and it is broken


# -- lazy connection ---------------------------------------------------------------------------


def test_no_connection_before_the_first_request(admin: Any, dsn: str, app_name: str) -> None:
    mw = PgConnMiddleware(show_app, dsn=dsn)
    try:
        assert backends(admin, app_name) == []
        assert mw.stats() == {}
        client = webtest.TestApp(validator(mw))
        client.get("/")
        assert len(backends(admin, app_name)) == 1
    finally:
        mw.close()


def test_construction_never_connects_even_to_a_dead_server() -> None:
    mw = PgConnMiddleware(show_app, dsn=f"host=127.0.0.1 port={free_port()} dbname=x user=u")
    assert mw.stats() == {}


# -- the password never shows ----------------------------------------------------------------


SECRET = "Sw0rdf1sh-never-print-me"


def everything_said(records: list[logging.LogRecord], errors: list[BaseException]) -> str:
    parts = formatted(records)
    for exc in errors:
        parts.append("".join(traceback.format_exception(exc)))
        parts.append(repr(exc))
    return "\n".join(parts)


def test_password_never_in_repr_errors_or_logs(
    env_mw: Any, pg: Any, test_db: str, admin: Any, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = pg.password
    errors: list[BaseException] = []
    with log_records(logging.DEBUG) as records:
        # A working URL with the real password: repr, settings, requests, a discarded connection.
        url = pg.url(dbname=test_db, application_name=app_name)
        client, mw = env_mw(dsn=url)
        client.get("/?database")
        texts = [repr(mw), repr(mw.settings), str(mw.settings), str(mw.stats())]
        (pid,) = [pid for pid, _ in backends(admin, app_name)]
        query(admin, "SELECT pg_terminate_backend(%s)", pid)
        wait_backends_gone(admin, [pid])
        client.get("/?database")  # the discarded connection is logged (WARNING)
        # A bad setting next to a password-bearing DATABASE_URL.
        monkeypatch.setenv("DATABASE_URL", url)
        try:
            PgConnMiddleware(show_app, scope="everywhere")
        except ConfigurationError as exc:
            errors.append(exc)
        # Unparsable connection strings holding a password, in both forms.
        for bad in (
            f"host=localhost password={SECRET} port=5432 nonsense_option=1",
            f"postgresql://u:{SECRET}@localhost/db?nonsense_option=1",
            f"host=localhost password='{SECRET}",
        ):
            try:
                PgConnMiddleware(show_app, dsn=bad)
            except ConfigurationError as exc:
                errors.append(exc)
            else:
                pytest.fail(f"accepted an invalid connection string ({len(bad)} chars)")
        # A wrong password and an unreachable server: 503, warnings, no password.
        wrong = pg.dsn(dbname=test_db, password=SECRET)
        client, mw_wrong = env_mw(dsn=wrong)
        res = client.get("/", expect_errors=True)
        assert res.status_int == 503
        texts += [res.text, repr(mw_wrong)]
        down = f"postgresql://u:{SECRET}@127.0.0.1:{free_port()}/db"
        client, mw_down = env_mw(dsn=down)
        res = client.get("/", expect_errors=True)
        assert res.status_int == 503
        texts += [res.text, repr(mw_down), repr(mw_down.settings)]
    said = everything_said(records, errors) + "\n".join(texts)
    assert len(errors) == 4
    assert any(r.levelno == logging.WARNING for r in records)
    assert password not in said
    assert SECRET not in said
    assert "********" in repr(mw_down.settings)  # masked, not dropped
