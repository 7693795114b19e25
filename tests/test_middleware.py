"""The request transaction (issue 2): commit or roll back, when, and what it costs.

Every test runs ``validator(PgConnMiddleware(validator(app)))`` against the
real PostgreSQL of the run, driven by webtest.TestApp (which also handles
``start_response(..., exc_info)`` the PEP 3333 way) or werkzeug's test Client.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dbapi
import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    RoundTrips,
    clean_env_fixture,
    environ_for,
    idle_in_transaction,
    log_records,
    pid_app,
    query,
    rt_dsn_fixture,
    rt_fixture,
    rt_role_fixture,
    stack,
    webtest,
)
from werkzeug.test import Client

from wsgi_pgconn import (
    MiddlewareNotInstalled,
    PgConnMiddleware,
    TransactionManaged,
    get_connection,
)

pytestmark = pytest.mark.usefixtures("clean_env")

TEXT = [("Content-Type", "text/plain")]


def hdrs(body: bytes = b"") -> list[tuple[str, str]]:
    return [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]


def insert(environ: dict[str, Any], table: str, k: str) -> None:
    with get_connection(environ).cursor() as cur:
        cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (k,))


def rows(admin: Any, table: str) -> list[str]:
    return [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")]


def assert_clean(admin: Any, mw: PgConnMiddleware) -> None:
    """Nobody idle in transaction, and the middleware holds no connection for a request."""
    assert idle_in_transaction(admin) == []
    assert mw.stats().get("in_use", 0) == 0


class ServerTimeout(BaseException):
    """Like a WSGI server's worker-timeout exception: derived from BaseException."""


# -- the commit/rollback matrix -------------------------------------------------------


def _status(status: str) -> Callable[[Any], list[bytes]]:
    def respond(start_response: Any) -> list[bytes]:
        body = status.encode()
        start_response(status, hdrs(body))
        return [body]

    return respond


def _exc_info(status: str) -> Callable[[Any], list[bytes]]:
    def respond(start_response: Any) -> list[bytes]:
        try:
            raise ValueError("handled by the framework")
        except ValueError:
            body = b"error page"
            start_response(status, hdrs(body), sys.exc_info())
        return [body]

    return respond


def _replaced_by_exc_info(start_response: Any) -> list[bytes]:
    """Starts a 200, then (before returning) replaces it with an error page, as PEP 3333 allows."""
    start_response("200 OK", hdrs(b"ok"))
    try:
        raise ValueError("late failure")
    except ValueError:
        start_response("500 Internal Server Error", hdrs(b"oops"), sys.exc_info())
    return [b"oops"]


RESPONSES = {
    "200": (_status("200 OK"), 200, True),
    "201": (_status("201 Created"), 201, True),
    "302": (_status("302 Found"), 302, True),
    "400": (_status("400 Bad Request"), 400, True),
    "404": (_status("404 Not Found"), 404, True),
    "409": (_status("409 Conflict"), 409, True),
    "500": (_status("500 Internal Server Error"), 500, False),
    "503": (_status("503 Service Unavailable"), 503, False),
    "exc_info with 400": (_exc_info("400 Bad Request"), 400, False),
    "exc_info with 200": (_exc_info("200 OK"), 200, False),
    "200 replaced via exc_info": (_replaced_by_exc_info, 500, False),
}


@pytest.mark.parametrize("case", list(RESPONSES))
def test_commit_or_rollback_by_response(case: str, admin: Any, table: str, make_mw: Any) -> None:
    respond, code, commits = RESPONSES[case]

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        insert(environ, table, case)
        return respond(start_response)

    outer, mw = stack(make_mw, app)
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    assert res.status_int == code
    assert rows(admin, table) == ([case] if commits else [])
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"]) == ((1, 0) if commits else (0, 1))
    assert_clean(admin, mw)


RAISED = {
    "Exception": ValueError("bug in the view"),
    "database error": None,  # the view's SQL fails and the error escapes
    "GeneratorExit": GeneratorExit(),
    "SystemExit": SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt(),
    "server timeout (BaseException)": ServerTimeout("worker timeout"),
}


