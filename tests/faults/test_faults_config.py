"""Configuration fuzzing (hypothesis): any string, any variable.

Every variable of :data:`wsgi_pgconn.config.SETTINGS` (enumerated from the
table, so new settings are fuzzed automatically) gets arbitrary text, and
text built from tokens that look almost valid (digits of other scripts, unit
suffixes, tabs and no-break spaces, signs, underscores, NUL, DSN syntax).
``parse()`` must return a configuration or raise one ``ConfigurationError``
that names the variable; never anything else.

A second property asks more: a configuration that parses must also work.
The values that reach libpq or the server (timeouts, connect_timeout) are
used to open a real connection, and pool_timeout must be usable as a wait.
No server is needed for the first property; the second uses the session's.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsgi_pgconn import ConfigurationError
from wsgi_pgconn.config import SETTINGS, Settings, parse
from wsgi_pgconn.connection import connect_params

VARIABLES = sorted(var for var, _ in SETTINGS.values())
FIELD = {var: name for name, (var, _) in SETTINGS.items()}

TOKENS = [
    "0",
    "1",
    "5",
    "9",
    "42",
    "007",
    "2147483647",
    "99999999999",
    "1e3",
    "1e10",
    "1e400",
    "\u0661\u0662",
    "\uff15",
    "\u00b2",
    ".",
    ",",
    "-",
    "+",
    "_",
    " ",
    "\t",
    "\n",
    "\xa0",
    "\u2003",
    "\x00",
    "us",
    "ms",
    "s",
    "min",
    "h",
    "d",
    "MS",
    "Min",
    "none",
    "None",
    "off",
    "default",
    "inf",
    "nan",
    "NaN",
    "true",
    "thread",
    "process",
    "pool",
    "rollback",
    "discard",
    "socket",
    "query",
    "transaction",
    "session",
    "serializable",
    "read committed",
    "READ_COMMITTED",
    "repeatable read",
    "/",
    "/health",
    "/static/",
    "host=",
    "password=",
    "port=",
    "dbname=",
    "'",
    "\\",
    "=",
    "postgresql://",
    "u:p@h/db",
    "%",
    "%zz",
    "?",
    "[::1",
    "@",
    ":",
    "\u00e9",
    "\U0001f600",
]
almost_valid = st.lists(st.sampled_from(TOKENS), max_size=6).map("".join)
any_text = st.text(max_size=40)
values = st.one_of(any_text, almost_valid)


def _parse_one(var: str, value: str) -> Settings | None:
    try:
        return parse({var: value})
    except ConfigurationError as exc:
        error = str(exc)
    assert var in error, f"{var}={value!r}: the error does not name it: {error}"
    return None


@pytest.mark.parametrize("var", VARIABLES)
@settings(max_examples=120, deadline=None, database=None)
@given(value=values)
def test_any_string_in_one_variable(var: str, value: str) -> None:
    _parse_one(var, value)


@settings(max_examples=200, deadline=None, database=None)
@given(env=st.dictionaries(st.sampled_from(VARIABLES), values, max_size=5))
def test_any_strings_in_several_variables(env: dict[str, str]) -> None:
    try:
        parse(env)
    except ConfigurationError as exc:
        error = str(exc)
    else:
        return
    assert any(var in error for var in env), f"{env!r}: {error}"


@settings(max_examples=100, deadline=None, database=None)
@given(
    value=st.one_of(
        st.text(max_size=20),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        st.lists(st.text(max_size=5), max_size=3),
    )
)
def test_any_keyword_value(value: Any) -> None:
    """Keyword arguments may be any object: a configuration, or a ConfigurationError."""
    for name, (var, _) in SETTINGS.items():
        try:
            parse({}, **{name: value})
        except ConfigurationError as exc:
            error = str(exc)
        else:
            continue
        assert var in error, f"{name}={value!r}: {error}"


# -- parsed values must also work -----------------------------------------------------

REACHES_THE_SERVER = [
    "WSGI_PGCONN_STATEMENT_TIMEOUT",
    "WSGI_PGCONN_IDLE_IN_TRANSACTION_TIMEOUT",
    "WSGI_PGCONN_CONNECT_TIMEOUT",
]
durations = st.one_of(
    almost_valid,
    st.from_regex(r"\A\s?[0-9\u0660-\u0669]{1,12}(\.[0-9]{1,3})?[ \t\xa0]?(us|ms|s|min|h|d)?\s?\Z"),
)


def _check_usable(pg_dsn: str, var: str, value: str) -> None:
    s = _parse_one(var, value)
    if s is None:
        return
    if var == "WSGI_PGCONN_POOL_TIMEOUT":
        assert s.pool_timeout <= threading.TIMEOUT_MAX, f"{var}={value!r} cannot be waited for"
        return
    s = parse({"DATABASE_URL": pg_dsn, var: value})
    try:
        conn = psycopg2.connect(connect_params(s, {}))
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"{var}={value!r} was accepted as {getattr(s, FIELD[var])!r}, but every "
            f"connection then fails: {str(exc).strip().splitlines()[-1]}"
        )
    conn.close()


@pytest.mark.parametrize("var", REACHES_THE_SERVER)
@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(value="5\ts")
@example(value="30d")
@example(value="2147483648")
@given(value=durations)
def test_accepted_values_reach_the_server_intact(
    pg: Any, test_db: str, var: str, value: str
) -> None:
    _check_usable(pg.dsn(dbname=test_db), var, value)


@settings(max_examples=60, deadline=None, database=None)
@example(value="1e10")
@given(value=st.one_of(almost_valid, st.floats(min_value=1, allow_infinity=False).map(repr)))
def test_accepted_pool_timeout_can_be_waited_for(value: str) -> None:
    _check_usable("", "WSGI_PGCONN_POOL_TIMEOUT", value)


# -- a stored configuration error, raised again at every request ---------------------------


def _misconfigured_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"never reached"]


@pytest.mark.parametrize(
    ("kwargs", "extra"),
    [
        # scope=process on a server that runs requests in several threads
        ({"scope": "process"}, {}),
        # a bad value arriving in the request's environ (mod_wsgi SetEnv)
        ({}, {"WSGI_PGCONN_POOL_SIZE": "many"}),
    ],
    ids=["process-scope-multithreaded", "bad-setenv-value"],
)
def test_stored_configuration_error_does_not_grow(
    make_mw: Any, caplog: pytest.LogCaptureFixture, kwargs: dict[str, Any], extra: dict[str, str]
) -> None:
    """1,000 requests to a misconfigured middleware: each gets a fresh error of constant size.

    Re-raising the stored exception object would append the frames of every
    re-raise to its traceback (three per request): the server's error log
    would grow with every request.
    """
    import traceback

    from werkzeug.test import EnvironBuilder

    mw = make_mw(_misconfigured_app, **kwargs)
    builder = EnvironBuilder(path="/", multithread=True)
    base = builder.get_environ()
    builder.close()
    frames: list[int] = []
    sizes: list[int] = []
    messages: set[str] = set()
    errors: list[BaseException] = []
    for _ in range(1000):
        environ = {**base, **extra}
        try:
            mw(environ, lambda status, headers, exc_info=None: None)
        except ConfigurationError as exc:
            frames.append(len(traceback.extract_tb(exc.__traceback__)))
            sizes.append(len("".join(traceback.format_exception(exc))))
            messages.add(str(exc))
            if len(errors) < 2:
                errors.append(exc)
        else:
            raise AssertionError("a misconfigured middleware served a request")
    assert len(frames) == 1000
    assert frames[-1] == frames[0] <= 4, frames[:5]
    assert sizes[-1] == sizes[0] < 2000, sizes[:5]
    assert len(messages) == 1
    assert errors[0] is not errors[1]  # a fresh error per request, not the stored one
    records = [r for r in caplog.records if r.name == "wsgi_pgconn"]
    assert 1 <= len(records) <= 2, [r.getMessage()[:100] for r in records]
    assert all(len(r.getMessage()) < 1000 and r.exc_info is None for r in records)
