"""Server settings behind PgBouncer in transaction mode, and what the middleware sends.

PgBouncer refuses the startup parameter ``options``, so with
``pooler="transaction"`` the middleware applies statement_timeout and
idle_in_transaction_session_timeout with one ``SELECT set_config(..., true)``
at the start of each request's transaction; ``ALTER ROLE ... SET`` is the
zero-cost alternative. Nothing the middleware itself sends may depend on
session state, which transaction pooling does not keep.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import dbapi
import psycopg2
import psycopg2.errors
import pytest
from scaling_names import APP_DB, AUDIT_ROLE, CLIENT_USER, LIMITED_DB, LIMITED_TIMEOUT, POOL_ROLE
from scaling_servers import PgBouncer, poll
from scaling_wsgi import call, matrix_app, open_response

from wsgi_pgconn import ConfigurationError, PgConnMiddleware, get_connection

pytestmark = pytest.mark.cluster_only(
    "puts PgBouncer in front of the throwaway cluster's unix socket"
)

MakeMw = Callable[..., PgConnMiddleware]


def probe_app(admin_dsn: str = "") -> Callable[..., Iterable[bytes]]:
    """``/show`` the settings and backend, ``/sleep`` 5 s, ``/set`` a session-level SET,
    ``/nodb`` no query at all, ``/idle`` stay idle in transaction until the server ends it."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        if path == "/nodb":
            return [b"no database"]
        conn = get_connection(environ)
        with conn.cursor() as cur:
            if path == "/sleep":
                cur.execute("SELECT pg_sleep(5)")
            elif path == "/set":
                cur.execute("SET statement_timeout = '4321ms'")  # session level: a mistake
            elif path == "/idle":
                cur.execute("SELECT pg_backend_pid()")
                pid = (cur.fetchone() or (0,))[0]
                wait_for_backend_exit(admin_dsn, pid)
                cur.execute("SELECT 1")
            cur.execute(
                "SELECT current_setting('statement_timeout'), "
                "current_setting('idle_in_transaction_session_timeout'), pg_backend_pid()"
            )
            row = cur.fetchone() or ()
        return [" ".join(str(v) for v in row).encode()]

    return app


def wait_for_backend_exit(admin_dsn: str, pid: int) -> None:
    def gone() -> bool | None:
        conn = psycopg2.connect(admin_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
                return None if cur.fetchone() else True
        finally:
            conn.close()

    poll(f"backend {pid} ended by idle_in_transaction_session_timeout", gone, timeout=10)


def show(mw: PgConnMiddleware) -> tuple[str, str, int]:
    response = call(mw, "/show")
    assert response.ok, response
    timeout, idle, pid = response.text.split()
    return timeout, idle, int(pid)


def test_statement_timeout_through_pgbouncer(bouncer_tx: PgBouncer, make_mw: MakeMw) -> None:
    mw = make_mw(
        probe_app(),
        dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER),
        pooler="transaction",
        statement_timeout="200ms",
        idle_in_transaction_timeout="2s",
    )
    assert show(mw)[:2] == ("200ms", "2s")
    started = time.monotonic()
    response = call(mw, "/sleep")
    elapsed = time.monotonic() - started
    assert isinstance(response.error, dbapi.errors.QueryCanceled), response
    assert elapsed < 3, f"pg_sleep(5) ran {elapsed:.2f}s despite statement_timeout=200ms"
    assert show(mw)[0] == "200ms", "the connection is usable after the cancel"


def test_without_pooler_transaction_pgbouncer_refuses_options(
    bouncer_tx: PgBouncer, make_mw: MakeMw
) -> None:
    """Why the setting exists: statement_timeout as a startup option is refused: 503."""
    mw = make_mw(probe_app(), dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER), statement_timeout="200ms")
    response = call(mw, "/show")
    assert response.code == 503
    assert mw.stats()["connect_errors"] == 1
    assert "unsupported startup parameter: options" in bouncer_tx.read_log()


def test_transaction_local_settings_do_not_leak(bouncer_one: PgBouncer, make_mw: MakeMw) -> None:
    """Two clients on PgBouncer's single server connection: each sees its own settings."""
    dsn = bouncer_one.dsn(APP_DB, CLIENT_USER)
    limited = make_mw(probe_app(), dsn=dsn, pooler="transaction", statement_timeout="250ms")
    plain = make_mw(probe_app(), dsn=dsn, pooler="transaction")
    pids = set()
    for _ in range(3):
        timeout, _, pid = show(limited)
        assert timeout == "250ms"
        pids.add(pid)
        timeout, _, pid = show(plain)
        assert timeout == "0", "a transaction-local setting leaked to another client"
        pids.add(pid)
    assert len(pids) == 1, "both clients were served by the same server connection"