@pytest.mark.parametrize("case", list(RAISED))
def test_app_raising_rolls_back(case: str, admin: Any, table: str, make_mw: Any) -> None:
    error = RAISED[case]
    pids: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        pids.append(conn.info.backend_pid)
        insert(environ, table, "x")
        if error is None:
            with conn.cursor() as cur:
                cur.execute("SELECT 1/0")
        raise error

    outer, mw = stack(make_mw, app)
    client = webtest.TestApp(outer)
    expected = dbapi.errors.DivisionByZero if error is None else type(error)
    with pytest.raises(expected):
        client.get("/")
    assert rows(admin, table) == []
    assert mw.stats()["rollbacks"] == 1
    assert mw.stats()["commits"] == 0
    assert_clean(admin, mw)
    # The connection survived the rollback and is reused.
    with pytest.raises(expected):
        client.get("/")
    assert pids[0] == pids[1]
    assert mw.stats()["opened"] == 1


@pytest.mark.parametrize(
    "error", [ValueError("mid-stream"), GeneratorExit(), ServerTimeout("timeout")], ids=repr
)
def test_body_iteration_raising_rolls_back(
    error: BaseException, admin: Any, table: str, make_mw: Any
) -> None:
    closed: list[bool] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            try:
                insert(environ, table, "first")
                yield b"first\n"
                insert(environ, table, "second")
                raise error
            finally:
                closed.append(True)

        return body()

    outer, mw = stack(make_mw, app)
    with pytest.raises(type(error)):
        Client(outer).get("/", buffered=True)
    assert closed == [True]
    assert rows(admin, table) == []
    assert mw.stats()["rollbacks"] == 1
    assert_clean(admin, mw)


def test_commit_veto_replaces_the_status_rule(admin: Any, table: str, make_mw: Any) -> None:
    def veto(environ: dict[str, Any], status: str, headers: list[tuple[str, str]]) -> bool:
        # This app's rule: 4xx rolls back, a 500 carrying X-Commit commits.
        if dict(headers).get("X-Commit") == "yes":
            return False
        return status[:1] in "45"

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        insert(environ, table, path)
        extra = [("X-Commit", "yes")] if path == "/500-commit" else []
        status = {"/ok": "200 OK", "/404": "404 Not Found"}.get(path, "500 Oops")
        start_response(status, [*hdrs(), *extra])
        return []

    outer, mw = stack(make_mw, app, commit_veto=veto)
    client = webtest.TestApp(outer)
    assert client.get("/ok").status_int == 200
    assert client.get("/404", expect_errors=True).status_int == 404
    assert client.get("/500-commit", expect_errors=True).status_int == 500
    assert client.get("/500", expect_errors=True).status_int == 500
    assert rows(admin, table) == ["/ok", "/500-commit"]
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"], stats["vetoes"]) == (2, 2, 2)
    assert_clean(admin, mw)


@pytest.mark.parametrize("failure", ["statement error", "connection lost"])
def test_caught_database_error_answered_as_success_becomes_500(
    failure: str, admin: Any, table: str, make_mw: Any
) -> None:
    """The view swallows a database error and says 200: its work is lost, so the response is 500."""
    sql = (
        "SELECT 1/0"
        if failure == "statement error"
        else ("SELECT pg_terminate_backend(pg_backend_pid())")
    )

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        insert(environ, table, "lost")
        try:
            with get_connection(environ).cursor() as cur:
                cur.execute(sql)
        except dbapi.Error:
            pass
        start_response("200 OK", hdrs(b"fine"))
        return [b"fine"]

    outer, mw = stack(make_mw, app)
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    assert res.status_int == 500
    assert b"fine" not in res.body
    assert rows(admin, table) == []
    assert (mw.stats()["commits"], mw.stats()["rollbacks"]) == (0, 1)
    assert_clean(admin, mw)


HOOK_FAILURES = ["on_begin", "commit_veto", "lazy body before start_response"]


@pytest.mark.parametrize("where", HOOK_FAILURES)
def test_failure_in_a_hook_rolls_back_and_releases(
    where: str, admin: Any, table: str, make_mw: Any
) -> None:
    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (k) VALUES ('from on_begin')")
        if where == "on_begin" and environ["PATH_INFO"] == "/fail":
            raise RuntimeError("hook failed")

    def veto(environ: dict[str, Any], status: str, headers: list[tuple[str, str]]) -> bool:
        if where == "commit_veto" and environ["PATH_INFO"] == "/fail":
            raise RuntimeError("hook failed")
        return status[:1] == "5"

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        insert(environ, table, environ["PATH_INFO"])
        if where.startswith("lazy") and environ["PATH_INFO"] == "/fail":
            raise RuntimeError("hook failed")
        start_response("200 OK", TEXT)
        yield b"ok"

    outer, mw = stack(make_mw, app, on_begin=on_begin, commit_veto=veto)
    client = webtest.TestApp(outer)
    with pytest.raises(RuntimeError, match="hook failed"):
        client.get("/fail")
    assert rows(admin, table) == []
    assert_clean(admin, mw)
    assert client.get("/ok").body == b"ok"
    assert rows(admin, table) == ["from on_begin", "/ok"]
    assert mw.stats()["opened"] == 1


