"""SQLAlchemy (ORM and Core) on the request's connection, through the full WSGI stack.

Every request runs ``validator(PgConnMiddleware(validator(app)))`` with the
engine of ``wsgi_pgconn.sqlalchemy`` and the middleware's ``configure`` hook,
on the driver of the run. The application follows a list of steps given in
the query string (``?do=orm:a,commit,raw:b``), mixing ORM writes, Core
writes, raw SQL on ``environ["wsgi_pgconn.connection"]``, session commits and
rollbacks, savepoints, failures and error statuses; what is in the table
afterwards (read from another connection) is the test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import pytest
import sqlalchemy
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from test_core_helpers import call, idle_in_transaction, query, stack, webtest

import wsgi_pgconn.sqlalchemy as pgconn_sa
from wsgi_pgconn import get_connection


class _Undo(Exception):
    """Raised inside begin_nested() to roll the savepoint back."""


def steps_app(engine: sqlalchemy.engine.Engine, items: Any) -> Any:
    """A WSGI application that runs the steps of ``?do=`` in one request; see the module doc."""
    cls, tbl = items
    make_session = sessionmaker(engine)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        steps = parse_qs(environ.get("QUERY_STRING", "")).get("do", [""])[0].split(",")
        status = "200 OK"
        session: Session = make_session()
        try:
            for step in filter(None, steps):
                action, _, arg = step.partition(":")
                if action == "orm":  # add and flush
                    session.add(cls(arg))
                    session.flush()
                elif action == "add":  # add, not flushed
                    session.add(cls(arg))
                elif action == "commit":
                    session.commit()
                elif action == "rollback":
                    session.rollback()
                elif action == "nested":
                    with session.begin_nested():
                        session.add(cls(arg))
                elif action == "nested_undo":
                    try:
                        with session.begin_nested():
                            session.add(cls(arg))
                            session.flush()
                            raise _Undo
                    except _Undo:
                        pass
                elif action == "bad":  # a failing INSERT (pos is NOT NULL), then rollback
                    session.add(cls(arg, pos=None))
                    try:
                        session.flush()
                    except sqlalchemy.exc.IntegrityError:
                        session.rollback()
                    else:
                        raise AssertionError("the INSERT did not fail")
                elif action == "core":  # Core, committed by its connection
                    with engine.connect() as conn:
                        conn.execute(tbl.insert().values(k=arg, pos=1))
                        conn.commit()
                elif action == "core_open":  # Core, never committed: rolled back at close
                    with engine.connect() as conn:
                        conn.execute(tbl.insert().values(k=arg, pos=1))
                elif action == "core_begin":  # engine.begin(): committed at the end of the block
                    with engine.begin() as conn:
                        conn.execute(tbl.insert().values(k=arg, pos=1))
                elif action == "raw":
                    with get_connection(environ).cursor() as cur:
                        cur.execute(f"INSERT INTO {tbl.name} (k) VALUES (%s)", (arg,))
                elif action == "raise":
                    raise RuntimeError("the view failed")
                elif action == "status":
                    status = arg.replace("_", " ")
                else:
                    raise AssertionError(f"unknown step {step!r}")
        except Exception:
            session.close()
            start_response(
                "500 Internal Server Error", [("Content-Type", "text/plain")], sys.exc_info()
            )
            return [b"failed"]
        session.close()
        start_response(status, [("Content-Type", "text/plain")])
        return [b"done"]

    return app


def keys(admin: Any, table: str) -> list[str]:
    return [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")]


@pytest.fixture
def client(make_mw: Any, make_engine: Any, items: Any) -> Callable[[str], Any]:
    """``client(steps)``: one request running ``steps``; its status code."""
    engine = make_engine()
    outer, _mw = stack(make_mw, steps_app(engine, items), configure=pgconn_sa.configure)
    app = webtest.TestApp(outer)

    def run(steps: str) -> int:
        response = app.get("/", {"do": steps}, expect_errors=True)
        return int(response.status_int)

    return run


MATRIX = [
    # (steps, status, rows afterwards)
    ("orm:a,commit", 200, ["a"]),
    ("orm:a", 200, []),  # flushed, never committed: rolled back when the session closes
    ("add:a", 200, []),  # never flushed
    ("orm:a,commit,raw:b", 200, ["a", "b"]),
    ("raw:a,orm:b,commit,raw:c", 200, ["a", "b", "c"]),
    ("orm:a,commit,raise", 500, []),  # Session.commit() then a failure: nothing saved
    ("orm:a,commit,raw:b,core:c,status:503_Service_Unavailable", 503, []),
    ("orm:a,commit,status:404_Not_Found", 404, ["a"]),  # 4xx commits
    ("raw:a,orm:b,rollback,raw:c,orm:d,commit", 200, ["a", "c", "d"]),
    ("orm:a,commit,orm:b,rollback,orm:c,commit", 200, ["a", "c"]),
    ("orm:a,nested_undo:b,orm:c,commit", 200, ["a", "c"]),
    ("orm:a,nested:b,commit", 200, ["a", "b"]),
    ("raw:a,orm:b,commit,bad:x,orm:c,commit", 200, ["a", "b", "c"]),
    ("core:a,core_open:b,core_begin:c", 200, ["a", "c"]),
    ("core:a,orm:b,commit,raise", 500, []),
    ("orm:dup,commit,raw:dup", 500, []),  # the deferred UNIQUE fails at COMMIT: 500, nothing saved
]


@pytest.mark.parametrize(("steps", "status", "rows"), MATRIX)
def test_commit_rollback_matrix(
    client: Callable[[str], int], admin: Any, table: str, steps: str, status: int, rows: list[str]
) -> None:
    assert client(steps) == status
    assert keys(admin, table) == rows
    assert idle_in_transaction(admin) == []


def test_a_view_that_raises_through(
    make_mw: Any, make_engine: Any, items: Any, admin: Any, table: str
) -> None:
    """The exception reaches the server: everything of the request is rolled back."""
    engine = make_engine()
    inner = steps_app(engine, items)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        make = sessionmaker(engine)
        with make() as session:
            session.add(items[0]("a"))
            session.commit()
        with engine.begin() as conn:
            conn.execute(items[1].insert().values(k="b", pos=1))
        raise RuntimeError("boom")
        return inner(environ, start_response)  # pragma: no cover

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    with pytest.raises(RuntimeError, match="boom"):
        call(outer)
    assert keys(admin, table) == []


def test_orm_sees_raw_sql_and_raw_sql_sees_orm(
    make_mw: Any, make_engine: Any, items: Any, admin: Any, table: str
) -> None:
    """One connection, one transaction: each sees the other's uncommitted writes."""
    engine = make_engine()
    cls, tbl = items
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (k) VALUES ('raw')")
        with Session(engine) as session:
            seen["orm"] = session.scalars(select(tbl.c.k).order_by(tbl.c.id)).all()
            session.add(cls("orm"))
            session.flush()
            seen["pids"] = {
                session.scalar(text("SELECT pg_backend_pid()")),
                conn.info.backend_pid,
            }
            with conn.cursor() as cur:
                cur.execute(f"SELECT k FROM {table} ORDER BY id")
                seen["raw"] = [k for (k,) in cur.fetchall()]
            session.commit()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b""]

    outer, _mw = stack(make_mw, app, configure=pgconn_sa.configure)
    assert call(outer).code == 200
    assert seen["orm"] == ["raw"]
    assert seen["raw"] == ["raw", "orm"]
    assert len(seen["pids"]) == 1
    assert keys(admin, table) == ["raw", "orm"]