def test_session_level_set_leaks_between_clients(bouncer_one: PgBouncer, make_mw: MakeMw) -> None:
    """What does NOT work in transaction mode: a session-level SET reaches other clients.

    This is why the middleware never sends one, and why an application (or a
    ``configure`` hook) must use SET LOCAL / set_config(..., true) instead.
    """
    dsn = bouncer_one.dsn(APP_DB, CLIENT_USER)
    careless = make_mw(probe_app(), dsn=dsn, pooler="transaction")
    bystander = make_mw(probe_app(), dsn=dsn, pooler="transaction")
    assert show(bystander)[0] == "0"
    assert call(careless, "/set").ok
    assert show(bystander)[0] == "4321ms"


def test_alter_role_statement_timeout_costs_nothing(
    bouncer_tx: PgBouncer, make_mw: MakeMw, admin: Any
) -> None:
    """The zero-cost alternative: the role's own setting, applied by the server at login."""
    mw = make_mw(probe_app(), dsn=bouncer_tx.dsn(LIMITED_DB, CLIENT_USER), pooler="transaction")
    assert show(mw)[0] == LIMITED_TIMEOUT
    started = time.monotonic()
    response = call(mw, "/sleep")
    assert isinstance(response.error, dbapi.errors.QueryCanceled), response
    assert time.monotonic() - started < 3


def test_idle_in_transaction_timeout_through_pgbouncer(
    pg: Any, test_db: str, bouncer_tx: PgBouncer, make_mw: MakeMw
) -> None:
    """The server ends a request that stays idle in its transaction; the next one reconnects."""
    mw = make_mw(
        probe_app(pg.dsn(dbname=test_db, application_name="scaling-watch")),
        dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER),
        pooler="transaction",
        idle_in_transaction_timeout="100ms",
    )
    assert show(mw)[1] == "100ms"
    response = call(mw, "/idle")
    # psycopg 3 reads the server's FATAL (25P03); psycopg2 only sees the connection close.
    assert isinstance(response.error, dbapi.Error), response
    assert show(mw)[1] == "100ms"
    stats = mw.stats()
    assert stats["opened"] == 2
    assert stats["discarded"]["broken"] + stats["discarded"]["dead"] == 1


def test_reset_discard_is_refused_behind_a_transaction_pooler(
    monkeypatch: pytest.MonkeyPatch, bouncer_tx: PgBouncer
) -> None:
    monkeypatch.setenv("WSGI_PGCONN_POOLER", "transaction")
    with pytest.raises(ConfigurationError, match="DISCARD ALL"):
        PgConnMiddleware(probe_app(), dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER), reset="discard")
    monkeypatch.setenv("WSGI_PGCONN_POOLER", "session")
    PgConnMiddleware(probe_app(), dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER), reset="discard")


# -- what the middleware sends ---------------------------------------------------------


