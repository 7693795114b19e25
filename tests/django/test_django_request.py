"""Django's ORM inside requests served by the middleware (issue 4), through the full WSGI stack.

Every test drives ``TestApp(DjangoPgConnMiddleware(django.core.wsgi.get_wsgi_application()))``
(webtest) against the test database that Django's test runner created, and
checks the outcome from a separate connection (``djadmin``).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import psycopg2
import psycopg2.extensions
import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection, connections
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.signals import connection_created
from djtest_app import views
from djtest_helpers import keys, new_key, query

pytestmark = pytest.mark.usefixtures("clean")

App = Callable[..., Any]


@pytest.fixture(autouse=True)
def observer(test_dsn: str) -> Iterator[list[dict[str, Any]]]:
    """The views' on_commit record (views.EVENTS), empty at the start of each test."""
    views.EVENTS.clear()
    views.OBSERVER_DSN[:] = [test_dsn]
    yield views.EVENTS
    views.EVENTS.clear()


def observed(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in events if "seen_by_other" in event]


# -- one transaction: ORM and raw SQL commit or roll back together ------------------------


def test_orm_and_raw_sql_commit_together_on_one_connection(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    response = app.get(f"/write/{key}")
    body = response.json
    assert body["orm_pid"] == body["raw_pid"]
    # Django believes it is inside an atomic block, as with ATOMIC_REQUESTS.
    assert body["in_atomic_block"] is True
    assert body["autocommit"] is False
    assert body["in_request"] is True
    # Django's jsonb loader is on the middleware's connection too.
    assert body["data"] == {"list": [1, 2], "text": "é"}
    assert keys(djadmin, key) == [key, key + "-raw"]
    assert app.app.stats()["commits"] == 1


@pytest.mark.parametrize(
    ("then", "status"),
    [
        ("raise", 500),  # Django turns the exception into a 500 response
        ("500", 500),  # a 5xx the view returns
        ("rollback", 200),  # transaction.set_rollback(True) in the view
    ],
)
def test_failed_requests_roll_back_orm_and_raw_sql_together(
    make_app: App, djadmin: psycopg2.extensions.connection, then: str, status: int
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/write/{key}?then={then}", status=status)
    assert keys(djadmin, key) == []
    assert app.app.stats()["rollbacks"] == 1


@pytest.mark.parametrize(("then", "status"), [("404", 404), ("403", 403)])
def test_http404_and_permission_denied_commit_what_was_written(
    make_app: App, djadmin: psycopg2.extensions.connection, then: str, status: int
) -> None:
    """The core's policy, unchanged for Django: a 4xx answer commits."""
    app = make_app()
    key = new_key()
    app.get(f"/write/{key}?then={then}", status=status)
    assert keys(djadmin, key) == [key, key + "-raw"]


def test_failed_login_counter_persists(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    for _ in range(3):
        app.post("/login", {"username": "mallory"}, status=403)
    assert query(djadmin, "SELECT username, count FROM djtest_app_loginfailure") == [("mallory", 3)]


def test_commit_veto_for_4xx_rolls_them_back(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app(commit_veto=lambda environ, status, headers: status[0] in "45")
    app.post("/login", {"username": "mallory"}, status=403)
    assert query(djadmin, "SELECT count(*) FROM djtest_app_loginfailure") == [(0,)]


@pytest.mark.parametrize("fault", ["before", "after"])
def test_an_exception_in_a_django_middleware_rolls_back(
    make_app: App, djadmin: psycopg2.extensions.connection, fault: str
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/write/{key}", headers={"X-Fault": fault, "X-Key": key}, status=500)
    assert keys(djadmin, key) == []


# -- atomic() inside a request --------------------------------------------------------------


def test_nested_atomic_is_a_savepoint_of_the_request_transaction(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    body = app.get(f"/nested/{key}").json
    assert body["savepoints"] == [1]
    assert body["integrity"] == "IntegrityError"
    assert body["in_atomic_block"] is True
    # Only the failed inner block was undone.
    assert keys(djadmin, key) == [key + "-after", key + "-deep", key + "-outer"]
    assert query(djadmin, "SELECT count(*) FROM djtest_app_loginfailure") == [(1,)]

    # And the whole request still rolls back as one.
    other = new_key()
    app.get(f"/nested/{other}?then=raise", status=500)
    assert keys(djadmin, other) == []


def test_a_failed_atomic_block_without_savepoint_rolls_the_request_back(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    assert app.get(f"/no-savepoint/{key}").json == {"needs_rollback": True}
    assert keys(djadmin, key) == []


# -- on_commit ---------------------------------------------------------------------------


def test_on_commit_runs_after_the_real_commit(
    make_app: App, observer: list[dict[str, Any]]
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/hooks/{key}")
    registered, ran = observer
    assert registered["registered"]
    # Another connection already sees the row: the callback ran after COMMIT,
    # outside the request (Django is in autocommit mode again).
    assert ran == {"key": key, "seen_by_other": 1, "in_request": False, "autocommit": True}


@pytest.mark.parametrize(("then", "status"), [("raise", 500), ("500", 500), ("rollback", 200)])
def test_on_commit_is_dropped_on_rollback(
    make_app: App, observer: list[dict[str, Any]], then: str, status: int
) -> None:
    app = make_app()
    app.get(f"/hooks/{new_key()}?then={then}", status=status)
    assert observed(observer) == []


def test_on_commit_registered_in_a_rolled_back_savepoint_is_dropped(
    make_app: App, observer: list[dict[str, Any]]
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/hooks/{key}?mode=savepoint")
    assert [event["key"] for event in observed(observer)] == [key]


def test_a_failing_on_commit_callback_is_logged_and_changes_nothing(
    make_app: App,
    observer: list[dict[str, Any]],
    djadmin: psycopg2.extensions.connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app()
    key = new_key()
    with caplog.at_level(logging.ERROR):
        app.get(f"/hooks/{key}?mode=failing", status=200)
    assert keys(djadmin, key) == [key]
    # robust=True: logged by Django's logger, the next callback runs. Otherwise,
    # as in Django, the callbacks after the failing one do not run.
    assert [event["key"] for event in observed(observer)] == [key]
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("django.db.backends.base", "Error calling fail in on_commit() (callback failed).") in (
        messages
    )
    assert any(
        name == "wsgi_pgconn.django" and "1 later callback(s) not run" in msg
        for name, msg in messages
    )


def test_orm_in_an_on_commit_callback_autocommits_on_djangos_own_connection(
    make_app: App, observer: list[dict[str, Any]], djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/hooks/{key}?mode=orm")
    registered, callback = observer
    assert callback["in_request"] is False
    assert callback["pid"] != registered["request_pid"]
    assert keys(djadmin, key) == [key, key + "-callback"]


def test_on_commit_in_a_request_that_never_queried(
    make_app: App, observer: list[dict[str, Any]]
) -> None:
    app = make_app()
    key = new_key()
    app.get(f"/hook-without-query/{key}")
    assert observer == [{"key": key, "ran": True}]


def test_a_failing_commit_answers_500_commits_nothing_and_runs_no_callback(
    make_app: App, observer: list[dict[str, Any]], djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    response = app.get(f"/deferred/{key}", status=500)
    assert "could not be committed" in response.text
    assert keys(djadmin, key) == []
    assert observer == []
    assert app.app.stats()["commit_errors"] == 1


# -- what a request may not do ------------------------------------------------------------


def test_ending_the_transaction_inside_a_request_is_refused(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    body = app.get(f"/refused/{key}").json
    errors = body["errors"]
    assert errors["durable"].startswith("builtins.RuntimeError: A durable atomic block")
    for name in ("commit", "rollback", "set_autocommit"):
        assert errors[name].startswith("django.db.transaction.TransactionManagementError: "), name
    for name in (
        "raw_commit",
        "raw_rollback",
        "raw_close",
        "raw_autocommit",
        "wrapper_connection_commit",
    ):
        assert errors[name].startswith("wsgi_pgconn.drivers."), name
        assert ".TransactionManaged: " in errors[name], name
    # connection.close() and connections.close_all() left the request's connection open.
    assert body["pid"] == body["raw_pid"]
    assert keys(djadmin, key) == [key, key + "-after"]


def test_close_old_connections_leaves_the_request_connection_alone(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    """CONN_MAX_AGE=0 (Django's default): still one connection for every request."""
    assert connection.settings_dict["CONN_MAX_AGE"] == 0
    for signal in (request_started, request_finished):  # Django's handler is connected
        assert any(entry[1]() is close_old_connections for entry in signal.receivers)

    app = make_app()
    key = new_key()
    pids = {app.get(f"/write/{key}-{n}").json["orm_pid"] for n in range(5)}
    assert len(pids) == 1
    stats = app.app.stats()
    assert (stats["opened"], stats["reused"], stats["commits"]) == (1, 4, 5)
    assert query(djadmin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", pids.pop()) == [
        (1,)
    ]


def test_close_old_connections_still_closes_djangos_own_obsolete_connection(
    make_app: App,
) -> None:
    own = connections["default"]
    own.ensure_connection()  # opened outside a request (CONN_MAX_AGE=0)
    assert own.connection is not None
    make_app().get(f"/write/{new_key()}")
    assert own.connection is None


# -- per-connection setup -------------------------------------------------------------


@pytest.fixture
def created() -> Iterator[list[int]]:
    """Backend pids of the connections connection_created was sent for."""
    pids: list[int] = []

    def receiver(sender: Any, connection: Any, **kwargs: Any) -> None:
        pids.append(connection.connection.info.backend_pid)

    connection_created.connect(receiver)
    yield pids
    connection_created.disconnect(receiver)


@pytest.fixture
def role(djadmin: psycopg2.extensions.connection) -> Iterator[str]:
    """OPTIONS["assume_role"] of the default alias set to a role that may use the tables."""
    name = "djtest_role"
    query(djadmin, f"CREATE ROLE {name} NOLOGIN")
    query(djadmin, f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {name}")
    query(djadmin, f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {name}")
    options = connections["default"].settings_dict["OPTIONS"]
    options["assume_role"] = name
    try:
        yield name
    finally:
        del options["assume_role"]
        connections.close_all()
        query(djadmin, f"DROP OWNED BY {name}")
        query(djadmin, f"DROP ROLE {name}")


@pytest.mark.parametrize("form", ["helper", "plain"])
def test_per_connection_setup_runs_once_and_survives_a_rolled_back_request(
    make_app: App,
    created: list[int],
    role: str,
    test_dsn: str,
    form: str,
) -> None:
    from django.core.wsgi import get_wsgi_application

    from wsgi_pgconn import PgConnMiddleware

    if form == "helper":
        app = make_app()
    else:
        plain = PgConnMiddleware(get_wsgi_application(), dsn=test_dsn)
        app = make_app(wsgi=plain)
    try:
        first = app.get(f"/session/{new_key()}?then=raise", status=500)
        del first
        bodies = [app.get(f"/session/{new_key()}").json for _ in range(3)]
    finally:
        if form == "plain":
            plain.close()
    pids = {body["pid"] for body in bodies} | {body["orm_pid"] for body in bodies}
    assert len(pids) == 1
    for body in bodies:
        assert body["timezone"] == "Asia/Tokyo"  # DATABASES["default"]["TIME_ZONE"]
        assert body["tzinfo"] == "Asia/Tokyo"
        assert body["user"] == role
    assert created == [pids.pop()]


@pytest.mark.parametrize("form", ["helper", "plain"])
def test_on_begin_applies_to_the_first_request_of_a_new_connection(
    make_app: App, test_dsn: str, form: str
) -> None:
    """Django's per-connection setup (the time zone) does not use up the request's on_begin."""
    from django.core.wsgi import get_wsgi_application

    from wsgi_pgconn import PgConnMiddleware

    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('djtest.tag', %s, true)", [environ["PATH_INFO"]])

    if form == "helper":
        app = make_app(on_begin=on_begin)
    else:
        plain = PgConnMiddleware(get_wsgi_application(), dsn=test_dsn, on_begin=on_begin)
        app = make_app(wsgi=plain)
    try:
        paths = [f"/tagged/{new_key()}" for _ in range(3)]
        bodies = [app.get(path).json for path in paths]
    finally:
        if form == "plain":
            plain.close()
    assert len({body["pid"] for body in bodies}) == 1  # one connection, new at the first
    assert [body["tag"] for body in bodies] == paths


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [({}, "serializable"), ({"isolation_level": "repeatable read"}, "repeatable read")],
)
def test_the_isolation_level_of_the_settings_applies_unless_given(
    make_app: App, kwargs: dict[str, str], expected: str
) -> None:
    options = connections["default"].settings_dict["OPTIONS"]
    options["isolation_level"] = IsolationLevel.SERIALIZABLE
    try:
        body = make_app(**kwargs).get(f"/session/{new_key()}").json
    finally:
        del options["isolation_level"]
        connections.close_all()
    assert body["isolation"] == expected


def test_a_middleware_on_another_database_is_refused(make_app: App, pg: Any) -> None:
    """Plain PgConnMiddleware whose DATABASE_URL is not Django's database: a clear error."""
    from django.core.exceptions import ImproperlyConfigured
    from django.core.wsgi import get_wsgi_application

    from wsgi_pgconn import PgConnMiddleware

    plain = PgConnMiddleware(get_wsgi_application(), dsn=pg.dsn(dbname="postgres"))
    app = make_app(wsgi=plain)
    try:
        with pytest.raises(ImproperlyConfigured, match="connected to database 'postgres'"):
            app.get(f"/write/{new_key()}")
    finally:
        plain.close()


# -- threads and async -----------------------------------------------------------------


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_each_thread_uses_its_own_request_connection(
    make_app: App, djadmin: psycopg2.extensions.connection, scope: str
) -> None:
    app = make_app(scope=scope, pool_size=2)
    views.BARRIER[:] = [threading.Barrier(2)]
    key = new_key()
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def request(n: int) -> None:
        try:
            results[n] = app.get(f"/wait/{key}-{n}").json
        except BaseException as exc:
            errors.append(exc)
            views.BARRIER[0].abort()

    threads = [threading.Thread(target=request, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    first, second = results[0], results[1]
    assert first["orm_pid"] == first["raw_pid"]
    assert second["orm_pid"] == second["raw_pid"]
    assert first["orm_pid"] != second["orm_pid"]
    assert first["thread"] != second["thread"]
    assert keys(djadmin, key) == [f"{key}-0", f"{key}-1"]


def test_a_thread_started_by_the_view_keeps_djangos_own_connection(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    body = app.get(f"/spawn/{key}?then=500", status=500).json
    assert body["thread"]["in_request"] is False
    assert body["thread"]["pid"] != body["request_pid"]
    # The thread's write was its own (autocommit); the request's was rolled back.
    assert keys(djadmin, key) == [key + "-thread"]


def test_thread_sensitive_async_orm_calls_share_the_request_transaction(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    body = app.get(f"/orm-async/{key}").json
    assert body["count"] == 1
    assert body["pid"] == body["raw_pid"]
    # thread_sensitive=False runs in another thread: Django's own connection there.
    assert body["not_thread_sensitive"]["in_request"] is False
    assert body["not_thread_sensitive"]["pid"] != body["raw_pid"]
    assert keys(djadmin, key) == [key]

    failed = new_key()
    app.get(f"/orm-async/{failed}?then=500", status=500)
    assert keys(djadmin, failed) == []


def test_an_async_view_runs_in_the_request_transaction(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    app = make_app()
    key = new_key()
    body = app.get(f"/async/{key}").json
    assert body["pid"] == body["raw_pid"]
    assert body["in_request"] is True
    assert keys(djadmin, key) == [key]

    failed = new_key()
    app.get(f"/async/{failed}?then=raise", status=500)
    assert keys(djadmin, failed) == []


# -- streaming -----------------------------------------------------------------------------


def test_orm_work_while_streaming_is_committed_at_close(
    make_app: App, djadmin: psycopg2.extensions.connection, observer: list[dict[str, Any]]
) -> None:
    app = make_app()
    key = new_key()
    response = app.get(f"/stream/{key}")
    assert response.text.splitlines()[0] == "start"
    assert response.text.splitlines()[-1] == "end"
    assert keys(djadmin, key) == [key, key + "-view"]
    assert [(e["key"], e["seen_by_other"]) for e in observed(observer)] == [(key, 1)]
    assert app.app.stats()["in_use"] == 0


def test_a_failure_while_streaming_rolls_back_the_streamed_work(
    make_app: App, djadmin: psycopg2.extensions.connection, observer: list[dict[str, Any]]
) -> None:
    app = make_app()
    key = new_key()
    with pytest.raises(views.Boom):
        app.get(f"/stream/{key}?then=raise")
    # What the view wrote was committed before the status line; the streamed part was not.
    assert keys(djadmin, key) == [key + "-view"]
    assert observed(observer) == []
    assert app.app.stats()["in_use"] == 0


def test_a_server_side_cursor_streamed_after_the_view_gets_every_row(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    """``iterator(chunk_size=2)`` read in a StreamingHttpResponse: the COMMIT waits for the body.

    Committing before the status line would close the cursor Django declared:
    a 200 with only the first chunk, and "cursor does not exist" in the log.
    """
    key = new_key()
    query(
        djadmin,
        "INSERT INTO djtest_app_item (key, data, created) "
        "SELECT %s || '-' || lpad(g::text, 2, '0'), '{}', now() FROM generate_series(1, 9) g",
        key,
    )
    app = make_app()
    response = app.get(f"/stream-items/{key}")
    expected = [f"{key}-{g:02d}" for g in range(1, 10)] + [key + "-view"]
    assert response.status_int == 200
    assert response.text.splitlines() == expected
    assert keys(djadmin, key + "-view") == [key + "-view"]  # the view's write, committed
    stats = app.app.stats()
    assert (stats["commits"], stats["rollbacks"], stats["in_use"]) == (1, 0, 0)


def test_an_abandoned_response_is_still_rolled_back_and_released(
    make_app: App, djadmin: psycopg2.extensions.connection, caplog: pytest.LogCaptureFixture
) -> None:
    """The ORM's bookkeeping holds no strong reference to the request's transaction."""
    app = make_app()
    middleware = app.app
    key = new_key()
    environ: dict[str, Any] = {"PATH_INFO": f"/stream/{key}"}
    setup_testing_defaults(environ)
    body = middleware(environ, lambda status, headers, exc_info=None: None)
    assert next(iter(body)) == b"start\n"  # the view's ORM work joined the request
    assert middleware.stats()["in_use"] == 1
    with caplog.at_level(logging.WARNING, logger="wsgi_pgconn"):
        del body, environ  # never closed, as by a faulty server
        gc.collect()
    assert "a response was never closed" in caplog.text
    assert middleware.stats()["in_use"] == 0
    assert connection.in_request is False
    assert keys(djadmin, key) == [key + "-view"]  # committed before the status line


# -- aliases -------------------------------------------------------------------------------


@pytest.fixture
def other_admin(django_databases: dict[str, str]) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(django_databases["other"])
    conn.autocommit = True
    query(conn, "TRUNCATE djtest_app_item")
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("bound", ["default", "other"])
def test_only_the_bound_alias_uses_the_request_connection(
    make_app: App,
    djadmin: psycopg2.extensions.connection,
    other_admin: psycopg2.extensions.connection,
    bound: str,
) -> None:
    app = make_app(alias=bound)
    unbound = "other" if bound == "default" else "default"
    key = new_key()
    body = app.get(f"/aliases/{key}?then=500", status=500).json
    assert body[bound] == [body["raw_pid"], True]
    assert body[unbound][0] != body["raw_pid"]
    assert body[unbound][1] is False
    admins = {"default": djadmin, "other": other_admin}
    assert keys(admins[bound], key) == []  # rolled back with the request
    assert keys(admins[unbound], key) == [key]  # autocommitted, as plain Django does


def test_a_request_served_inside_another_keeps_the_outer_bookkeeping(
    make_app: App, djadmin: psycopg2.extensions.connection
) -> None:
    """A view serves a nested request (another middleware, same thread) in an atomic block.

    The nested request has its own connection and transaction; afterwards the
    outer request's savepoint is still there to be released, and both commit.
    """
    outer, inner = make_app(), make_app()
    views.INNER[:] = [inner]
    try:
        key = new_key()
        body = outer.get(f"/reenter/{key}").json
    finally:
        views.INNER.clear()
    assert body["depth"] == 1  # the atomic block's savepoint, still known
    assert body["in_request"] is True
    assert body["inner"]["in_request"] is True
    assert body["inner"]["orm_pid"] == body["inner"]["raw_pid"] != body["pid"]
    assert keys(djadmin, key) == sorted(
        [key + "-after", key + "-before", key + "-inner", key + "-inner-raw"]
    )
