"""Misbehaving applications: what is blocked, what is reset, what leaks to the next request.

Each case runs under ``reset=rollback`` and ``reset=discard``, on
:class:`_faultkit.PoolServer` with **one** worker thread and scope=thread,
so consecutive requests share a connection (unless it is discarded):

1. ``/probe`` on the fresh connection: the baseline state;
2. ``/act``: the misbehaviour, then the answer the case gives;
3. ``/probe`` again: the state the next request sees, and its own INSERT,
   answered 500, which must not be committed;
4. ``/write``: a plain write answered 200, which must be committed.

Outcome per case and mode: ``blocked`` (TransactionManaged), ``reset`` (the
next request sees the baseline), ``discarded`` (the next request got another
connection), ``persists`` (documented session state that ``reset=rollback``
keeps: docs/transactions.md, "Session state"), or ``LEAKS``/``BYPASS`` (a regression: the next
request is affected, or the request's own commit/rollback was subverted).
The table is printed in the terminal summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import _faultkit as kit
import dbapi
import psycopg2.extensions
import pytest

from wsgi_pgconn import TransactionManaged, get_connection

PROBE_SQL = """
SELECT current_user, session_user,
       (SELECT count(*) FROM pg_cursors),
       (SELECT count(*) FROM pg_listening_channels()),
       coalesce(current_setting('app.leak', true), ''),
       current_setting('search_path'),
       current_setting('statement_timeout'),
       current_setting('default_transaction_read_only'),
       current_setting('transaction_read_only'),
       current_setting('transaction_isolation'),
       (SELECT count(*) FROM pg_prepared_statements),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       current_setting('client_encoding')
