"""Round trips per request, counted on the wire (issue 14: count round trips, not statements).

A relay (:mod:`wsgi_pgconn.tooling.relay`) sits between the middleware and
the test server and counts *turns*: a client->server burst followed by a
server->client burst, the round trips a request waits for. A statement that
rides in the same message (psycopg2: ``BEGIN; <statement>``) or the same
pipeline (psycopg 3) as another costs no turn of its own.

The relay adds a small latency (:data:`RTT`), as a network would: without
it, an answer the server sends at once (an error is flushed immediately) can
reach the relay before the rest of what the client wrote without waiting
(psycopg 3's Sync after the statement), and the relay would count a turn that
no client waited for. With it, a turn is counted only when the client's next
data comes after the answer, as on a real network.

The suite runs once per driver (WSGI_PGCONN_DRIVER, see conftest.py); the
counts below are asserted for the driver of the run. The relay counts a turn
when the answer reaches it, before the client can have read it, and every
snapshot is taken after the relay has read all that was sent to it: a count
taken after a request returns is complete, with no waiting.

The second half checks that the application sees no difference: the first
statement of a request gives the same rows, ``rowcount``, ``statusmessage``,
``description``, errors and SQLSTATE as on a plain connection of the same
driver that sends BEGIN on its own.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    Response,
    call,
    clean_env_fixture,
    idle_in_transaction,
    log_records,
    query,
    stack,
)

from wsgi_pgconn import PgConnMiddleware, drivers, get_connection
from wsgi_pgconn.tooling.relay import Relay, RelayStats

pytestmark = pytest.mark.usefixtures("clean_env")

#: The driver of this run: psycopg 3 unless conftest.py hid it (WSGI_PGCONN_DRIVER=psycopg2).
DRIVER = drivers.resolve("auto")
PSYCOPG2 = DRIVER == "psycopg2"

TEXT = [("Content-Type", "text/plain")]
#: The relay's round-trip time: 1 ms each way.
RTT = 0.002

View = Callable[[Any], object]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def relay(pg: Any, test_db: str) -> Iterator[Relay]:
    """A relay (:data:`RTT`) in front of the test server."""
    params = psycopg2.extensions.parse_dsn(pg.dsn(dbname=test_db))
    host = params.get("host") or "127.0.0.1"
    port = int(params.get("port") or 5432)
    target: tuple[str, int] | str = (
        f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)
    )
    with Relay(target, rtt=RTT, handshake=False) as started:
        yield started


@pytest.fixture
def relay_dsn(pg: Any, test_db: str, app_name: str, relay: Relay) -> str:
    """The test database, reached through the relay."""
    result: str = pg.dsn(
        dbname=test_db, application_name=app_name, host="127.0.0.1", port=relay.port
    )
    return result


@pytest.fixture
def rt_table(admin: Any) -> Iterator[str]:
    """``rt_table (id int primary key, v text)`` holding (1, 'a') and (2, 'b')."""
    name = "rt_t"
    query(admin, f"DROP TABLE IF EXISTS {name}")
    query(admin, f"CREATE TABLE {name} (id int PRIMARY KEY, v text NOT NULL)")
    query(admin, f"INSERT INTO {name} VALUES (1, 'a'), (2, 'b')")
    yield name
    query(admin, f"DROP TABLE IF EXISTS {name}")


class Wire:
    """Requests to one middleware (through the relay), with the turns each one made."""

    def __init__(
        self, make_mw: Callable[..., PgConnMiddleware], relay: Relay, dsn: str, **settings: Any
    ) -> None:
        self.views: dict[str, View] = {}
        self.results: dict[str, Any] = {}
        self.relay = relay
        # psycopg 3 prepares a statement after 5 executions on a connection, at one turn of
        # its own outside a pipeline (as without wsgi_pgconn): counted apart, below.
        settings.setdefault("prepare_threshold", "off")
        self.wsgi, self.mw = stack(make_mw, self._app, dsn=dsn, **settings)
        self.view("/warm", three_queries)
        response, _ = self.request("/warm")  # the connection opens: not counted below
        assert response.code == 200

    def view(self, path: str, view: View) -> None:
        self.views[path] = view

    def _app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        self.results[path] = self.views[path](get_connection(environ))
        start_response("200 OK", TEXT)
        return [b"ok"]

    def request(self, path: str) -> tuple[Response, RelayStats]:
        before = self.relay.stats()
        response = call(self.wsgi, path)
        return response, self.relay.stats().since(before)

    def turns(self, path: str) -> int:
        response, counted = self.request(path)
        assert response.code == 200, response.body
        assert counted.accepted == 0, "the request opened a connection"
        return counted.turns


@pytest.fixture
def wire(make_mw: Any, relay: Relay, relay_dsn: str) -> Callable[..., Wire]:
    def make(**settings: Any) -> Wire:
        return Wire(make_mw, relay, relay_dsn, **settings)

    return make


def three_queries(conn: Any) -> list[Any]:
    """The issue's page: three queries. txid_current() tells whether they shared a transaction."""
    seen = []
    for sql in ("SELECT txid_current(), 1", "SELECT txid_current(), 2", "SELECT txid_current(), 3"):
        with conn.cursor() as cur:
            cur.execute(sql)
            seen.append(cur.fetchone())
    return seen