def statements_of(admin: Any, role: str, test_db: str) -> dict[str, int]:
    """pg_stat_statements of ``role`` in the test database: normalized query -> calls."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT query, calls FROM pg_stat_statements s "
            "JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid "
            "WHERE r.rolname = %s AND d.datname = %s",
            (role, test_db),
        )
        return {query: calls for query, calls in cur.fetchall()}


def reset_statements(admin: Any, role: str) -> None:
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_stat_statements_reset(oid, 0, 0) FROM pg_roles WHERE rolname = %s", (role,)
        )


def prelude_calls(statements: dict[str, int]) -> int:
    return sum(calls for query, calls in statements.items() if "set_config" in query)


@pytest.mark.parametrize("check", ["socket", "query"])
def test_one_extra_statement_per_request(
    bouncer_tx: PgBouncer,
    make_mw: MakeMw,
    admin: Any,
    test_db: str,
    check: str,
) -> None:
    """pooler=transaction costs one set_config per request that queries, none otherwise
    (with check="query" the ping before each request runs outside the transaction)."""
    mw = make_mw(
        probe_app(),
        dsn=bouncer_tx.dsn(APP_DB, CLIENT_USER),
        pooler="transaction",
        statement_timeout="5s",
        idle_in_transaction_timeout="10s",
        check=check,
    )
    assert show(mw)[:2] == ("5s", "10s")
    reset_statements(admin, POOL_ROLE)
    for _ in range(10):
        show(mw)
    for _ in range(5):
        assert call(mw, "/nodb").ok
    assert prelude_calls(statements_of(admin, POOL_ROLE, test_db)) == 10

    reset_statements(admin, POOL_ROLE)
    dsn = bouncer_tx.dsn(APP_DB, CLIENT_USER)
    without = make_mw(probe_app(), dsn=dsn, pooler="transaction", check=check)
    for _ in range(5):
        assert show(without)[0] == "0"
    assert prelude_calls(statements_of(admin, POOL_ROLE, test_db)) == 0, (
        "no statement_timeout setting: no prelude"
    )


#: Statements that depend on session state, which transaction pooling does not keep.
SESSION_STATE = re.compile(
    r"^\s*(SET\s+(?!LOCAL\b)|RESET\b|PREPARE\b|EXECUTE\b|DEALLOCATE\b|LISTEN\b|UNLISTEN\b"
    r"|DISCARD\b|DECLARE\b|LOAD\b)|\bWITH\s+HOLD\b|advisory_(?!xact_)\w*lock",
    re.IGNORECASE,
)

def test_middleware_sends_nothing_that_transaction_pooling_breaks(
    pg: Any, test_db: str, make_mw: MakeMw, admin: Any, table: str
) -> None:
    """Every statement the middleware sent, on every path, read back from pg_stat_statements.

    Run directly against PostgreSQL (PgBouncer adds its own SETs of tracked
    parameters such as application_name, which are its business).
    """
    dsn = pg.dsn(tcp=False, dbname=test_db, user=AUDIT_ROLE)
    reset_statements(admin, AUDIT_ROLE)
    for check in ("socket", "query"):
        mw = make_mw(
            matrix_app(table),
            dsn=dsn,
            pooler="transaction",
            statement_timeout="5s",
            idle_in_transaction_timeout="10s",
            isolation_level="repeatable read",
            check=check,
            scope="pool",
            pool_size=2,
        )
        for path in ("/ok", "/notfound", "/raise", "/exc_info", "/5xx", "/deferred", "/read"):
            call(mw, path, f"k={check}{path}")
        assert open_response(mw, "/stream", f"k={check}-stream").finish().ok
        open_response(mw, "/stream_raise", f"k={check}-stream-raise").finish()
    statements = statements_of(admin, AUDIT_ROLE, test_db)
    sent = "\n".join(sorted(statements))
    assert "set_config" in sent
    assert "BEGIN ISOLATION LEVEL REPEATABLE READ" in sent
    assert "COMMIT" in sent
    assert "ROLLBACK" in sent
    offending = [query for query in statements if SESSION_STATE.search(query)]
    assert not offending, f"session-level statements sent:\n{sent}"


# -- what holds a server connection ----------------------------------------------------


def test_server_connection_is_held_from_first_query_to_commit(
    bouncer_one: PgBouncer, make_mw: MakeMw, table: str
) -> None:
    """The sizing rule: a request holds a server connection from its first query until its
    COMMIT (for a streamed body: until close); a request without a query holds none."""
    dsn = bouncer_one.dsn(APP_DB, CLIENT_USER)
    streaming = make_mw(matrix_app(table), dsn=dsn, pooler="transaction")
    other = make_mw(probe_app(), dsn=dsn, pooler="transaction")
    assert show(other)[0] == "0"  # connect before the single server is taken

    idle = open_response(streaming, "/stream", "k=idle")  # no query yet
    assert next(iter(idle.body)) == b"first "
    assert show(other)[0] == "0", "a request that has not queried holds no server"

    body = iter(idle.body)
    assert next(body) == b"written "  # queried: the single server is now this request's
    waiting: dict[str, Any] = {}

    def blocked_request() -> None:
        waiting["response"] = call(other, "/show")

    thread = threading.Thread(target=blocked_request, daemon=True)
    thread.start()
    try:
        poll(
            "the other client waits for the server connection",
            lambda: True if bouncer_one.pool(APP_DB).get("cl_waiting") == 1 else None,
        )
        assert "response" not in waiting
    finally:
        assert idle.finish().ok  # COMMIT at close releases the server
        thread.join(20)
    assert waiting["response"].ok
    assert bouncer_one.pool(APP_DB)["cl_waiting"] == 0