# -- COMMIT before the status line ---------------------------------------------------


def spy(wsgi: Any, on_status: Callable[[str], None]) -> Any:
    """A server-side shim: calls ``on_status`` at the moment the status line is handed over."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        def seen(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            on_status(status)
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return wsgi(environ, seen)

    return app


def deferred_violation(environ: dict[str, Any], table: str) -> None:
    """Two equal keys: legal until COMMIT checks the INITIALLY DEFERRED unique constraint."""
    insert(environ, table, "dup")
    insert(environ, table, "dup")


def serialization_failure_at_commit(environ: dict[str, Any], table: str) -> None:
    """A deferred constraint trigger that fails with SQLSTATE 40001 at COMMIT."""
    insert(environ, table, "ser")


@pytest.fixture
def failing_commit(admin: Any, table: str, request: Any) -> Callable[[dict[str, Any]], None]:
    kind = request.param
    if kind == "serialization_failure":
        query(
            admin,
            f"CREATE FUNCTION {table}_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not serialize access (simulated at commit)' "
            "USING ERRCODE = 'serialization_failure'; END $$",
        )
        query(
            admin,
            f"CREATE CONSTRAINT TRIGGER {table}_ser AFTER INSERT ON {table} "
            f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_fail()",
        )

        def work(environ: dict[str, Any]) -> None:
            serialization_failure_at_commit(environ, table)

    else:

        def work(environ: dict[str, Any]) -> None:
            deferred_violation(environ, table)

    yield work
    if kind == "serialization_failure":
        query(admin, f"DROP FUNCTION {table}_fail() CASCADE")


@pytest.mark.parametrize(
    "failing_commit", ["deferred_unique", "serialization_failure"], indirect=True
)
def test_failing_commit_becomes_500_with_nothing_committed(
    failing_commit: Callable[[dict[str, Any]], None], admin: Any, table: str, make_mw: Any
) -> None:
    closed: list[bool] = []

    class Body(list[bytes]):
        def close(self) -> None:
            closed.append(True)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        insert(environ, table, "other")
        failing_commit(environ)
        start_response("200 OK", hdrs(b"all done"))
        return Body([b"all done"])

    statuses: list[str] = []
    outer, mw = stack(make_mw, app)
    res = webtest.TestApp(spy(outer, statuses.append)).get("/", expect_errors=True)
    assert res.status_int == 500
    assert statuses == [res.status]  # the 200 never reached the server
    assert b"all done" not in res.body
    assert b"nothing was saved" in res.body
    assert closed == [True]  # the app's iterable was closed even though it was dropped
    assert query(admin, f"SELECT count(*) FROM {table}") == [(0,)]
    assert mw.stats()["commits"] == 0
    assert_clean(admin, mw)


def test_commit_happens_before_the_status_line(admin: Any, table: str, make_mw: Any) -> None:
    seen_at_status: list[list[str]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        insert(environ, table, "a")
        start_response("200 OK", hdrs(b"ok"))
        return [b"ok"]

    outer, mw = stack(make_mw, app)
    res = webtest.TestApp(spy(outer, lambda s: seen_at_status.append(rows(admin, table))))
    assert res.get("/").body == b"ok"
    assert seen_at_status == [["a"]]  # already committed when the server got "200 OK"
    assert_clean(admin, mw)


def test_start_response_called_from_the_body_pulls_the_first_chunk(
    admin: Any, table: str, make_mw: Any
) -> None:
    """An app that calls start_response only when its body is iterated (a generator app)."""
    seen_at_status: list[tuple[str, list[str]]] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        insert(environ, table, environ["PATH_INFO"])
        if environ["PATH_INFO"] == "/dup":
            deferred_violation(environ, table)
        start_response("200 OK", TEXT)
        yield b"one "
        yield b"two"

    outer, mw = stack(make_mw, app)
    client = webtest.TestApp(spy(outer, lambda s: seen_at_status.append((s, rows(admin, table)))))
    assert client.get("/ok").body == b"one two"
    res = client.get("/dup", expect_errors=True)
    assert res.status_int == 500
    assert b"one" not in res.body
    assert seen_at_status == [("200 OK", ["/ok"]), (res.status, ["/ok"])]
    assert rows(admin, table) == ["/ok"]
    assert_clean(admin, mw)


def test_write_callable(admin: Any, table: str, make_mw: Any) -> None:
    """Legacy write(): output written before returning comes out first, after the COMMIT."""
    seen_at_status: list[tuple[str, list[str]]] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        status = "500 Internal Server Error" if path == "/500" else "200 OK"
        write = start_response(status, TEXT)
        write(b"hello ")
        insert(environ, table, path)
        if path == "/dup":
            deferred_violation(environ, table)
        write(b"big ")
        return [b"world"]

    outer, mw = stack(make_mw, app)
    client = webtest.TestApp(spy(outer, lambda s: seen_at_status.append((s, rows(admin, table)))))
    assert client.get("/ok").body == b"hello big world"
    res = client.get("/dup", expect_errors=True)
    assert res.status_int == 500
    assert b"hello" not in res.body
    res = client.get("/500", expect_errors=True)
    assert (res.status_int, res.body) == (500, b"hello big world")
    assert [s[:3] for s, _ in seen_at_status] == ["200", "500", "500"]
    assert seen_at_status[0][1] == ["/ok"]
    assert rows(admin, table) == ["/ok"]
    assert mw.stats()["commits"] == 1
    assert_clean(admin, mw)


def test_write_callable_through_werkzeug(admin: Any, table: str, make_mw: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        write = start_response("200 OK", TEXT)
        insert(environ, table, "w")
        write(b"via write")
        return []

    outer, mw = stack(make_mw, app)
    res = Client(outer).get("/", buffered=True)
    assert (res.status_code, res.data) == (200, b"via write")
    assert rows(admin, table) == ["w"]
    assert_clean(admin, mw)


# -- streaming --------------------------------------------------------------------------


def streaming_app(table: str, events: list[str]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            try:
                for i in range(3):
                    insert(environ, table, f"s{i}")
                    yield f"s{i}\n".encode()
            except GeneratorExit:
                events.append("GeneratorExit")
                raise
            finally:
                events.append("finally")

        return body()

    return app


def test_streamed_work_commits_at_close_then_releases(admin: Any, table: str, make_mw: Any) -> None:
    events: list[str] = []
    outer, mw = stack(make_mw, streaming_app(table, events))
    res = Client(outer).get("/", buffered=False)
    try:
        chunks = iter(res.response)
        assert next(chunks) == b"s0\n"  # werkzeug already pulled it to find the status
        # Mid-stream: the work is not committed and the connection is held.
        assert rows(admin, table) == []
        assert mw.stats()["in_use"] == 1
        assert list(chunks) == [b"s1\n", b"s2\n"]
        assert rows(admin, table) == []  # exhausted but not closed: still not committed
    finally:
        res.close()
    assert rows(admin, table) == ["s0", "s1", "s2"]
    assert events == ["finally"]
    assert mw.stats()["commits"] == 1
    assert_clean(admin, mw)


def test_client_gone_mid_stream_rolls_back(admin: Any, table: str, make_mw: Any) -> None:
    """close() before the body is exhausted: GeneratorExit in the app, work rolled back."""
    events: list[str] = []
    outer, mw = stack(make_mw, streaming_app(table, events))
    res = Client(outer).get("/", buffered=False)
    try:
        chunks = iter(res.response)
        assert next(chunks) == b"s0\n"
        assert next(chunks) == b"s1\n"
    finally:
        res.close()
    assert events == ["GeneratorExit", "finally"]
    assert rows(admin, table) == []
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"]) == (0, 1)
    assert_clean(admin, mw)


def test_work_before_the_status_is_committed_even_if_the_stream_fails(
    admin: Any, table: str, make_mw: Any
) -> None:
    """Two transactions: the one before the status line (committed before it is sent),
    and the one done while streaming (rolled back here because iteration raised)."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        insert(environ, table, "before")
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            insert(environ, table, "during")
            yield b"x"
            raise ValueError("stream broke")

        return body()

    outer, mw = stack(make_mw, app)
    with pytest.raises(ValueError, match="stream broke"):
        Client(outer).get("/", buffered=True)
    assert rows(admin, table) == ["before"]
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"]) == (1, 1)
    assert_clean(admin, mw)