def no_query(conn: Any) -> None:
    conn.cursor().close()  # a cursor, but no statement


def plain_connect(dsn: str) -> Any:
    """A connection of the run's driver, as an application would open it (BEGIN on its own)."""
    if PSYCOPG2:
        return psycopg2.connect(dsn)
    import psycopg

    return psycopg.connect(dsn)


def sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


def driver_error() -> type[Exception]:
    if PSYCOPG2:
        return psycopg2.Error
    import psycopg

    return psycopg.Error


# -- turns per request ----------------------------------------------------------------------


def test_three_query_page_makes_four_turns(wire: Callable[..., Wire]) -> None:
    w = wire()
    w.view("/", three_queries)
    for _ in range(8):
        assert w.turns("/") == 4  # BEGIN + query 1, query 2, query 3, COMMIT
        txids = {txid for txid, _ in w.results["/"]}
        assert len(txids) == 1, "the three queries ran in one transaction"
        assert [n for _, n in w.results["/"]] == [1, 2, 3]
    assert w.mw.stats()["commits"] >= 8


def test_psycopg_preparing_statements_costs_its_own_turns(wire: Callable[..., Wire]) -> None:
    """With psycopg's default prepare threshold (5), the request that runs the three queries
    for the 6th time prepares them: +1 turn for each one that is not in BEGIN's pipeline."""
    w = wire(prepare_threshold=5)  # the default
    w.view("/", three_queries)
    turns = [w.turns("/") for _ in range(8)]  # the warm-up request ran them once
    assert turns == ([4] * 8 if PSYCOPG2 else [4, 4, 4, 4, 6, 4, 4, 4])


def test_psycopg2_sends_begin_in_the_first_statements_message(wire: Callable[..., Wire]) -> None:
    if not PSYCOPG2:
        pytest.skip("psycopg2's simple-query messages")
    w = wire()
    w.view("/", three_queries)
    _, counted = w.request("/")
    # One Query message per turn: "BEGIN; SELECT ...", two SELECTs, COMMIT.
    assert counted.to_server.types == {"Q": 4}
    assert counted.to_client.types["Z"] == 4  # one ReadyForQuery each


def test_request_that_never_queries_makes_no_turn(wire: Callable[..., Wire]) -> None:
    w = wire()
    w.view("/idle", no_query)
    for _ in range(3):
        response, counted = w.request("/idle")
        assert response.code == 200
        assert counted.turns == 0
        assert (counted.to_server.bytes, counted.to_client.bytes) == (0, 0)


