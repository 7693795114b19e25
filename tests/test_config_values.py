"""Configuration that cannot silently go wrong (issue 12): durations, unknown names,
DATABASE_URL errors, exempt paths.

Each example of the issue is a test here: ``010`` and ``08`` reach the server
as 10 ms and 8 ms, every time-valued setting takes the same forms, a
misspelt variable is named with the setting it probably meant, a bad
DATABASE_URL says what is wrong without the password, and ``/health`` does not
exempt ``/healthcheck-db``.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from typing import Any

import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    call,
    clean_env_fixture,
    formatted,
    log_records,
    stack,
    webtest,
)

from wsgi_pgconn import ConfigurationError, PgConnMiddleware, get_connection
from wsgi_pgconn import config as config_module
from wsgi_pgconn.config import (
    DURATION_UNITS,
    ENV_PREFIX,
    NOT_SETTINGS,
    SETTINGS,
    parse,
    unknown_variables,
)
from wsgi_pgconn.connection import connect_params
from wsgi_pgconn.middleware import EXEMPT_KEY

pytestmark = pytest.mark.usefixtures("clean_env")

#: The prefix, kept apart in misspelt names (tests/test_tooling.py lists every name in full).
P = ENV_PREFIX


def settings_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers the server's statement_timeout and idle_in_transaction_session_timeout."""
    with get_connection(environ).cursor() as cur:
        cur.execute(
            "SELECT current_setting('statement_timeout'), "
            "current_setting('idle_in_transaction_session_timeout')"
        )
        row = cur.fetchone()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [" ".join(row).encode()]


# -- durations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "timeout"),
    [("010", "10ms"), ("08", "8ms"), ("0010", "10ms"), ("1.5s", "1500ms"), ("2min", "2min")],
)
@pytest.mark.parametrize("pooler", ["none", "transaction"])
def test_statement_timeout_reaches_the_server_as_milliseconds(
    make_mw: Any, monkeypatch: pytest.MonkeyPatch, value: str, timeout: str, pooler: str
) -> None:
    """``010`` is 10 ms (PostgreSQL itself would read it as octal 8), ``08`` is 8 ms (it would
    refuse it, and every request would answer 503); also through the pooler prelude."""
    monkeypatch.setenv("WSGI_PGCONN_STATEMENT_TIMEOUT", value)
    monkeypatch.setenv("WSGI_PGCONN_IDLE_IN_TRANSACTION_TIMEOUT", value)
    outer, _ = stack(make_mw, settings_app, pooler=pooler)
    res = call(outer, "/")
    assert res.status == "200 OK", res.body
    assert res.body.decode() == f"{timeout} {timeout}"


FORMS = {
    # text: milliseconds it stands for when the setting's default unit is s / ms
    "300": (300_000, 300),
    "1.5s": (1500, 1500),
    "250ms": (250, 250),
    "10min": (600_000, 600_000),
    "1h": (3_600_000, 3_600_000),
    "2d": (172_800_000, 172_800_000),
    "500us": (0.5, 0.5),
    "5 S": (5000, 5000),
    "3MIN": (180_000, 180_000),
}