def test_failing_close_still_ends_the_transaction_and_releases(
    admin: Any, table: str, make_mw: Any
) -> None:
    class Body:
        def __init__(self, environ: dict[str, Any]) -> None:
            self.environ = environ

        def __iter__(self) -> Iterator[bytes]:
            insert(self.environ, table, "streamed")
            yield b"body"

        def close(self) -> None:
            raise RuntimeError("close failed")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/pid":
            return pid_app(environ, start_response)
        start_response("200 OK", TEXT)
        return Body(environ)

    outer, mw = stack(make_mw, app)
    client = Client(outer)
    pid_before = client.get("/pid", buffered=True).data
    res = client.get("/", buffered=False)
    try:
        assert list(res.response) == [b"body"]
    finally:
        with pytest.raises(RuntimeError, match="close failed"):
            res.close()
    assert rows(admin, table) == []  # close() failed: the request did not complete
    assert_clean(admin, mw)
    assert mw.stats()["rollbacks"] == 1
    # The connection went back and serves the next request.
    assert client.get("/pid", buffered=True).data == pid_before


def test_failing_commit_at_close_is_logged_and_releases(
    admin: Any, table: str, make_mw: Any
) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            deferred_violation(environ, table)
            yield b"sent"

        return body()

    outer, mw = stack(make_mw, app)
    with log_records(logging.WARNING) as records:
        res = Client(outer).get("/", buffered=True)
    assert res.data == b"sent"  # too late to change the status
    assert rows(admin, table) == []
    assert any("COMMIT" in r.getMessage() and r.levelno >= logging.ERROR for r in records)
    assert mw.stats()["commits"] == 0
    assert_clean(admin, mw)