def test_the_counter_sees_a_turn_when_there_is_one(wire: Callable[..., Wire]) -> None:
    """The zero above is measured: the same request plus one query makes 1 + COMMIT."""
    w = wire()

    def one_query(conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")

    w.view("/one", one_query)
    assert w.turns("/one") == 2


def test_failing_first_statement_rolls_back_in_two_turns(
    wire: Callable[..., Wire], rt_table: str, admin: Any
) -> None:
    """BEGIN + a duplicate key (one turn), ROLLBACK (one turn); then the connection is fine."""
    w = wire()
    raised: list[BaseException] = []

    def duplicate(conn: Any) -> None:
        try:
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {rt_table} VALUES (1, 'duplicate')")
        except Exception as exc:
            raised.append(exc)
            raise

    w.view("/dup", duplicate)
    w.view("/", three_queries)
    before = w.relay.stats()
    with pytest.raises(driver_error()) as info:
        call(w.wsgi, "/dup")
    assert w.relay.stats().since(before).turns == 2
    assert sqlstate(info.value) == "23505"
    assert type(info.value).__name__ == "UniqueViolation"
    assert query(admin, f"SELECT id, v FROM {rt_table} ORDER BY id") == [(1, "a"), (2, "b")]
    assert idle_in_transaction(admin) == []
    assert w.mw.stats()["rollbacks"] == 1
    assert w.turns("/") == 4  # the same connection, usable
    assert w.mw.stats()["opened"] == 1


def test_failing_first_statement_caught_and_answered_200_becomes_500(
    wire: Callable[..., Wire], rt_table: str, admin: Any
) -> None:
    w = wire()

    def swallow(conn: Any) -> str:
        with conn.cursor() as cur:
            try:
                cur.execute(f"INSERT INTO {rt_table} VALUES (1, 'duplicate')")
            except driver_error():
                pass
        return "swallowed"

    w.view("/", swallow)
    response, counted = w.request("/")
    assert response.code == 500
    assert counted.turns == 2  # BEGIN + INSERT, ROLLBACK
    assert query(admin, f"SELECT count(*) FROM {rt_table}") == [(2,)]


def test_syntax_error_in_the_first_statement_caught_still_becomes_500(
    wire: Callable[..., Wire], rt_table: str, admin: Any
) -> None:
    """As without the fast path: the transaction failed, later statements fail, nothing is saved."""
    w = wire()
    later: list[str] = []

    def swallow(conn: Any) -> None:
        with conn.cursor() as cur:
            try:
                cur.execute("SELEC 1")
            except driver_error() as exc:
                later.append(f"first: {sqlstate(exc)}")
            try:
                cur.execute(f"INSERT INTO {rt_table} VALUES (3, 'after the error')")
                later.append("second: ran")
            except driver_error() as exc:
                later.append(f"second: {sqlstate(exc)}")

    w.view("/", swallow)
    response, _ = w.request("/")
    assert later == ["first: 42601", "second: 25P02"]  # in failed transaction
    assert response.code == 500
    assert query(admin, f"SELECT count(*) FROM {rt_table}") == [(2,)]


def test_uncaught_syntax_error_in_the_first_statement_logs_no_warning(
    wire: Callable[..., Wire],
) -> None:
    w = wire()

    def typo(conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute("SELEC 1")

    w.view("/", typo)
    with log_records() as records, pytest.raises(driver_error()):
        call(w.wsgi, "/")
    assert [r.getMessage() for r in records if r.levelname == "WARNING"] == []


# -- first statements that take another path ---------------------------------------------------


def executemany_first(table: str) -> View:
    def view(conn: Any) -> int:
        with conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} VALUES (%s, %s)", [(10, "x"), (11, "y"), (12, "z")]
            )
            return int(cur.rowcount)

    return view


def named_cursor_first(conn: Any) -> list[Any]:
    with conn.cursor(name="rt_named") as cur:
        cur.execute("SELECT generate_series(1, 5)")
        return [row[0] for row in cur.fetchall()]


def copy_first(table: str) -> View:
    def view(conn: Any) -> None:
        with conn.cursor() as cur:
            if PSYCOPG2:
                cur.copy_expert(f"COPY {table} FROM STDIN", io.StringIO("20\tc\n21\td\n"))
            else:
                with cur.copy(f"COPY {table} FROM STDIN") as copy:
                    copy.write("20\tc\n21\td\n")

    return view