"""
PROBE_FIELDS = (
    "current_user",
    "session_user",
    "cursors",
    "listening",
    "app.leak",
    "search_path",
    "statement_timeout",
    "default_transaction_read_only",
    "transaction_read_only",
    "transaction_isolation",
    "prepared",
    "temp_tables",
    "advisory_locks",
    "client_encoding",
)
NON_ASCII = "h\u00e9t\u00e9ro\u20ac"

# Named cursors the cases leave behind (an app that forgot them), dropped after each case.
_LEFTOVERS: list[Any] = []


@dataclasses.dataclass
class Case:
    name: str
    what: str  # for the table
    act: Callable[[Any, str, str], str]  # (conn, key, table) -> status line
    rollback: str  # expected outcome under reset=rollback
    discard: str  # ... under reset=discard
    #: which of the request's writes (key suffixes "" and "-2") must be kept if it is
    #: answered 2xx, and if it is answered 5xx (a write the app committed itself via SQL).
    kept_ok: frozenset[str] = frozenset({""})
    kept_failed: frozenset[str] = frozenset()
    #: ... if the misbehaviour was refused (the steps after it did not run); None: kept_ok.
    kept_blocked: frozenset[str] | None = None


def _insert(conn: Any, table: str, key: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (key,))


def _sql(conn: Any, *statements: str) -> None:
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)


def _then(*steps: Callable[[Any, str, str], object], status: str = "200 OK") -> Callable[..., str]:
    def act(conn: Any, key: str, table: str) -> str:
        for step in steps:
            step(conn, key, table)
        return status

    return act


def _ins(conn: Any, key: str, table: str) -> None:
    _insert(conn, table, key)


def _ins2(conn: Any, key: str, table: str) -> None:
    _insert(conn, table, key + "-2")


def _named_cursor(withhold: bool) -> Callable[[Any, str, str], None]:
    def step(conn: Any, key: str, table: str) -> None:
        cur = conn.cursor(name="leftover", withhold=withhold)
        cur.execute("SELECT generate_series(1, 10)")
        cur.fetchone()
        _LEFTOVERS.append(cur)

    return step


def _with_conn(conn: Any, key: str, table: str) -> None:
    with conn:
        _insert(conn, table, key)


def _catch_error(conn: Any, key: str, table: str) -> None:
    _insert(conn, table, key)
    with contextlib.suppress(dbapi.DataError):
        _sql(conn, "SELECT 1/0")


ROLE = "faults_other_role"

CASES = [
    Case(
        "commit()", "conn.commit()", _then(_ins, lambda c, k, t: c.commit()), "blocked", "blocked"
    ),
    Case(
        "rollback()",
        "conn.rollback()",
        _then(_ins, lambda c, k, t: c.rollback()),
        "blocked",
        "blocked",
    ),
    Case("close()", "conn.close()", _then(_ins, lambda c, k, t: c.close()), "blocked", "blocked"),
    Case(
        "autocommit",
        "conn.autocommit = True",
        _then(lambda c, k, t: setattr(c, "autocommit", True), _ins),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "with conn",
        "with conn: ... (commits on exit)",
        _then(_with_conn),
        "blocked",
        "blocked",
        kept_blocked=frozenset(),  # refused on entry, before the write
    ),
    Case(
        "tpc_begin()",
        "conn.tpc_begin(xid)",
        _then(lambda c, k, t: c.tpc_begin(c.xid(1, "g", "b")), _ins),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "SQL COMMIT",
        "cur.execute('COMMIT'), write again, answer 500",
        _then(_ins, lambda c, k, t: _sql(c, "COMMIT"), _ins2, status="500 Oops"),
        "reset",
        "reset",
        kept_failed=frozenset({""}),
    ),
    Case(
        "SQL ROLLBACK",
        "cur.execute('ROLLBACK'), write again, answer 200",
        _then(_ins, lambda c, k, t: _sql(c, "ROLLBACK"), _ins2),
        "reset",
        "reset",
        kept_ok=frozenset({"-2"}),
    ),
    Case(
        "named cursor",
        "server-side cursor left open",
        _then(_named_cursor(False), _ins),
        "reset",
        "reset",
    ),
    Case(
        "named cursor WITH HOLD",
        "conn.cursor(name, withhold=True) left open",
        _then(_named_cursor(True), _ins),
        "persists",
        "reset",
    ),
    Case(
        "LISTEN",
        "LISTEN chan",
        _then(lambda c, k, t: _sql(c, "LISTEN faults_chan"), _ins),
        "persists",
        "reset",
    ),
    Case(
        "SET ROLE",
        f"SET ROLE {ROLE}",
        _then(_ins, lambda c, k, t: _sql(c, f"SET ROLE {ROLE}")),
        "persists",
        "reset",
    ),
    Case(
        "SET",
        "SET app.leak / search_path / statement_timeout",
        _then(
            _ins,
            lambda c, k, t: _sql(
                c,
                "SET app.leak = 'x'",
                "SET search_path = pg_catalog",
                "SET statement_timeout = '42s'",
            ),
        ),
        "persists",
        "reset",
    ),
    Case(
        "set_config(.., false)",
        "set_config('app.leak', 'x', false)",
        _then(_ins, lambda c, k, t: _sql(c, "SELECT set_config('app.leak', 'x', false)")),
        "persists",
        "reset",
    ),
    Case(
        "SET LOCAL",
        "SET LOCAL / set_config(.., true)",
        _then(
            _ins,
            lambda c, k, t: _sql(
                c, "SET LOCAL statement_timeout = '42s'", "SELECT set_config('app.leak', 'x', true)"
            ),
        ),
        "reset",
        "reset",
    ),
    Case(
        "SET SESSION CHARACTERISTICS",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        _then(
            _ins, lambda c, k, t: _sql(c, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        ),
        "persists",
        "reset",
    ),
    Case(
        "pg_advisory_lock",
        "session advisory lock never released",
        _then(_ins, lambda c, k, t: _sql(c, "SELECT pg_advisory_lock(777)")),
        "persists",
        "reset",
    ),
    Case(
        "PREPARE",
        "SQL PREPARE",
        _then(_ins, lambda c, k, t: _sql(c, "PREPARE p AS SELECT 1")),
        "persists",
        "reset",
    ),
    Case(
        "TEMP TABLE",
        "CREATE TEMP TABLE",
        _then(_ins, lambda c, k, t: _sql(c, "CREATE TEMP TABLE tt (x int)")),
        "persists",
        "reset",
    ),
    Case(
        "caught error, 200",
        "catches a database error, answers 200",
        _then(_catch_error),
        "reset",
        "reset",
    ),
]

def _transaction_block(conn: Any, key: str, table: str) -> None:
    with conn.transaction():  # a savepoint of the request's transaction
        _insert(conn, table, key)


SERIALIZABLE = psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE

#: Ways of ending or reconfiguring the transaction that exist on one driver only.
PSYCOPG2_CASES = [
    Case(
        "set_session()",
        "conn.set_session(readonly=True)",
        _then(lambda c, k, t: c.set_session(readonly=True), _ins),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "set_isolation_level(0)",
        "conn.set_isolation_level(0), write, answer 500",
        _then(lambda c, k, t: c.set_isolation_level(0), _ins, status="500 Oops"),
        "blocked",
        "blocked",
        kept_blocked=frozenset(),
    ),
    Case(
        "isolation_level =",
        "conn.isolation_level = SERIALIZABLE (before any query)",
        _then(
            lambda c, k, t: setattr(c, "isolation_level", SERIALIZABLE), _ins
        ),
        "blocked",
        "blocked",
        kept_blocked=frozenset(),
    ),
    Case(
        "readonly =",
        "conn.readonly = True (before any query)",
        _then(lambda c, k, t: setattr(c, "readonly", True)),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "deferrable =",
        "conn.deferrable = True (before any query)",
        _then(lambda c, k, t: setattr(c, "deferrable", True)),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "reset()",
        "conn.reset() after a write, answer 200",
        _then(_ins, lambda c, k, t: c.reset()),
        "blocked",
        "blocked",
    ),
    Case(
        "set_client_encoding()",
        "conn.set_client_encoding('LATIN1') after a write",
        _then(_ins, lambda c, k, t: c.set_client_encoding("LATIN1")),
        "blocked",
        "blocked",
    ),
]
PSYCOPG_CASES = [
    Case(
        "set_autocommit()",
        "conn.set_autocommit(True)",
        _then(lambda c, k, t: c.set_autocommit(True), _ins),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "isolation_level =",
        "conn.isolation_level = SERIALIZABLE (before any query)",
        _then(lambda c, k, t: setattr(c, "isolation_level", dbapi.module.IsolationLevel(4)), _ins),
        "blocked",
        "blocked",
        kept_blocked=frozenset(),
    ),
    Case(
        "read_only =",
        "conn.read_only = True (before any query)",
        _then(lambda c, k, t: setattr(c, "read_only", True)),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "deferrable =",
        "conn.deferrable = True (before any query)",
        _then(lambda c, k, t: setattr(c, "deferrable", True)),
        "blocked",
        "blocked",
        kept_ok=frozenset(),
    ),
    Case(
        "transaction()",
        "with conn.transaction(): write; answer 500",
        _then(_transaction_block, status="500 Oops"),
        "reset",
        "reset",
    ),
]
CASES += PSYCOPG2_CASES if dbapi.PSYCOPG2 else PSYCOPG_CASES


#: (case, mode) -> (action result, next-request outcome, detail) for the table.
TABLE: dict[tuple[str, str], tuple[str, str, str]] = {}


def _roundtrip(conn: Any) -> object:
    """Whether a non-ASCII string survives a round trip (an error may abort the transaction)."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT %s", (NON_ASCII,))
            (value,) = cur.fetchone()
    except (UnicodeError, dbapi.Error) as exc:
        return type(exc).__name__
    return value == NON_ASCII


