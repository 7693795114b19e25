"""Session reset between requests (issue 3): ``reset="rollback"`` (default) vs ``"discard"``.

A request leaves session state behind (a session-level SET, a temp table, an
advisory lock, a LISTEN); the next request on the same connection reports
what it can still see. The default mode only rolls back and costs nothing;
``discard`` runs DISCARD ALL after each request that used the connection and
re-applies the connection settings.
"""

from __future__ import annotations

import json
import select
from typing import Any

import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    RoundTrips,
    clean_env_fixture,
    get_connection,
    query,
    rt_dsn_fixture,
    rt_fixture,
    rt_role_fixture,
    stack,
    webtest,
)

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "application/json")]
LOCK_KEY = 424242


def session_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    conn = get_connection(environ)
    path = environ["PATH_INFO"]
    result: dict[str, Any] = {"pid": conn.info.backend_pid, "fd": conn.fileno()}
    if path == "/dirty":
        query(conn, "SET work_mem = '7MB'")
        query(conn, "CREATE TEMP TABLE leaked_tmp (x int)")
        query(conn, "SELECT pg_advisory_lock(%s)", LOCK_KEY)
        query(conn, "LISTEN leaked_channel")
    elif path == "/inspect":
        (row,) = query(
            conn,
            "SELECT current_setting('work_mem'), "
            "to_regclass('pg_temp.leaked_tmp') IS NOT NULL, "
            "EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "        AND pid = pg_backend_pid() AND objid = %s), "
            "ARRAY(SELECT pg_listening_channels()), "
            "current_setting('TimeZone'), current_setting('statement_timeout'), "
            "current_setting('transaction_isolation')",
            LOCK_KEY,
        )
        keys = (
            "work_mem",
            "temp_table",
            "advisory_lock",
            "listening",
            "TimeZone",
            "statement_timeout",
            "isolation",
        )
        result.update(zip(keys, row, strict=True))
    elif path == "/query":
        query(conn, "SELECT 1")
    body = json.dumps(result).encode()
    start_response("200 OK", [*HDRS, ("Content-Length", str(len(body)))])
    return [body]


def configure(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'Pacific/Auckland'")


@pytest.fixture
def client_for(make_mw: Any) -> Any:
    def make(**kwargs: Any) -> tuple[Any, Any]:
        outer, mw = stack(
            make_mw,
            session_app,
            configure=configure,
            statement_timeout="33s",
            isolation_level="repeatable read",
            **kwargs,
        )
        return webtest.TestApp(outer), mw

    return make


EXPECTED = {
    # what a later request on the same connection still sees
    "rollback": {
        "work_mem": "7MB",
        "temp_table": True,
        "advisory_lock": True,
        "listening": ["leaked_channel"],
    },
    "discard": {"work_mem": None, "temp_table": False, "advisory_lock": False, "listening": []},
}


@pytest.mark.parametrize("mode", ["rollback", "discard"])
def test_what_a_request_leaves_behind(mode: str, client_for: Any, admin: Any) -> None:
    kwargs = {} if mode == "rollback" else {"reset": mode}
    client, mw = client_for(**kwargs)
    clean = client.get("/inspect").json
    dirty = client.get("/dirty").json
    seen = client.get("/inspect").json
    assert clean["pid"] == dirty["pid"] == seen["pid"]  # one connection throughout
    expected = dict(EXPECTED[mode])
    if expected["work_mem"] is None:
        expected["work_mem"] = clean["work_mem"]
    assert {k: seen[k] for k in expected} == expected
    # Connection settings survive either way (DISCARD ALL is followed by configure again).
    assert (seen["TimeZone"], seen["statement_timeout"], seen["isolation"]) == (
        "Pacific/Auckland",
        "33s",
        "repeatable read",
    )
    assert mw.stats()["opened"] == 1
    # Another session sees the advisory lock only while it leaks.
    held = query(
        admin, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = %s", LOCK_KEY
    )[0][0]
    assert held == (1 if mode == "rollback" else 0)


def test_reset_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch, client_for: Any) -> None:
    monkeypatch.setenv("WSGI_PGCONN_RESET", "discard")
    client, mw = client_for()
    assert mw.settings.reset == "discard"
    client.get("/dirty")
    seen = client.get("/inspect").json
    assert (seen["temp_table"], seen["advisory_lock"], seen["listening"]) == (False, False, [])


def test_round_trips_of_each_mode(make_mw: Any, rt_dsn: str, rt: RoundTrips) -> None:
    outer, _ = stack(make_mw, session_app, dsn=rt_dsn, configure=configure)
    client = webtest.TestApp(outer)
    client.get("/")
    rt.reset()
    client.get("/query")
    client.get("/")  # never queries
    assert rt.counts() == {"BEGIN": 1, "SELECT $1": 1, "COMMIT": 1}  # rollback mode: nothing extra

    outer, _ = stack(make_mw, session_app, dsn=rt_dsn, configure=configure, reset="discard")
    client = webtest.TestApp(outer)
    client.get("/")
    rt.reset()
    client.get("/query")
    client.get("/")  # never queries: nothing to discard
    counts = rt.counts()
    assert counts.pop("DISCARD ALL") == 1
    assert counts.pop("SET TIME ZONE 'Pacific/Auckland'") == 1  # configure re-applied
    assert counts["SELECT $1"] == 1
    assert set(counts) <= {"BEGIN", "COMMIT", "SELECT $1"}


def test_notification_on_an_idle_connection_is_not_death(client_for: Any, admin: Any) -> None:
    """Default mode: a LISTEN leaks, NOTIFYs arrive between requests; the connection is kept."""
    client, mw = client_for()
    dirty = client.get("/dirty").json
    query(admin, "NOTIFY leaked_channel, 'hello'")
    readable, _, _ = select.select([dirty["fd"]], [], [], WAIT)
    assert readable, "the notification never arrived"
    seen = client.get("/inspect").json
    assert seen["pid"] == dirty["pid"]
    stats = mw.stats()
    assert stats["discarded"]["dead"] == 0
    assert stats["opened"] == 1