#: (turns under the middleware, turns on a plain connection of the driver that sends BEGIN
#: itself), COMMIT included. psycopg2 sends BEGIN alone before executemany (then one turn
#: per row) and before COPY (which takes two: CopyInResponse, then the data); a named
#: cursor's DECLARE carries BEGIN, then come FETCH, psycopg2's check that the cursor exists
#: and CLOSE (psycopg2 alone: BEGIN, DECLARE, FETCH, CLOSE: as many). psycopg 3 puts BEGIN
#: into executemany's pipeline (psycopg alone syncs after BEGIN there: one turn more), and
#: sends it alone before a server-side cursor and before COPY.
OTHER_PATHS = {
    "psycopg2": {"executemany": (5, 5), "named cursor": (5, 5), "copy": (4, 4)},
    "psycopg": {"executemany": (2, 3), "named cursor": (6, 6), "copy": (4, 4)},
}


@pytest.mark.parametrize("path", ["executemany", "named cursor", "copy"])
def test_first_statements_that_cannot_carry_begin(
    path: str, wire: Callable[..., Wire], rt_table: str, admin: Any, relay: Relay, relay_dsn: str
) -> None:
    views: dict[str, View] = {
        "executemany": executemany_first(rt_table),
        "named cursor": named_cursor_first,
        "copy": copy_first(rt_table),
    }
    expected = {
        "executemany": [(1, "a"), (2, "b"), (10, "x"), (11, "y"), (12, "z")],
        "named cursor": [(1, "a"), (2, "b")],
        "copy": [(1, "a"), (2, "b"), (20, "c"), (21, "d")],
    }
    middleware_turns, plain_turns = OTHER_PATHS[DRIVER][path]

    # The driver alone, BEGIN sent by itself: what the application would pay without us.
    conn = plain_connect(relay_dsn)
    try:
        before = relay.stats()
        views[path](conn)
        conn.commit()
        assert relay.stats().since(before).turns == plain_turns
    finally:
        conn.close()
    assert query(admin, f"SELECT id, v FROM {rt_table} ORDER BY id") == expected[path]
    query(admin, f"DELETE FROM {rt_table} WHERE id > 2")

    w = wire()
    w.view("/", views[path])
    assert w.turns("/") == middleware_turns
    assert query(admin, f"SELECT id, v FROM {rt_table} ORDER BY id") == expected[path]
    if path == "executemany":
        assert w.results["/"] == 3
    if path == "named cursor":
        assert w.results["/"] == [1, 2, 3, 4, 5]


def test_savepoint_first_then_rolled_back_to(
    wire: Callable[..., Wire], rt_table: str, admin: Any
) -> None:
    """A savepoint opens the request; a failing insert is undone to it; the rest commits."""

    def view(conn: Any) -> str:
        with conn.cursor() as cur:
            if PSYCOPG2:
                cur.execute("SAVEPOINT rt_sp")  # carries BEGIN
                try:
                    cur.execute(f"INSERT INTO {rt_table} VALUES (1, 'duplicate')")
                except psycopg2.errors.UniqueViolation:
                    cur.execute("ROLLBACK TO SAVEPOINT rt_sp")
            else:
                import psycopg

                try:
                    with conn.transaction():  # BEGIN alone, then SAVEPOINT
                        cur.execute(f"INSERT INTO {rt_table} VALUES (1, 'duplicate')")
                except psycopg.errors.UniqueViolation:
                    pass  # rolled back to the savepoint and released
            cur.execute(f"INSERT INTO {rt_table} VALUES (3, 'kept')")
            return str(cur.statusmessage)

    w = wire()
    w.view("/", view)
    # psycopg2: BEGIN + SAVEPOINT, INSERT (fails), ROLLBACK TO, INSERT, COMMIT.
    # psycopg: BEGIN, SAVEPOINT, INSERT (fails), ROLLBACK TO, RELEASE (psycopg sends them
    # one by one), INSERT, COMMIT.
    assert w.turns("/") == (5 if PSYCOPG2 else 7)
    assert w.results["/"] == "INSERT 0 1"
    assert query(admin, f"SELECT id, v FROM {rt_table} ORDER BY id") == [
        (1, "a"),
        (2, "b"),
        (3, "kept"),
    ]