def _probe(conn: Any) -> dict[str, Any]:
    client = {
        "conn.transaction_status": int(conn.info.transaction_status),
        "conn.autocommit": conn.autocommit,
        "conn.read_only": conn.readonly if dbapi.PSYCOPG2 else conn.read_only,
        "conn.deferrable": conn.deferrable,
        "conn.isolation_level": conn.isolation_level,
        "conn.encoding": conn.encoding if dbapi.PSYCOPG2 else conn.info.encoding,
    }
    with conn.cursor() as cur:
        cur.execute(PROBE_SQL)
        row = cur.fetchone()
    state = dict(zip(PROBE_FIELDS, row, strict=True))
    state["non_ascii_roundtrip"] = _roundtrip(conn)
    return {**client, **state}


def _app(case: Case, table: str, side: kit.Side, seen: dict[str, Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        conn = get_connection(environ)
        path, key = environ["PATH_INFO"], kit.query_key(environ)
        side.saw(key, conn)
        status = "200 OK"
        if path == "/probe":
            seen[key] = _probe(conn)
            _insert(conn, table, key)
            status = "500 Probe"
        elif path == "/act":
            try:
                status = case.act(conn, key, table)
                seen[key] = "allowed"
            except TransactionManaged:
                seen[key] = "blocked"
        elif path == "/write":
            _insert(conn, table, key)
        start_response(status, [("Content-Length", "0")])
        return [b""]

    return app


@pytest.fixture(scope="module")
def other_role(pg: Any, test_db: str) -> Iterator[str]:
    admin = kit.Admin(pg.dsn(dbname=test_db, application_name="faults-admin"))
    try:
        admin.rows(f"DROP ROLE IF EXISTS {ROLE}")
        admin.rows(f"CREATE ROLE {ROLE} NOLOGIN")
        admin.rows(f"GRANT ALL ON SCHEMA public TO {ROLE}")
        yield ROLE
        admin.rows(f"REVOKE ALL ON SCHEMA public FROM {ROLE}")
        admin.rows(f"DROP ROLE {ROLE}")
    finally:
        admin.close()


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for mode in ("rollback", "discard"):
            params.append(pytest.param(case, mode, id=f"{case.name}-{mode}"))
    return params


@pytest.mark.parametrize(("case", "mode"), _params())
def test_misbehaving_application(
    case: Case,
    mode: str,
    make_mw: Any,
    dsn: str,
    app_name: str,
    fadmin: kit.Admin,
    ledger_table: str,
    other_role: str,
) -> None:
    side = kit.Side()
    seen: dict[str, Any] = {}
    mw = make_mw(_app(case, ledger_table, side, seen), dsn=dsn, reset=mode)
    server = kit.PoolServer(mw, workers=1)
    key = "m-" + uuid.uuid4().hex[:8]
    base, act, probe, write = (f"{key}-{n}" for n in ("base", "act", "probe", "write"))
    try:
        assert kit.http(server.port, f"/probe?k={base}").status == 500
        act_resp = kit.http(server.port, f"/act?k={act}")
        assert kit.http(server.port, f"/probe?k={probe}").status == 500
        write_resp = kit.http(server.port, f"/write?k={write}")
        rows = fadmin.keys(ledger_table)
        stats = mw.stats()
    finally:
        server.close()
        mw.close()
        for cur in _LEFTOVERS:  # psycopg 3 warns about a cursor collected open
            with contextlib.suppress(dbapi.Error):
                cur.close()
        _LEFTOVERS.clear()
    kit.deadline_wait(lambda: not fadmin.backends(app_name), 10, "no backend left")
    baseline, after = seen[base], seen.get(probe)

    # The misbehaving request itself: a 2xx keeps what it wrote, a 5xx keeps nothing
    # (but what the application explicitly committed with SQL).
    kept = frozenset(suffix for suffix in ("", "-2") if rows.get(act + suffix))
    if seen.get(act) == "blocked" and case.kept_blocked is not None:
        expected_kept = case.kept_blocked
    elif 200 <= act_resp.status < 300:
        expected_kept = case.kept_ok
    else:
        expected_kept = case.kept_failed
    request_level = "ok"
    if kept != expected_kept:
        request_level = (
            f"BYPASS: answered {act_resp.status}, kept writes {sorted(kept)} "
            f"instead of {sorted(expected_kept)}"
        )

    # The next request on the connection.
    changed = sorted(
        f for f in baseline if after is not None and after[f] != baseline[f]
    )
    problems = []
    if after is None:
        problems.append("the probe request never ran")
    elif side.pids[probe] == side.pids[act]:
        if after["conn.transaction_status"] != 0:
            problems.append(f"it starts in transaction status {after['conn.transaction_status']}")
        problems += [f"{f}={after[f]!r}" for f in changed]
    if rows.get(probe):
        problems.append("its 500 was committed")
    if write_resp.status != 200 or rows.get(write) != 1:
        problems.append(f"a plain write then got {write_resp.status}")
    discarded = after is not None and side.pids[probe] != side.pids[act]
    next_level = (
        ("next request affected: " + ", ".join(problems))
        if problems
        else ("discarded" if discarded else "reset")
    )

    blocked = seen.get(act) == "blocked"
    if request_level != "ok":
        outcome = "BYPASS"
    elif not problems:
        outcome = "blocked" if blocked else next_level
    elif mode == "rollback" and case.rollback == "persists":
        outcome = "persists"
    else:
        outcome = "LEAKS"
    detail = "; ".join(x for x in (request_level, next_level) if x != "ok")
    TABLE[(case.name, mode)] = (seen.get(act, "?"), outcome, detail)
    print(
        f"{case.name} [{mode}]: action {seen.get(act)}, outcome {outcome}: {detail}; stats {stats}"
    )

    expected = getattr(case, mode)
    accepted = {
        "blocked": {"blocked"},
        "persists": {"persists", "reset", "discarded"},
    }.get(expected, {"blocked", "reset", "discarded"})
    assert outcome in accepted, detail


@pytest.fixture(scope="module", autouse=True)
def _print_table() -> Iterator[None]:
    yield
    if not TABLE:
        return
    lines = [
        "misbehaving applications (PoolServer 1 thread, scope=thread):",
        f"  {'what the application does':58} | {'reset=rollback':16} | reset=discard",
    ]
    for case in CASES:
        cells = []
        for mode in ("rollback", "discard"):
            result = TABLE.get((case.name, mode))
            cells.append(result[1] if result else "-")
        lines.append(f"  {case.what[:58]:58} | {cells[0]:16} | {cells[1]}")
    details = [
        f"    {name} [{mode}]: {detail}"
        for (name, mode), (_, outcome, detail) in TABLE.items()
        if outcome in ("LEAKS", "BYPASS", "persists")
    ]
    kit.SUMMARY.extend([*lines, "  details:", *details])
