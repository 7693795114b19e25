"""The driver seam: which driver a process uses, and what each driver's connection does.

The choice is tested in subprocesses whose ``sitecustomize`` makes one driver
(or both) impossible to import, as on a machine where it is not installed.
The rest runs on this run's driver (``WSGI_PGCONN_DRIVER``) against the real
server: cursor and row factories, savepoints, cancel, prepared statements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dbapi
import pytest
from test_core_helpers import WAIT, call, deadline_poll, query

from wsgi_pgconn import PgConnMiddleware, PoolTimeout, TransactionManaged, get_connection
from wsgi_pgconn.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]

HDRS = [("Content-Type", "text/plain")]

PROBE = r"""
import json, os, sys
out = {}
from wsgi_pgconn import drivers, PgConnMiddleware, DriverNotFound
def app(environ, start_response):
    start_response("200 OK", [])
    return [b""]
try:
    out["auto"] = PgConnMiddleware(app, dsn="dbname=x").driver.name
except DriverNotFound as exc:
    out["auto"] = "error: " + str(exc)
    out["is_import_error"] = isinstance(exc, ImportError)
for name in ("psycopg2", "psycopg"):
    try:
        out[name] = PgConnMiddleware(app, dsn="dbname=x", driver=name).driver.name
    except DriverNotFound as exc:
        out[name] = "error: " + str(exc)
if os.environ.get("PROBE_DJANGO"):
    import django
    from django.conf import settings
    settings.configure(
        DATABASES={"default": {"ENGINE": "wsgi_pgconn.django", "NAME": "x"}},
        INSTALLED_APPS=[],
    )
    django.setup()
    from django.core.exceptions import ImproperlyConfigured
    from wsgi_pgconn.django import DjangoPgConnMiddleware
    mw = DjangoPgConnMiddleware(app)
    out["django"] = mw.middleware.driver.name
    try:
        DjangoPgConnMiddleware(app, driver="psycopg2" if out["django"] == "psycopg" else "psycopg")
        out["django_other"] = "accepted"
    except (ImproperlyConfigured, DriverNotFound) as exc:
        out["django_other"] = "refused: " + str(exc)