# -- settings ----------------------------------------------------------------------------------


def test_without_pipeline_begin_the_page_makes_five_turns(wire: Callable[..., Wire]) -> None:
    w = wire(pipeline_begin=False)
    w.view("/", three_queries)
    for _ in range(3):
        assert w.turns("/") == 5  # BEGIN, query 1, query 2, query 3, COMMIT
        assert len({txid for txid, _ in w.results["/"]}) == 1


def page_reading(*settings: str) -> View:
    def view(conn: Any) -> list[Any]:
        seen = []
        for name in (*settings, "transaction_isolation", "application_name")[:3]:
            with conn.cursor() as cur:
                cur.execute("SELECT current_setting(%s)", (name,))
                seen.append(cur.fetchone()[0])
        return seen

    return view


def test_on_begin_statement_costs_its_own_turn_and_carries_begin(
    wire: Callable[..., Wire],
) -> None:
    calls = []

    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        calls.append(environ["PATH_INFO"])
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('rt.user', %s, true)", (environ["PATH_INFO"],))

    w = wire(on_begin=on_begin)
    w.view("/page", page_reading("rt.user"))
    w.view("/idle", no_query)
    for _ in range(2):
        # BEGIN + the hook's statement, query 1, query 2, query 3, COMMIT
        assert w.turns("/page") == 5
        assert w.results["/page"][:2] == ["/page", "read committed"]
    calls.clear()
    assert w.turns("/idle") == 0
    assert calls == []  # a request that never queries never runs the hook


def test_on_begin_with_two_statements_costs_two_turns(wire: Callable[..., Wire]) -> None:
    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('rt.user', 'alice', true)")
            cur.execute("SET LOCAL statement_timeout = '7s'")

    w = wire(on_begin=on_begin)
    w.view("/", page_reading("rt.user", "statement_timeout"))
    assert w.turns("/") == 6
    assert w.results["/"][:2] == ["alice", "7s"]


@pytest.mark.parametrize(
    "settings",
    [
        {"isolation_level": "serializable"},
        {"pooler": "transaction", "statement_timeout": "7s"},
        {"pooler": "transaction", "statement_timeout": "7s", "isolation_level": "repeatable read"},
    ],
    ids=["isolation level", "pooler prelude", "both"],
)
def test_isolation_level_and_pooler_prelude_ride_with_begin(
    settings: dict[str, str], wire: Callable[..., Wire]
) -> None:
    w = wire(**settings)
    w.view("/", page_reading("statement_timeout", "transaction_isolation"))
    for _ in range(3):
        assert w.turns("/") == 4
        timeout, isolation = w.results["/"][:2]
        assert isolation == settings.get("isolation_level", "read committed")
        assert timeout == ("7s" if "pooler" in settings else "0")


# -- what the application sees: the same as without the fast path -----------------------------

#: (statement, parameters), labelled; {t} is the test table, holding (1, 'a') and (2, 'b').
FIRST_STATEMENTS = [
    pytest.param("SELECT 1 AS one, 'x'::text AS two", None, id="select"),
    pytest.param("SELECT %s::int + 1 AS answer", (41,), id="select with parameters"),
    pytest.param(
        "SELECT g, g * 2 AS double FROM generate_series(1, 3) AS g", None, id="several rows"
    ),
    pytest.param("SELECT id FROM {t} WHERE id < 0", None, id="no rows"),
    pytest.param("INSERT INTO {t} VALUES (100, 'new')", None, id="insert"),
    pytest.param(
        "INSERT INTO {t} VALUES (101, 'new') RETURNING id, v", None, id="insert returning"
    ),
    pytest.param("UPDATE {t} SET v = v || '!' WHERE id IN (1, 2)", None, id="update"),
    pytest.param("DELETE FROM {t} WHERE id = -1", None, id="delete nothing"),
    pytest.param("SET LOCAL statement_timeout = '3s'", None, id="set local"),
    pytest.param(b"SELECT 'bytes' AS b", None, id="bytes"),
    pytest.param("INSERT INTO {t} VALUES (1, 'duplicate')", None, id="unique violation"),
    pytest.param("SELECT 1 / 0", None, id="division by zero"),
    pytest.param("SELECT * FROM rt_no_such_table", None, id="undefined table"),
    pytest.param("SELECT no_such_column FROM {t}", None, id="undefined column"),
    pytest.param("SELEC 1", None, id="syntax error"),
    pytest.param("SELECT 1 AS first; SELECT 2 AS second", None, id="two statements"),
]

