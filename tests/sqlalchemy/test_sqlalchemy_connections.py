"""Which connection SQLAlchemy uses, what it costs, and what happens at the edges.

Connections are counted in pg_stat_activity by application_name: the
middleware's carry the test's ``app_name``, the engine's own (outside
requests) ``<app_name>-sa``. Round trips are counted on the wire
(:class:`sa_helpers.WireCounter`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy
from sa_helpers import driver_name, sa_url
from sqlalchemy import event, select, text
from sqlalchemy.orm import Session
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    backends,
    call,
    deadline_poll,
    idle_in_transaction,
    log_records,
    query,
    rt_dsn_fixture,
    rt_fixture,
    rt_role_fixture,
    stack,
    threads_fixture,
)

import wsgi_pgconn.sqlalchemy as pgconn_sa
from wsgi_pgconn import ConfigurationError, TransactionManaged, get_connection


def ok(start_response: Any, body: bytes = b"") -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def pid_page(engine: sqlalchemy.engine.Engine) -> Any:
    """Answers "<pid seen by the ORM> <pid of the request's connection>"."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            orm_pid = session.scalar(text("SELECT pg_backend_pid()"))
        raw_pid = get_connection(environ).info.backend_pid
        return ok(start_response, f"{orm_pid} {raw_pid}".encode())

    return app


def sa_backends(admin: Any, app_name: str) -> list[tuple[int, str]]:
    return backends(admin, app_name + "-sa")


# -- one connection ------------------------------------------------------------------------


def test_one_backend_across_100_requests_and_no_pool_connection(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str
) -> None:
    engine = make_engine()
    outer, mw = stack(make_mw, pid_page(engine), configure=pgconn_sa.configure)
    pids = set()
    for _ in range(100):
        response = call(outer)
        assert response.code == 200
        orm_pid, raw_pid = response.body.split()
        assert orm_pid == raw_pid
        pids.add(int(raw_pid))
    assert len(pids) == 1
    assert [pid for pid, _ in backends(admin, app_name)] == list(pids)
    assert sa_backends(admin, app_name) == []  # SQLAlchemy opened none of its own
    assert idle_in_transaction(admin) == []
    assert mw.stats()["opened"] == 1


def test_threads_each_use_their_requests_connection(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str, threads: Any
) -> None:
    engine = make_engine()
    outer, _mw = stack(make_mw, pid_page(engine), configure=pgconn_sa.configure)
    pool = threads(4)
    seen = [pool.each(lambda i: call(outer).body.split()) for _ in range(10)]
    per_worker = [{tuple(round_[i]) for round_ in seen} for i in range(4)]
    for pairs in per_worker:
        (pair,) = pairs  # one connection per worker thread, the same every time
        assert pair[0] == pair[1]
    assert len({pair for pairs in per_worker for pair in pairs}) == 4
    assert len(backends(admin, app_name)) == 4
    assert sa_backends(admin, app_name) == []