@pytest.mark.parametrize("name", sorted(DURATION_UNITS))
@pytest.mark.parametrize("text", sorted(FORMS))
def test_every_time_valued_setting_accepts_the_same_forms(name: str, text: str) -> None:
    var = SETTINGS[name][0]
    in_seconds, in_ms = FORMS[text]
    value = getattr(parse({var: text}), name)
    if DURATION_UNITS[name] == "s":
        assert value == pytest.approx(in_seconds / 1000), (var, text)
        assert isinstance(value, float)
    else:  # whole milliseconds, rounded up: never 0 (no timeout) for a positive value
        assert value == -(-in_ms // 1), (var, text)
        assert isinstance(value, int)


@pytest.mark.parametrize("name", sorted(DURATION_UNITS))
def test_durations_as_keywords(name: str) -> None:
    s = parse({}, **{name: datetime.timedelta(minutes=2)})
    t = parse({}, **{name: 7})
    if DURATION_UNITS[name] == "s":
        assert (getattr(s, name), getattr(t, name)) == (120.0, 7.0)
    else:
        assert (getattr(s, name), getattr(t, name)) == (120_000, 7)


@pytest.mark.parametrize("name", sorted(DURATION_UNITS))
@pytest.mark.parametrize("text", ["5 parsecs", "-1s", "1e3", "5m", "s", "1.5.s", "\uff15s"])
def test_bad_durations_are_refused_the_same_way(name: str, text: str) -> None:
    var = SETTINGS[name][0]
    with pytest.raises(ConfigurationError) as info:
        parse({var: text})
    message = str(info.value)
    assert var in message
    assert "expected a duration" in message
    assert "us, ms, s, min, h, d" in message


def test_connect_timeout_reaches_libpq_in_whole_seconds_rounded_up() -> None:
    def libpq_timeout(value: str) -> str:
        conninfo = connect_params(parse({"WSGI_PGCONN_CONNECT_TIMEOUT": value}), {})
        return dict(p.split("=", 1) for p in conninfo.split())["connect_timeout"]

    assert [libpq_timeout(v) for v in ("5s", "250ms", "1.5", "10min")] == ["5", "1", "2", "600"]


def test_server_timeouts_zero_means_none_and_none_means_the_servers(make_mw: Any) -> None:
    outer, _ = stack(
        make_mw, settings_app, statement_timeout="0", idle_in_transaction_timeout="none"
    )
    assert call(outer, "/").body == b"0 0"


# -- unknown names ------------------------------------------------------------------------------


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which unknown names this process has already warned about."""
    monkeypatch.setattr(config_module, "_warned", set())


def ok_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


MISSPELT = {
    f"{P}SCOPES": "pool",
    f"{P}POOLSIZE": "8",
    f"{P}STATEMENT_TIMOUT": "5s",
}


@pytest.mark.usefixtures("fresh_warnings")
def test_unknown_variables_are_named_once_with_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    for var, value in MISSPELT.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WSGI_PGCONN_BENCH_APP", "page")  # the tooling's: not reported
    with log_records(logging.WARNING) as records:
        mw = PgConnMiddleware(ok_app, dsn=dsn)
        PgConnMiddleware(ok_app, dsn=dsn)  # a second middleware: no second warning
    (line,) = formatted(records)
    assert line.startswith("WARNING wsgi_pgconn ")
    assert f"{P}SCOPES (did you mean WSGI_PGCONN_SCOPE?)" in line
    assert f"{P}POOLSIZE (did you mean WSGI_PGCONN_POOL_SIZE?)" in line
    assert f"{P}STATEMENT_TIMOUT (did you mean WSGI_PGCONN_STATEMENT_TIMEOUT?)" in line
    assert "WSGI_PGCONN_STRICT" in line  # how to make it an error
    assert "BENCH_APP" not in line
    # ... and ignored, as the warning says.
    assert (mw.settings.scope, mw.settings.pool_size, mw.settings.statement_timeout) == (
        "thread",
        4,
        None,
    )


def test_strict_makes_unknown_variables_an_error(monkeypatch: pytest.MonkeyPatch, dsn: str) -> None:
    for var, value in MISSPELT.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("WSGI_PGCONN_STRICT", "on")
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(ok_app, dsn=dsn)
    assert f"{P}POOLSIZE (did you mean WSGI_PGCONN_POOL_SIZE?)" in str(info.value)
    monkeypatch.delenv("WSGI_PGCONN_STRICT")
    with pytest.raises(ConfigurationError, match=f"{P}SCOPES"):
        PgConnMiddleware(ok_app, dsn=dsn, strict=True)
    for var in MISSPELT:
        monkeypatch.delenv(var)
    monkeypatch.setenv("WSGI_PGCONN_BENCH_SCOPE", "pool")  # reserved names pass, even strict
    PgConnMiddleware(ok_app, dsn=dsn, strict=True)


@pytest.mark.usefixtures("fresh_warnings")
def test_unknown_names_in_the_first_request_environ(dsn: str) -> None:
    """mod_wsgi's SetEnv: settings (and misspellings) arrive in the request's environ."""
    mw = PgConnMiddleware(ok_app, dsn=dsn)
    try:
        with log_records(logging.WARNING) as records:
            webtest.TestApp(mw).get("/", extra_environ={f"{P}SCOPES": "pool"})
        (line,) = formatted(records)
        assert f"{P}SCOPES (did you mean WSGI_PGCONN_SCOPE?)" in line
    finally:
        mw.close()
    strict = PgConnMiddleware(ok_app, dsn=dsn, strict=True)
    with pytest.raises(ConfigurationError, match=f"{P}SCOPES"):
        webtest.TestApp(strict).get("/", extra_environ={f"{P}SCOPES": "pool"})


def test_lowercase_and_unrelated_names() -> None:
    found = unknown_variables(
        {"wsgi_pgconn_scope": "pool", f"{P}XYZZY": "1", "PGHOST": "h", "OTHER": "x"}
    )
    assert found == [(f"{P}XYZZY", None), ("wsgi_pgconn_scope", "WSGI_PGCONN_SCOPE")]
    assert not set(NOT_SETTINGS) & {var for var, _ in SETTINGS.values()}


# -- DATABASE_URL -----------------------------------------------------------------------------

SECRET = "Sw0rdf1sh-issue12"


def refusal(dsn: str) -> str:
    """The error for ``dsn``, everything it carries (cause, context, traceback) included."""
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(ok_app, dsn=dsn)
    said = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert SECRET not in said
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    return str(info.value)


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql+psycopg", "mysql", "jdbc"])
def test_unsupported_scheme_is_named(scheme: str) -> None:
    message = refusal(f"{scheme}://app:{SECRET}@db.example:5432/app")
    assert f"URL scheme {scheme}://" in message
    assert "use postgresql://" in message
    if "+" in scheme:
        assert "SQLAlchemy's form" in message


@pytest.mark.parametrize(
    ("params", "named", "hint"),
    [
        ("conn_max_age=600", "conn_max_age", "WSGI_PGCONN_MAX_AGE"),
        ("sslmode=require&conn_health_checks=true", "conn_health_checks", "WSGI_PGCONN_CHECK"),
        ("sslmode=require&schema=app", "schema", "options=-csearch_path"),
        ("Application_Name=x", "Application_Name", ""),
    ],
)
def test_unknown_query_parameter_is_named(params: str, named: str, hint: str) -> None:
    message = refusal(f"postgresql://app:{SECRET}@db.example/app?{params}")
    assert f"query parameter {named!r}, which libpq does not know" in message
    assert hint in message


def test_unknown_key_value_parameter_is_named() -> None:
    message = refusal(f"host=db.example password={SECRET} conn_max_age=600")
    assert "parameter 'conn_max_age', which libpq does not know" in message


@pytest.mark.parametrize(
    "dsn",
    [
        f"host=db.example {SECRET}",  # a password that lost its keyword
        f"postgresql://app@db.example/app?{SECRET}",
        f"host=db.example password='{SECRET}",
        f"postgresql://app:{SECRET}@db.example/app?sslmode=%zz",
    ],
)
def test_broken_strings_are_described_without_quoting_them(dsn: str) -> None:
    assert "the value is not shown" in refusal(dsn)


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "pgsql", "PostgreSQL", "postgis"])
def test_accepted_schemes_connect(
    scheme: str, pg: Any, test_db: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = pg.url(dbname=test_db, application_name=app_name)
    assert url.startswith("postgresql://")
    monkeypatch.setenv("DATABASE_URL", scheme + url[len("postgresql") :])
    mw = PgConnMiddleware(settings_app)
    try:
        assert webtest.TestApp(mw).get("/").status_int == 200
        assert mw.stats()["opened"] == 1
    finally:
        mw.close()


# -- exempt paths -----------------------------------------------------------------------------


def exempt_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"exempt" if environ.get(EXEMPT_KEY) else b"connected"]


@pytest.mark.parametrize(
    ("setting", "exempt", "not_exempt"),
    [
        ("/health", ["/health", "/health/", "/health/db"], ["/healthcheck-db", "/", "/healt"]),
        ("/static/", ["/static", "/static/app.css"], ["/staticfiles/x", "/stat"]),
        ("/health*", ["/health", "/healthcheck-db", "/health/x"], ["/heal", "/api/health"]),
        ("/api/v1/*", ["/api/v1/", "/api/v1/x"], ["/api/v1", "/api/v10"]),
        ("/a, /b/c", ["/a", "/a/x", "/b/c", "/b/c/d"], ["/ab", "/b", "/b/cd"]),
    ],
)
def test_exempt_paths_match_whole_segments(
    make_mw: Any, setting: str, exempt: list[str], not_exempt: list[str]
) -> None:
    outer, _mw = stack(make_mw, exempt_app, exempt_paths=setting)
    assert {p: call(outer, p).body for p in exempt} == dict.fromkeys(exempt, b"exempt")
    assert {p: call(outer, p).body for p in not_exempt} == dict.fromkeys(not_exempt, b"connected")


@pytest.mark.parametrize("bad", ["/he*alth", "health", "*"])
def test_bad_exempt_paths(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="WSGI_PGCONN_EXEMPT_PATHS"):
        parse({"WSGI_PGCONN_EXEMPT_PATHS": bad})


def test_no_exempt_paths_no_check(make_mw: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the exempt test is one false attribute per request: PATH_INFO is never read."""
    outer, mw = stack(make_mw, exempt_app)
    assert mw._exempt_quick == ()
    assert call(outer, "/health").body == b"connected"


def test_query_params_are_not_mistaken_for_misplaced_values() -> None:
    """A key=value string whose quoted value holds ``x=y`` names no part of the value."""
    message = refusal(f"host=db.example password='{SECRET} a=b' nonsense=1")
    assert "'nonsense'" in message
    assert SECRET not in message
    s = parse({"DATABASE_URL": f"host=db.example password='{SECRET} a=b'"})
    assert "********" in repr(s)
    assert SECRET not in repr(s)


def test_connection_string_keeps_its_scheme_fix(pg: Any, test_db: str) -> None:
    """pgsql:// becomes postgresql:// once, where it is parsed; libpq gets a URL it reads."""
    s = parse({"DATABASE_URL": "pgsql" + pg.url(dbname=test_db)[len("postgresql") :]})
    assert s.dsn.startswith("postgresql://")
    conninfo = connect_params(s, {})
    assert f"dbname={test_db}" in conninfo