print(json.dumps(out))
"""


def run_probe(tmp_path: Path, blocked: tuple[str, ...], *, django: bool = False) -> dict[str, Any]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None  # not installed\n" for name in blocked)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    if django:
        env["PROBE_DJANGO"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_only_psycopg2_installed(tmp_path: Path) -> None:
    out = run_probe(tmp_path, ("psycopg",), django=True)
    assert out["auto"] == "psycopg2"
    assert out["psycopg2"] == "psycopg2"
    assert out["psycopg"].startswith("error: WSGI_PGCONN_DRIVER='psycopg', but psycopg is not")
    assert "pip install 'wsgi_pgconn[psycopg]'" in out["psycopg"]
    # Django's backend falls back to psycopg2 there, and so does the adapter.
    assert out["django"] == "psycopg2"
    assert out["django_other"].startswith("refused: ")


def test_only_psycopg_installed(tmp_path: Path) -> None:
    out = run_probe(tmp_path, ("psycopg2",), django=True)
    assert out["auto"] == "psycopg"
    assert out["psycopg"] == "psycopg"
    assert "pip install 'wsgi_pgconn[psycopg2]'" in out["psycopg2"]
    assert out["django"] == "psycopg"
    assert out["django_other"].startswith("refused: ")


def test_both_installed_auto_takes_psycopg_as_django_does(tmp_path: Path) -> None:
    out = run_probe(tmp_path, (), django=True)
    assert (out["auto"], out["psycopg2"], out["psycopg"]) == ("psycopg", "psycopg2", "psycopg")
    assert out["django"] == "psycopg"
    # A middleware on psycopg2 beside Django's psycopg 3 would give the ORM another
    # connection than the request's: refused, naming the fix.
    assert "set WSGI_PGCONN_DRIVER=psycopg" in out["django_other"]


def test_no_driver_installed(tmp_path: Path) -> None:
    out = run_probe(tmp_path, ("psycopg", "psycopg2"))
    assert out["auto"].startswith("error: wsgi_pgconn needs a PostgreSQL driver")
    assert "wsgi_pgconn[psycopg]" in out["auto"]
    assert "wsgi_pgconn[psycopg2]" in out["auto"]
    assert out["is_import_error"] is True


def test_an_unknown_driver_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="expected one of 'auto', 'psycopg2', 'psycopg'"):
        PgConnMiddleware(lambda e, s: [], dsn="dbname=x", driver="pg8000")


# -- the run's driver ---------------------------------------------------------------------


def test_errors_are_the_drivers_own_classes_too(make_mw: Any, table: str, admin: Any) -> None:
    caught: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            get_connection(environ).commit()
        except TransactionManaged as exc:
            caught.append(exc)
        start_response("200 OK", HDRS)
        return [b""]

    call(make_mw(app), "/")
    (exc,) = caught
    assert isinstance(exc, dbapi.ProgrammingError)
    mw = make_mw(lambda e, s: [], scope="pool", pool_size=1, pool_timeout=0.01)
    driver = mw.driver
    assert issubclass(driver.PoolTimeout, PoolTimeout)
    assert issubclass(driver.PoolTimeout, dbapi.OperationalError)


def _write(conn: Any, table: str, key: str, cursor: Any = None, placeholder: str = "%s") -> None:
    cur = cursor if cursor is not None else conn.cursor()
    cur.execute(f"INSERT INTO {table} (k) VALUES ({placeholder})", (key,))


def _rows(admin: Any, table: str) -> list[str]:
    return [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY k")]


def factory_cases() -> list[Any]:
    """(name, make a cursor from the request's connection, the shape of a row)."""
    if dbapi.PSYCOPG2:
        import psycopg2.extras as extras

        return [
            pytest.param(
                lambda c: c.cursor(cursor_factory=extras.RealDictCursor), dict, id="RealDictCursor"
            ),
            pytest.param(
                lambda c: c.cursor(cursor_factory=extras.DictCursor), list, id="DictCursor"
            ),
            pytest.param(
                lambda c: c.cursor(cursor_factory=extras.NamedTupleCursor),
                tuple,
                id="NamedTupleCursor",
            ),
            pytest.param(
                lambda c: c.cursor("named", cursor_factory=extras.RealDictCursor),
                dict,
                id="named RealDictCursor",
            ),
            pytest.param(_set_factory(extras.RealDictCursor), dict, id="conn.cursor_factory ="),
        ]
    import psycopg
    import psycopg.rows as rows

    return [
        pytest.param(lambda c: c.cursor(row_factory=rows.dict_row), dict, id="dict_row"),
        pytest.param(
            lambda c: c.cursor(row_factory=rows.namedtuple_row), tuple, id="namedtuple_row"
        ),
        pytest.param(
            lambda c: c.cursor("named", row_factory=rows.dict_row), dict, id="named dict_row"
        ),
        pytest.param(_set_factory(psycopg.ClientCursor), tuple, id="ClientCursor"),
        pytest.param(_set_factory(psycopg.RawCursor, raw=True), tuple, id="RawCursor"),
        pytest.param(_set_row_factory(rows.dict_row), dict, id="conn.row_factory ="),
    ]


def _set_factory(factory: Any, raw: bool = False) -> Any:
    def make(conn: Any) -> Any:
        conn.cursor_factory = factory
        return conn.cursor()

    make.raw = raw  # type: ignore[attr-defined]
    return make


def _set_row_factory(factory: Any) -> Any:
    def make(conn: Any) -> Any:
        conn.row_factory = factory
        return conn.cursor()

    return make


@pytest.mark.parametrize(("make_cursor", "shape"), factory_cases())
def test_cursor_and_row_factories_keep_working_in_the_requests_transaction(
    make_mw: Any, table: str, admin: Any, make_cursor: Any, shape: type
) -> None:
    """The user's cursor class reads its rows its way, and writes in the request's transaction."""
    seen: list[Any] = []
    raw = getattr(make_cursor, "raw", False)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        cur = make_cursor(conn)
        placeholder = "$1" if raw else "%s"
        cur.execute(f"SELECT {placeholder}::text AS k, 2 AS n", ("x",))
        seen.append(cur.fetchone())
        cur.close()
        _write(conn, table, environ["PATH_INFO"].strip("/"), conn.cursor(), placeholder)
        status = "500 Internal Server Error" if "fail" in environ["PATH_INFO"] else "200 OK"
        start_response(status, HDRS)
        return [b""]

    mw = make_mw(app)
    assert call(mw, "/fail").code == 500
    assert call(mw, "/ok").code == 200
    assert _rows(admin, table) == ["ok"]  # the failed request's write was rolled back
    row = seen[-1]
    assert isinstance(row, shape)
    values = (row["k"], row["n"]) if shape is dict else tuple(row)[:2]
    assert values == ("x", 2)
    assert mw.stats()["opened"] == 1


@pytest.mark.parametrize("outcome", ["200 OK", "500 Internal Server Error"])
def test_a_cursor_class_that_writes_first_begins_the_requests_transaction(
    make_mw: Any, table: str, admin: Any, outcome: str
) -> None:
    """The first statement of the request through the user's cursor class is in the transaction."""
    executed: list[Any] = []
    if dbapi.PSYCOPG2:
        import psycopg2.extensions

        class CountingCursor(psycopg2.extensions.cursor):
            """A user's own cursor class, with its own execute()."""

            def execute(self, query: Any, vars: Any = None) -> None:
                executed.append(query)
                return super().execute(query, vars)

        def cursor(conn: Any) -> Any:
            return conn.cursor(cursor_factory=CountingCursor)
    else:
        import psycopg

        def cursor(conn: Any) -> Any:
            conn.cursor_factory = psycopg.ClientCursor
            return conn.cursor()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        cur = cursor(conn)
        _write(conn, table, "first", cur)
        _write(conn, table, "second", cur)
        start_response(outcome, HDRS)
        return [b""]

    call(make_mw(app), "/")
    assert _rows(admin, table) == (["first", "second"] if outcome == "200 OK" else [])
    if dbapi.PSYCOPG2:
        assert len(executed) == 2  # the user's execute() ran


def test_psycopg_transaction_blocks_are_savepoints(make_mw: Any, table: str, admin: Any) -> None:
    if dbapi.PSYCOPG2:
        pytest.skip("conn.transaction() is psycopg 3's")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        with conn.transaction():  # the request's first statement is in here
            _write(conn, table, "kept")
        try:
            with conn.transaction():
                _write(conn, table, "undone")
                raise LookupError
        except LookupError:
            pass
        start_response("200 OK", HDRS)
        return [b""]

    assert call(make_mw(app), "/").code == 200
    assert _rows(admin, table) == ["kept"]


def test_cancel_stops_a_running_statement(make_mw: Any, admin: Any, app_name: str) -> None:
    """driver.cancel() from another thread ends the request's statement (QueryCanceled)."""
    outcome: list[str] = []
    holder: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        holder.append(conn)
        try:
            query(conn, "SELECT pg_sleep(30)")
            outcome.append("slept")
        except dbapi.errors.QueryCanceled:
            outcome.append("canceled")
        start_response("500 Internal Server Error", HDRS)
        return [b""]

    mw = make_mw(app)
    thread = threading.Thread(target=call, args=(mw, "/"))
    thread.start()
    deadline_poll(
        lambda: query(
            admin,
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
            "AND query LIKE '%%pg_sleep(30)%%' AND state = 'active'",
            app_name,
        ),
        "the statement runs",
    )
    mw.driver.cancel(holder[0])
    thread.join(WAIT)
    assert outcome == ["canceled"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, 5),  # psycopg's own default
        ({"pooler": "transaction"}, None),  # prepared statements do not survive it
        ({"pooler": "transaction", "prepare_threshold": 2}, 2),  # the pooler keeps them
        ({"prepare_threshold": "off"}, None),
    ],
)
def test_prepared_statements_off_behind_a_transaction_pooler(
    make_mw: Any, kwargs: dict[str, Any], expected: int | None
) -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        if not dbapi.PSYCOPG2:
            seen.append(conn.prepare_threshold)
        start_response("200 OK", HDRS)
        return [b""]

    mw = make_mw(app, **kwargs)
    assert mw.settings.prepare_threshold == expected
    call(mw, "/")
    if not dbapi.PSYCOPG2:  # psycopg2 prepares nothing on the server
        assert seen == [expected]


@pytest.mark.parametrize(
    ("sql", "params"),
    [("SELECT 1/%s", (0,)), ("SELECT 1/0", None)],
    ids=["with-parameters", "without"],
)
def test_a_failing_first_statement_keeps_its_connection(
    make_mw: Any, sql: str, params: Any
) -> None:
    """Its error rolls the request back; the connection stays, every time.

    psycopg 3 may read the statement's error before the answer to the Sync
    that ends the BEGIN's pipeline; that answer must still be read, or the
    connection looks busy and is discarded as broken (4 times in 300 here).
    """

    def app(environ: Any, start_response: Any) -> list[bytes]:
        with get_connection(environ).cursor() as cur:
            cur.execute(sql, params)
        start_response("200 OK", [])
        return [b""]

    mw = make_mw(app)
    for _ in range(300):
        with pytest.raises(dbapi.errors.DivisionByZero):
            call(mw, "/")
    stats = mw.stats()
    assert (stats["opened"], stats["discarded"]["broken"], stats["rollbacks"]) == (1, 0, 300)