def test_outside_requests_an_ordinary_engine(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str, items: Any, table: str
) -> None:
    engine = make_engine(pool_size=2)
    cls, tbl = items
    with engine.begin() as conn:
        conn.execute(tbl.insert().values(k="cli", pos=1))
    with Session(engine) as session:
        session.add(cls("job"))
        session.commit()
        (pid,) = [session.scalar(text("SELECT pg_backend_pid()"))]
    assert [p for p, _ in sa_backends(admin, app_name)] == [pid]
    with engine.connect() as conn:
        conn.execute(tbl.insert().values(k="never", pos=1))  # rolled back at close
    assert [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")] == ["cli", "job"]

    # A request meanwhile uses the middleware's connection, not the pool's.
    outer, _mw = stack(make_mw, pid_page(engine), configure=pgconn_sa.configure)
    orm_pid, raw_pid = call(outer).body.split()
    assert orm_pid == raw_pid
    assert int(orm_pid) != pid
    assert engine.pool.checkedout() == 0
    assert [p for p, _ in sa_backends(admin, app_name)] == [pid]


def test_two_sqlalchemy_connections_in_one_request(
    make_mw: Any, make_engine: Any, admin: Any, items: Any, table: str
) -> None:
    """A Session and a Core connection open at once: both on the request's connection."""
    engine = make_engine()
    cls, tbl = items
    pids: set[int] = set()
    count = iter(range(100))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        n = next(count)
        with Session(engine) as session, engine.connect() as conn:
            session.add(cls(f"orm{n}"))
            session.flush()
            conn.execute(tbl.insert().values(k=f"core{n}", pos=1))
            pids.add(conn.scalar(text("SELECT pg_backend_pid()")))
            pids.add(session.scalar(text("SELECT pg_backend_pid()")))
            conn.commit()
            session.commit()
        return ok(start_response)

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    for _ in range(3):
        assert call(outer).code == 200
    assert len(pids) == 1
    assert [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")] == [
        "orm0",
        "core0",
        "orm1",
        "core1",
        "orm2",
        "core2",
    ]


# -- round trips ---------------------------------------------------------------------------


def _three_queries_raw(environ: dict[str, Any], start_response: Any, table: str) -> list[bytes]:
    with get_connection(environ).cursor() as cur:
        for sql in (f"SELECT count(*) FROM {table}", "SELECT 1", "SELECT pg_backend_pid()"):
            cur.execute(sql)
            cur.fetchall()
    return ok(start_response)


@pytest.mark.parametrize("commit", [False, True], ids=["close", "commit"])
def test_round_trips(
    make_mw: Any, make_engine: Any, wire: Any, dsn: str, table: str, items: Any, commit: bool
) -> None:
    """The ORM page costs what the same page costs in raw SQL, but a rollback.

    Raw: BEGIN rides with the first query, then 2 queries, COMMIT: 4 round
    trips. ORM: the SAVEPOINT rides along too; Session.commit() sends
    nothing; Session.close() with the transaction open sends ROLLBACK TO
    SAVEPOINT (one round trip). (psycopg 3's prepared statements are turned
    off here: psycopg discards them at every ROLLBACK, ROLLBACK TO SAVEPOINT
    included, which costs a DEALLOCATE ALL and the prepares again, as it does
    without wsgi_pgconn.)
    """
    _cls, tbl = items
    engine = make_engine(sa_url(wire.dsn(dsn)))

    def raw(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return _three_queries_raw(environ, start_response, table)

    def orm(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            session.execute(select(sqlalchemy.func.count()).select_from(tbl)).all()
            session.execute(select(1)).all()
            session.execute(select(sqlalchemy.func.pg_backend_pid())).all()
            if commit:
                session.commit()
        return ok(start_response)

    def per_request(app: Any) -> int:
        outer, _mw = stack(
            make_mw,
            app,
            dsn=wire.dsn(dsn),
            configure=pgconn_sa.configure,
            # psycopg 3 discards its prepared statements at every ROLLBACK (TO
            # SAVEPOINT too) and prepares them again later: counted apart.
            prepare_threshold="none",
        )
        for _ in range(3):  # connect and set up
            call(outer)
        trips = []
        for _ in range(10):
            wire.reset()
            assert call(outer).code == 200
            trips.append(wire.trips)
        (per,) = set(trips)
        return per

    assert per_request(raw) == 4
    assert per_request(orm) == (4 if commit else 5)


def test_statements_of_an_orm_request(
    make_mw: Any, make_engine: Any, rt_dsn: str, rt: Any, items: Any
) -> None:
    """What the server runs: BEGIN, SAVEPOINT, the work, ROLLBACK TO SAVEPOINT, COMMIT."""
    cls, _tbl = items
    engine = make_engine(sa_url(rt_dsn))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            session.add(cls(uuid.uuid4().hex))
            session.flush()
            session.rollback()  # undoes the INSERT
            session.add(cls(uuid.uuid4().hex))
            session.commit()
        return ok(start_response)

    outer, _mw = stack(make_mw, app, dsn=rt_dsn, configure=pgconn_sa.configure)
    call(outer)
    rt.reset()
    call(outer)
    kinds = sorted(
        " ".join(statement.split()[: 2 if statement.startswith("ROLLBACK") else 1])
        for statement, n in rt.counts().items()
        for _ in range(n)
    )
    assert kinds == ["BEGIN", "COMMIT", "INSERT", "INSERT", "ROLLBACK TO", "SAVEPOINT", "SAVEPOINT"]


# -- the per-connection setup ------------------------------------------------------------------


UUID_TEXT = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


def uuid_page(engine: sqlalchemy.engine.Engine) -> Any:
    """The type SQLAlchemy returns for a uuid: uuid.UUID needs the dialect's connect setup."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            value = session.scalar(
                select(sqlalchemy.cast(sqlalchemy.literal(UUID_TEXT), sqlalchemy.Uuid()))
            )
        return ok(start_response, type(value).__name__.encode())

    return app


def test_connect_setup_when_the_connection_opens(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str
) -> None:
    """With configure=..., connect listeners run at connection open, outside a transaction."""
    engine = make_engine()
    calls: list[Any] = []

    @event.listens_for(engine, "connect")
    def set_search_path(dbapi_connection: Any, record: Any) -> None:
        # The recipe of SQLAlchemy's documentation: autocommit around a SET.
        calls.append(dbapi_connection.info.transaction_status)
        before = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute("SET search_path TO pg_catalog, public")
        cursor.close()
        dbapi_connection.autocommit = before

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with engine.connect() as conn:
            path = conn.scalar(text("SHOW search_path"))
        return ok(start_response, path.encode())

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    for _ in range(3):
        assert call(outer).body == b"pg_catalog, public"
    assert calls == [0]  # once, on an idle connection
    assert sa_backends(admin, app_name) == []

    outer, _mw = stack(make_mw, uuid_page(engine), configure=pgconn_sa.configure)
    assert call(outer).body == b"UUID"


def test_without_configure_the_setup_runs_in_the_request(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str
) -> None:
    """Not wired: the engine initializes on a connection of its own, once, and says so."""
    engine = make_engine()
    outer, _mw = stack(make_mw, uuid_page(engine))
    with log_records(logging.WARNING) as records:
        assert call(outer).body == b"UUID"
    assert any("configure=wsgi_pgconn.sqlalchemy.configure" in r.getMessage() for r in records)
    assert len(sa_backends(admin, app_name)) == 1
    with log_records(logging.WARNING) as records:
        for _ in range(5):
            assert call(outer).body == b"UUID"
    assert records == []
    assert len(sa_backends(admin, app_name)) == 1  # no more

    # Another middleware connection met later: set up in its request, no new connection.
    outer2, _mw2 = stack(make_mw, uuid_page(engine))
    assert call(outer2).body == b"UUID"
    assert len(backends(admin, app_name)) == 2
    assert len(sa_backends(admin, app_name)) == 1


def test_a_connect_listener_that_cannot_run_in_a_request(make_mw: Any, make_engine: Any) -> None:
    engine = make_engine()
    with engine.connect():
        pass  # initialized outside requests

    @event.listens_for(engine, "connect")
    def autocommit_dance(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.autocommit = True

    outer, _mw = stack(make_mw, uuid_page(engine))
    with pytest.raises(sqlalchemy.exc.DBAPIError) as raised:
        call(outer)
    assert isinstance(raised.value.orig, TransactionManaged)
    assert "configure=wsgi_pgconn.sqlalchemy.configure" in str(raised.value.orig)


def test_engine_disposed_of_meets_the_connections_again(
    make_mw: Any, make_engine: Any, admin: Any, app_name: str
) -> None:
    engine = make_engine()
    outer, _mw = stack(make_mw, pid_page(engine), configure=pgconn_sa.configure)
    first = call(outer).body
    engine.dispose()  # as after a fork: a new pool
    assert call(outer).body == first
    assert sa_backends(admin, app_name) == []


# -- what is refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["SERIALIZABLE", "AUTOCOMMIT"])
def test_isolation_level_inside_a_request(make_mw: Any, make_engine: Any, level: str) -> None:
    engine = make_engine()
    errors: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with engine.connect() as conn:
            try:
                conn.execution_options(isolation_level=level)
            except Exception as exc:
                errors.append(exc)
        return ok(start_response)

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    assert call(outer).code == 200
    (error,) = errors
    assert "WSGI_PGCONN_ISOLATION_LEVEL" in str(error)


@pytest.mark.parametrize("option", ["poolclass", "isolation_level", "pool"])
def test_engine_options_refused(option: str) -> None:
    with pytest.raises(ConfigurationError, match=option):
        pgconn_sa.engine_options(**{option: None})


def test_other_dialects_refused() -> None:
    with pytest.raises(ConfigurationError, match="postgresql\\+psycopg2://"):
        pgconn_sa.create_engine("sqlite://")


def test_engine_of_the_other_driver(make_mw: Any, dsn: str) -> None:
    other = "psycopg2" if driver_name() == "psycopg" else "psycopg"
    if other == "psycopg":
        pytest.skip("psycopg 3 is blocked in this run")
    url = sa_url(dsn).set(drivername=f"postgresql+{other}")
    engine = pgconn_sa.create_engine(url)
    try:
        outer, _mw = stack(make_mw, pid_page(engine), configure=pgconn_sa.configure)
        with pytest.raises(ConfigurationError, match=f"WSGI_PGCONN_DRIVER={other}"):
            call(outer)
    finally:
        engine.dispose()


# -- sessions that outlive their request --------------------------------------------------------


def test_a_session_kept_after_its_request(make_mw: Any, make_engine: Any, items: Any) -> None:
    engine = make_engine()
    cls, _tbl = items
    kept: list[Session] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        session = Session(engine)
        session.add(cls("leaked"))
        session.flush()
        kept.append(session)  # never closed in the request
        return ok(start_response)

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    call(outer)
    (session,) = kept
    with pytest.raises(sqlalchemy.exc.StatementError) as raised:
        session.execute(text("SELECT 1"))
    assert isinstance(raised.value.orig, pgconn_sa.RequestEnded)
    assert "close sessions" in str(raised.value.orig)
    with log_records(logging.WARNING) as records:
        session.close()
    assert any("still open when the request ended" in r.getMessage() for r in records)


# -- streamed bodies ---------------------------------------------------------------------------


def test_a_streamed_body_after_the_early_commit(
    make_mw: Any, make_engine: Any, items: Any, admin: Any, table: str
) -> None:
    """The body's session work is a new savepoint, in the transaction of the body."""
    engine = make_engine()
    cls, _tbl = items

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        session = Session(engine)
        session.add(cls("view"))
        session.commit()
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            try:
                yield b"a"
                session.add(cls("body-undone"))
                session.flush()
                session.rollback()
                session.add(cls("body"))
                session.commit()
                yield b"b"
            finally:
                session.close()

        return body()

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    assert call(outer).body == b"ab"
    assert [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")] == ["view", "body"]
    assert idle_in_transaction(admin) == []


def test_connection_attributes_pass_through(make_mw: Any, make_engine: Any) -> None:
    engine = make_engine()
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with engine.connect() as conn:
            proxy = conn.connection.dbapi_connection
            seen["type"] = type(proxy).__name__
            seen["pid"] = proxy.info.backend_pid
            seen["autocommit"] = proxy.autocommit
            seen["closed"] = bool(proxy.closed)
        seen["raw"] = get_connection(environ).info.backend_pid
        return ok(start_response)

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    call(outer)
    assert seen["type"].endswith("RequestConnection")
    assert seen["pid"] == seen["raw"]
    assert seen["autocommit"] is False
    assert seen["closed"] is False


def test_concurrent_requests_do_not_share_savepoints(
    make_mw: Any, make_engine: Any, items: Any, admin: Any, table: str, threads: Any
) -> None:
    engine = make_engine()
    cls, _tbl = items
    barrier = threading.Barrier(3)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        tag = environ["PATH_INFO"].strip("/")
        with Session(engine) as session:
            session.add(cls(tag + "-undone"))
            session.flush()
            barrier.wait(10)
            session.rollback()
            session.add(cls(tag))
            session.commit()
        return ok(start_response)

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    pool = threads(3)
    tags = [uuid.uuid4().hex[:6] for _ in range(3)]
    pool.each(lambda i: call(outer, "/" + tags[i]))
    assert sorted(k for (k,) in query(admin, f"SELECT k FROM {table}")) == sorted(tags)


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        ("postgresql://u:p%40w@h:5433/db?sslmode=require", "u:p%40w@h:5433/db?sslmode=require"),
        ("host=/run/pg port=5432 dbname=d user=u", "u@/d?host=%2Frun%2Fpg&port=5432"),
        ("host=a,b port=1,2 dbname=d", "/d?host=a%2Cb&port=1%2C2"),
    ],
)
def test_engine_url(dsn: str, url: str) -> None:
    made = pgconn_sa.engine_url(dsn, driver=driver_name())
    assert made.render_as_string(hide_password=False) == f"postgresql+{driver_name()}://{url}"
    assert sqlalchemy.engine.make_url(made.render_as_string(hide_password=False)) == made


def test_idle_in_transaction_timeout_after_the_first_orm_statement(
    make_mw: Any, make_engine: Any, admin: Any
) -> None:
    """BEGIN and SAVEPOINT ride with the ORM's first statement; the server's timer stays armed."""
    engine = make_engine()
    outcome: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with Session(engine) as session:
            pid = session.scalar(text("SELECT pg_backend_pid()"))
            deadline_poll(
                lambda: not query(admin, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid),
                "the server to end the idle transaction",
            )
            try:
                session.execute(text("SELECT 1"))
            except sqlalchemy.exc.DBAPIError:
                outcome.append("ended by the server")
        return ok(start_response)

    outer, mw = stack(make_mw, app, idle_in_transaction_timeout=100, configure=pgconn_sa.configure)
    call(outer)
    assert outcome == ["ended by the server"]
    assert mw.stats()["discarded"]["broken"] == 1