@pytest.mark.parametrize("where", ["same thread", "thread per request"])
def test_unclosed_response_rolls_back_when_collected(
    where: str, admin: Any, table: str, make_mw: Any
) -> None:
    """A server that never calls close(): the transaction must not stay open.

    No validator here: it would (rightly) complain about the missing close().
    "thread per request" is a server like werkzeug's that runs each request
    in a new thread; "same thread" a worker thread that goes on serving.
    """
    mw = make_mw(streaming_app(table, []))
    first: list[bytes] = []

    def serve_and_forget() -> None:
        result = mw(environ_for("/"), lambda status, headers, exc_info=None: None)
        first.append(next(iter(result)))

    with log_records(logging.WARNING) as records:
        if where == "same thread":
            serve_and_forget()
        else:
            worker = threading.Thread(target=serve_and_forget)
            worker.start()
            worker.join(10)
        gc.collect()
        assert first == [b"s0\n"]
        assert idle_in_transaction(admin) == []
    assert any("never closed" in r.getMessage() for r in records)
    assert rows(admin, table) == []
    assert mw.stats()["in_use"] == 0


# -- no idle in transaction, whatever the request did ----------------------------------


def test_never_idle_in_transaction_between_requests(admin: Any, table: str, make_mw: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ["PATH_INFO"]
        conn = get_connection(environ)
        if path == "/read":
            query(conn, "SELECT 1")
        elif path == "/write":
            insert(environ, table, "w")
        elif path == "/error":
            try:
                query(conn, "SELECT 1/0")
            except dbapi.Error:
                start_response("500 Internal Server Error", hdrs())
                return []
        elif path == "/savepoint":
            query(conn, "SAVEPOINT s")
            insert(environ, table, "sp")
            query(conn, "ROLLBACK TO SAVEPOINT s")
        elif path == "/cursor-open":
            cur = conn.cursor("named")  # server-side cursor left open
            cur.execute("SELECT generate_series(1, 100)")
            cur.fetchone()
            left_open.append(cur)  # (psycopg 3 warns about a cursor collected open)
        elif path == "/404":
            query(conn, "SELECT 1")
            start_response("404 Not Found", hdrs())
            return []
        start_response("200 OK", hdrs())
        return []

    left_open: list[Any] = []
    outer, mw = stack(make_mw, app)
    client = webtest.TestApp(outer)
    for path in ["/read", "/write", "/error", "/savepoint", "/cursor-open", "/404", "/none"]:
        client.get(path, expect_errors=True)
        assert idle_in_transaction(admin) == [], path
        assert mw.stats()["in_use"] == 0
    assert rows(admin, table) == ["w"]
    for cur in left_open:
        cur.close()


def test_application_cannot_end_the_transaction(admin: Any, table: str, make_mw: Any) -> None:
    outcomes: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        insert(environ, table, "kept")
        for action in (
            conn.commit,
            conn.rollback,
            conn.close,
            lambda: setattr(conn, "autocommit", True),
            lambda: dbapi.set_read_only(conn),
        ):
            try:
                action()
            except TransactionManaged:
                outcomes.append("refused")
        start_response("500 Internal Server Error", hdrs())
        return []

    outer, mw = stack(make_mw, app)
    webtest.TestApp(outer).get("/", expect_errors=True)
    assert outcomes == ["refused"] * 5
    assert rows(admin, table) == []  # the 500 rolled back: the app's commit() did not happen
    assert_clean(admin, mw)


# -- round trips -----------------------------------------------------------------------


def test_request_that_never_queries_costs_no_round_trip(
    make_mw: Any, rt_dsn: str, rt: RoundTrips
) -> None:
    def idle_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        get_connection(environ)
        start_response("200 OK", hdrs(b"hi"))
        return [b"hi"]

    outer, mw = stack(make_mw, idle_app, dsn=rt_dsn)
    client = webtest.TestApp(outer)
    client.get("/")  # opens the connection
    rt.reset()
    for _ in range(25):
        client.get("/")
    assert rt.counts() == {}
    assert mw.stats()["opened"] == 1


def test_one_query_costs_begin_query_commit(make_mw: Any, rt_dsn: str, rt: RoundTrips) -> None:
    outer, _mw = stack(make_mw, pid_app, dsn=rt_dsn)
    client = webtest.TestApp(outer)
    client.get("/")
    rt.reset()
    for _ in range(10):
        client.get("/")
    assert rt.counts() == {"BEGIN": 10, "SELECT pg_backend_pid()": 10, "COMMIT": 10}


# -- wiring --------------------------------------------------------------------------


def test_connection_in_environ_and_get_connection(make_mw: Any) -> None:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append((environ["wsgi_pgconn.connection"], get_connection(environ)))
        start_response("200 OK", hdrs())
        return []

    outer, _mw = stack(make_mw, app)
    webtest.TestApp(outer).get("/")
    ((conn, same),) = seen
    assert conn is same
    assert isinstance(conn, dbapi.Connection)
    assert conn.closed == 0


def test_get_connection_without_the_middleware() -> None:
    errors: list[BaseException] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            get_connection(environ)
        except MiddlewareNotInstalled as exc:
            errors.append(exc)
        start_response("200 OK", hdrs())
        return []

    webtest.TestApp(app).get("/")
    (error,) = errors
    assert isinstance(error, LookupError)
    assert "PgConnMiddleware" in str(error)


def test_wrapped_twice_the_inner_passes_through(admin: Any, table: str, make_mw: Any) -> None:
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(get_connection(environ).info.backend_pid)
        insert(environ, table, environ["PATH_INFO"])
        status = "500 Internal Server Error" if environ["PATH_INFO"] == "/fail" else "200 OK"
        start_response(status, hdrs())
        return []

    inner_outer, inner = stack(make_mw, app)
    outer, mw = stack(make_mw, inner_outer)
    client = webtest.TestApp(outer)
    client.get("/a")
    client.get("/fail", expect_errors=True)
    client.get("/b")
    assert seen[0] == seen[1] == seen[2]
    assert inner.stats() == {}  # the inner middleware never opened anything
    stats = mw.stats()
    assert (stats["opened"], stats["commits"], stats["rollbacks"]) == (1, 2, 1)
    assert rows(admin, table) == ["/a", "/b"]
    assert_clean(admin, mw)


def test_logging_levels(admin: Any, table: str, make_mw: Any) -> None:
    """Healthy requests log nothing above DEBUG, and at DEBUG each request says something."""
    outer, _mw = stack(make_mw, pid_app)
    client = webtest.TestApp(outer)
    with log_records(logging.DEBUG) as records:
        for _ in range(5):
            client.get("/")
    assert records, "nothing logged at DEBUG"
    assert {r.name for r in records} == {"wsgi_pgconn"}
    assert all(r.levelno == logging.DEBUG for r in records)
    with log_records(logging.DEBUG) as records:
        client.get("/")
    assert len(records) >= 1, "no DEBUG line for a request"