#: First statements that cannot take the fast path, and the turns the request takes.
SLOW_FIRST = {
    # psycopg2: the syntax error refuses "BEGIN; SELEC 1" whole; BEGIN goes again alone
    # and the statement fails inside the transaction, as without the fast path.
    ("psycopg2", "SELEC 1"): 4,
    # psycopg 3: a query without parameters holding several statements cannot go in a
    # pipeline (extended protocol): BEGIN goes alone first.
    ("psycopg", "SELECT 1 AS first; SELECT 2 AS second"): 3,
}


def observe(conn: Any, statement: str | bytes, params: Any) -> dict[str, Any]:
    """Everything the application can see of one statement on ``conn``."""
    seen: dict[str, Any] = {}
    cur = conn.cursor()
    try:
        try:
            cur.execute(statement, params)
        except driver_error() as exc:
            seen["error"] = type(exc).__name__
            seen["sqlstate"] = sqlstate(exc)
            seen["message"] = exc.diag.message_primary
        else:
            seen["rowcount"] = cur.rowcount
            seen["statusmessage"] = cur.statusmessage
            if cur.description is None:
                seen["description"] = None
            else:
                seen["description"] = [(c.name, c.type_code) for c in cur.description]
                seen["rows"] = cur.fetchall()
            if PSYCOPG2:
                seen["query"] = cur.query
        status = conn.get_transaction_status() if PSYCOPG2 else conn.info.transaction_status
        seen["transaction_status"] = int(status)
    finally:
        cur.close()
    return seen


@pytest.mark.parametrize(("statement", "params"), FIRST_STATEMENTS)
def test_first_statement_looks_the_same_to_the_application(
    statement: str | bytes,
    params: Any,
    wire: Callable[..., Wire],
    rt_table: str,
    relay_dsn: str,
) -> None:
    if isinstance(statement, bytes):
        statement = statement.replace(b"{t}", rt_table.encode())
    else:
        statement = statement.replace("{t}", rt_table)

    conn = plain_connect(relay_dsn)  # BEGIN sent by the driver itself
    try:
        expected = observe(conn, statement, params)
        conn.rollback()
    finally:
        conn.close()

    w = wire()
    w.view("/", lambda conn: observe(conn, statement, params))
    before = w.relay.stats()
    response = call(w.wsgi, "/")
    turns = w.relay.stats().since(before).turns
    assert w.results["/"] == expected
    # BEGIN + the statement, then COMMIT (ROLLBACK after an error), unless it is slow.
    assert turns == SLOW_FIRST.get(("psycopg2" if PSYCOPG2 else "psycopg", statement), 2)
    assert response.code == (500 if "error" in expected else 200)


def test_psycopg2_cursor_query_is_the_applications_own(wire: Callable[..., Wire]) -> None:
    if not PSYCOPG2:
        pytest.skip("cursor.query is psycopg2's")

    def view(conn: Any) -> list[Any]:
        seen = []
        with conn.cursor() as cur:
            cur.execute("SELECT %s::int AS n", (1,))
            seen.append(cur.query)
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT %s::int AS n", (2,))
            seen.append((cur.query, cur.fetchone()))
        return seen

    w = wire()
    w.view("/", view)
    assert w.turns("/") == 3
    assert w.results["/"] == [b"SELECT 1::int AS n", (b"SELECT 2::int AS n", {"n": 2})]

    def dict_first(conn: Any) -> Any:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute("SELECT %s::int AS n", (3,))
            return cur.query, cur.fetchone()

    w.view("/dict", dict_first)
    assert w.turns("/dict") == 2
    assert w.results["/dict"] == (b"SELECT 3::int AS n", {"n": 3})
