"""Connection life (issue 3): liveness at checkout, recovery, ageing, connection settings.

Multi-threaded tests simulate a threaded server with a fixed pool of worker
threads (:class:`test_core_helpers.FixedThreadPool`) calling the WSGI
application directly. Round trips are counted on the server with
pg_stat_statements, for a role only these requests use (``rt_dsn``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import dbapi
import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    RoundTrips,
    backends,
    call,
    clean_env_fixture,
    deadline_poll,
    get_connection,
    idle_in_transaction,
    log_records,
    pid_app,
    query,
    rt_dsn_fixture,
    rt_fixture,
    rt_role_fixture,
    stack,
    threads_fixture,
    wait_backends_gone,
    webtest,
)

from wsgi_pgconn.tooling.ports import bind_free_port, free_port

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "text/plain")]
ONE_QUERY = {"BEGIN": 1, "SELECT pg_backend_pid()": 1, "COMMIT": 1}


def times(counts: dict[str, int], n: int) -> dict[str, int]:
    return {key: value * n for key, value in counts.items()}


def terminate(admin: Any, app_name: str) -> list[int]:
    """pg_terminate_backend on every backend tagged app_name; returns once they have exited."""
    pids = [pid for pid, _ in backends(admin, app_name)]
    assert pids
    query(admin, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", pids)
    wait_backends_gone(admin, pids)
    return pids


def barrier_app(barrier: threading.Barrier) -> Any:
    """One query; then every worker waits until all are inside a request (all hold a connection)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        result = pid_app(environ, lambda status, headers: None)
        barrier.wait()
        start_response("200 OK", HDRS)
        return result

    return app


def serve_round(pool: Any, outer: Any) -> list[tuple[int, int]]:
    """One request on every worker: (status code, backend pid) per worker."""
    responses = pool.each(lambda i: call(outer))
    return [(r.code, int(r.body) if r.code == 200 else 0) for r in responses]


# -- recovery without a round trip ---------------------------------------------------------


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_terminated_backends_are_replaced_with_zero_errors(
    scope: str, make_mw: Any, rt_dsn: str, rt: RoundTrips, admin: Any, app_name: str, threads: Any
) -> None:
    workers = 4
    pool = threads(workers)
    outer, mw = stack(
        make_mw,
        barrier_app(threading.Barrier(workers, timeout=WAIT)),
        dsn=rt_dsn,
        scope=scope,
        pool_size=workers,
    )
    before = serve_round(pool, outer)
    assert [code for code, _ in before] == [200] * workers

    rt.reset()
    for _ in range(3):
        assert [code for code, _ in serve_round(pool, outer)] == [200] * workers
    assert rt.counts() == times(ONE_QUERY, 3 * workers)  # the healthy path: no extra round trip

    killed = terminate(admin, app_name)
    assert sorted(killed) == sorted(pid for _, pid in before)
    with log_records(logging.WARNING) as records:
        after = serve_round(pool, outer)
    assert [code for code, _ in after] == [200] * workers  # zero 500s
    assert not {pid for _, pid in after} & set(killed)
    stats = mw.stats()
    assert stats["discarded"]["dead"] == workers
    assert stats["opened"] == 2 * workers
    # Each discard was logged as a WARNING naming the reason and the backend pid.
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    for pid in killed:
        assert any(str(pid) in m and "dead" in m for m in warned), warned

    rt.reset()
    assert [code for code, _ in serve_round(pool, outer)] == [200] * workers
    assert rt.counts() == times(ONE_QUERY, workers)
    assert idle_in_transaction(admin) == []


def fd_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Answers "<backend pid> <client socket fd>" without a round trip."""
    conn = get_connection(environ)
    start_response("200 OK", HDRS)
    return [f"{conn.info.backend_pid} {conn.fileno()}".encode()]


def test_terminated_backend_detected_as_soon_as_its_message_arrives(
    make_mw: Any, admin: Any, app_name: str
) -> None:
    """The next request comes the moment the backend's FATAL message is readable.

    A terminated backend sends ``FATAL: terminating connection due to
    administrator command`` and then closes its socket. A request checked out
    between the two must not get the connection (libpq reads the unsolicited
    error on an idle connection as a notice, so the socket can look quiet
    again once it has been drained). Repeated to hit the window reliably.
    """
    outer, mw = stack(make_mw, fd_app)
    client = webtest.TestApp(outer)
    codes = []
    for _ in range(10):
        pid, fd = map(int, client.get("/").text.split())
        query(admin, "SELECT pg_terminate_backend(%s)", pid)
        readable, _, _ = select.select([fd], [], [], WAIT)
        assert readable, "the terminated backend never said a word"
        res = client.get("/", expect_errors=True)
        codes.append(res.status_int)
        new_pid = int(res.text.split()[0]) if res.status_int == 200 else 0
        assert new_pid != pid
        # the app made no query: check the connection it was handed really works
        assert client.get("/").status_int == 200
    assert codes == [200] * 10
    assert mw.stats()["discarded"]["dead"] == 10
    assert mw.stats()["discarded"]["broken"] == 0


@pytest.mark.cluster_only("restarts the server")
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restart_every_thread_recovers(
    mode: str,
    pg: Any,
    test_db: str,
    make_mw: Any,
    rt_dsn: str,
    rt: RoundTrips,
    app_name: str,
    threads: Any,
) -> None:
    workers = 3
    pool = threads(workers)
    outer, mw = stack(make_mw, barrier_app(threading.Barrier(workers, timeout=WAIT)), dsn=rt_dsn)
    before = serve_round(pool, outer)
    assert [code for code, _ in before] == [200] * workers

    pg.restart(mode)

    after = serve_round(pool, outer)
    assert [code for code, _ in after] == [200] * workers  # zero 500s, first request each
    assert not {pid for _, pid in after} & {pid for _, pid in before}
    assert mw.stats()["discarded"]["dead"] == workers
    rt.reset()
    assert [code for code, _ in serve_round(pool, outer)] == [200] * workers
    assert rt.counts() == times(ONE_QUERY, workers)


# -- a connection that breaks during a request -----------------------------------------------


def breaking_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """/die kills its own backend mid-request and answers like a framework would."""
    if environ["PATH_INFO"] != "/die":
        return pid_app(environ, start_response)
    conn = get_connection(environ)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
    except dbapi.OperationalError:
        start_response("500 Internal Server Error", HDRS, sys.exc_info())
        return [b"database went away"]
    start_response("200 OK", HDRS)
    return [b"survived?"]


def test_connection_broken_mid_request_is_discarded_and_others_rechecked(
    make_mw: Any, rt_dsn: str, rt: RoundTrips, threads: Any, admin: Any
) -> None:
    pool = threads(2)
    outer, mw = stack(make_mw, breaking_app, dsn=rt_dsn)
    pid0 = int(pool.submit(0, lambda: call(outer)).result(WAIT).body)
    pid1 = int(pool.submit(1, lambda: call(outer)).result(WAIT).body)
    assert mw.stats()["generation"] == 0

    with log_records(logging.WARNING) as records:
        res = pool.submit(0, lambda: call(outer, "/die")).result(WAIT)
    assert res.code == 500
    stats = mw.stats()
    assert stats["discarded"]["broken"] == 1
    assert stats["generation"] == 1
    assert any(str(pid0) in r.getMessage() for r in records)

    # Worker 1's connection predates the breakage: re-checked once, with one round trip.
    rt.reset()
    assert int(pool.submit(1, lambda: call(outer)).result(WAIT).body) == pid1
    assert rt.counts() == {"SELECT $1": 1, **ONE_QUERY}
    rt.reset()
    assert int(pool.submit(1, lambda: call(outer)).result(WAIT).body) == pid1
    assert rt.counts() == ONE_QUERY  # checked once, then trusted again
    # Worker 0 gets a new connection, which is not suspect.
    rt.reset()
    new0 = int(pool.submit(0, lambda: call(outer)).result(WAIT).body)
    assert new0 not in (pid0, pid1)
    assert rt.counts() == ONE_QUERY
    assert idle_in_transaction(admin) == []


def test_connection_broken_by_uncaught_error_is_discarded(make_mw: Any, admin: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/die":
            with get_connection(environ).cursor() as cur:
                cur.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return pid_app(environ, start_response)

    outer, mw = stack(make_mw, app)
    client = webtest.TestApp(outer)
    first = client.get("/").text
    with pytest.raises(dbapi.OperationalError):
        client.get("/die")
    assert client.get("/").text != first
    stats = mw.stats()
    assert (stats["discarded"]["broken"], stats["generation"], stats["opened"]) == (1, 1, 2)


def test_check_query_pings_at_every_checkout(make_mw: Any, rt_dsn: str, rt: RoundTrips) -> None:
    def idle_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", HDRS)
        return [b""]

    outer, mw = stack(make_mw, idle_app, dsn=rt_dsn, check="query")
    client = webtest.TestApp(outer)
    client.get("/")
    rt.reset()
    for _ in range(5):
        client.get("/")
    assert rt.counts() == {"SELECT $1": 5}
    assert mw.stats()["opened"] == 1


def test_check_query_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    make_mw: Any,
    rt_dsn: str,
    rt: RoundTrips,
    admin: Any,
    app_name: str,
) -> None:
    monkeypatch.setenv("WSGI_PGCONN_CHECK", "query")
    outer, mw = stack(make_mw, pid_app, dsn=rt_dsn)
    client = webtest.TestApp(outer)
    client.get("/")
    rt.reset()
    client.get("/")
    assert rt.counts() == {"SELECT $1": 1, **ONE_QUERY}
    terminate(admin, app_name)
    assert client.get("/").status_int == 200
    assert mw.stats()["discarded"]["dead"] == 1


# -- max_age, max_idle -------------------------------------------------------------------------


def let_time_pass(seconds: float) -> None:
    """The feature under test is elapsed time itself; nothing is being waited for."""
    time.sleep(seconds)


def conn_pid_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The backend pid without a round trip (the driver knows it)."""
    pid = get_connection(environ).info.backend_pid
    barrier = environ.get("test.barrier")
    if barrier is not None:
        barrier.wait()  # every worker holds a connection at this moment
    start_response("200 OK", HDRS)
    return [str(pid).encode()]


def test_max_age_replaces_connections_at_checkout(make_mw: Any) -> None:
    max_age = 0.5
    outer, mw = stack(make_mw, conn_pid_app, max_age=max_age)
    client = webtest.TestApp(outer)
    opened = time.monotonic()
    first = client.get("/").text
    assert client.get("/").text == first  # young: kept
    assert time.monotonic() - opened < 0.9 * max_age
    let_time_pass(max_age)
    with log_records(logging.DEBUG) as records:
        second = client.get("/").text
    assert second != first
    stats = mw.stats()
    assert stats["discarded"]["too_old"] == 1
    assert stats["opened"] == 2
    # A planned replacement is no anomaly: DEBUG, not WARNING.
    assert not [r for r in records if r.levelno >= logging.WARNING]


def test_max_age_has_jitter(make_mw: Any, threads: Any) -> None:
    """Connections opened together are not all replaced at the same instant.

    Each connection's deadline is drawn when it opens (up to 10% early); the
    deadlines are read from the registry, so a stalled machine cannot make the
    test flaky. Then the workers keep serving (all at once, so every pooled
    connection is checked out each round) until every connection has been
    replaced, and none before 90% of max_age.
    """
    workers, max_age = 8, 0.5
    pool = threads(workers)
    outer, mw = stack(make_mw, conn_pid_app, scope="pool", pool_size=workers, max_age=max_age)
    barrier = threading.Barrier(workers, timeout=WAIT)

    def all_at_once(i: int) -> str:
        return call(outer, "/", **{"test.barrier": barrier}).body.decode()

    opened = time.monotonic()
    first = pool.each(all_at_once)
    records = mw.registry._records()
    assert len(records) == workers
    lifetimes = [rec.expires_at - rec.opened_at for rec in records]
    assert all(0.9 * max_age <= t <= max_age for t in lifetimes), lifetimes
    assert len({round(t, 6) for t in lifetimes}) == workers, lifetimes  # all different

    replaced: set[str] = set()
    while len(replaced) < workers:
        now = pool.each(all_at_once)
        gone = set(first) - set(now)
        if gone - replaced:
            assert time.monotonic() - opened >= 0.9 * max_age - 0.01
        replaced |= gone
        assert time.monotonic() - opened < 10 * max_age, "connections were never replaced"
    assert mw.stats()["discarded"]["too_old"] == workers


def test_max_idle_replaces_connections_idle_too_long(make_mw: Any) -> None:
    max_idle = 0.3
    outer, mw = stack(make_mw, conn_pid_app, max_idle=max_idle)
    client = webtest.TestApp(outer)
    first = client.get("/").text
    let_time_pass(max_idle * 0.6)
    assert client.get("/").text == first
    let_time_pass(max_idle * 0.6)  # older than max_idle, but used recently: kept
    assert client.get("/").text == first
    let_time_pass(max_idle * 1.1)
    assert client.get("/").text != first
    assert mw.stats()["discarded"]["idle_too_long"] == 1


def test_max_idle_from_the_environment(monkeypatch: pytest.MonkeyPatch, make_mw: Any) -> None:
    monkeypatch.setenv("WSGI_PGCONN_MAX_IDLE", "0.2")
    monkeypatch.setenv("WSGI_PGCONN_MAX_AGE", "3600")
    outer, mw = stack(make_mw, conn_pid_app)
    client = webtest.TestApp(outer)
    first = client.get("/").text
    let_time_pass(0.25)
    assert client.get("/").text != first
    assert mw.stats()["discarded"] == {**mw.stats()["discarded"], "idle_too_long": 1}


# -- connection settings, applied once at open ---------------------------------------------------


def settings_app(names: list[str]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        values = [query(conn, "SELECT current_setting(%s)", n)[0][0] for n in names]
        body = "|".join(values).encode()
        start_response("200 OK", HDRS)
        return [body]

    return app


def test_server_settings_are_startup_options_not_per_request_statements(
    make_mw: Any, rt_dsn: str, rt: RoundTrips, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WSGI_PGCONN_IDLE_IN_TRANSACTION_TIMEOUT", "2min")
    names = ["statement_timeout", "idle_in_transaction_session_timeout"]
    outer, _mw = stack(make_mw, settings_app(names), dsn=rt_dsn, statement_timeout="1500ms")
    client = webtest.TestApp(outer)
    rt.reset()
    for _ in range(3):
        assert client.get("/").text == "1500ms|2min"
    counts = rt.counts()
    assert counts == {"BEGIN": 3, "SELECT current_setting($1)": 6, "COMMIT": 3}, counts


def test_statement_timeout_applies(make_mw: Any, admin: Any) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        options = dbapi.dsn_parameters(get_connection(environ)).get("options", "")
        try:
            query(get_connection(environ), "SELECT pg_sleep(5)")
        except dbapi.errors.QueryCanceled:
            start_response("504 Gateway Timeout", HDRS, sys.exc_info())
            return [options.encode()]
        start_response("200 OK", HDRS)
        return [b"slept"]

    outer, _mw = stack(make_mw, app, statement_timeout=100)
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    assert res.status_int == 504
    assert "-c statement_timeout=100" in res.text
    assert idle_in_transaction(admin) == []


@pytest.mark.parametrize("pooler", ["none", "transaction"])
def test_idle_in_transaction_timeout_ends_a_request_stuck_after_its_first_statement(
    make_mw: Any, admin: Any, pooler: str
) -> None:
    # The first statement carries BEGIN (psycopg 3: in a pipeline); the server's
    # idle-in-transaction timer must still be armed after it.
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        ((pid,),) = query(conn, "SELECT pg_backend_pid()")
        deadline_poll(
            lambda: not query(admin, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", pid),
            "the server ends the idle transaction",
        )
        try:
            query(conn, "SELECT 1")
        except dbapi.Error as exc:  # psycopg: 25P03 (InternalError); psycopg2: connection lost
            start_response("503 Service Unavailable", HDRS)
            return [str(dbapi.sqlstate(exc)).encode()]
        start_response("200 OK", HDRS)
        return [b"survived"]

    outer, mw = stack(make_mw, app, idle_in_transaction_timeout=100, pooler=pooler)
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    assert res.status_int == 503
    assert res.text in ("25P03", "None")  # the FATAL's SQLSTATE, when the driver saw it
    assert mw.stats()["discarded"]["broken"] == 1


def test_default_application_name(make_mw: Any, pg: Any, test_db: str) -> None:
    outer, _ = stack(make_mw, settings_app(["application_name"]), dsn=pg.dsn(dbname=test_db))
    assert webtest.TestApp(outer).get("/").text == f"wsgi_pgconn[{os.getpid()}]"


def test_application_name_from_the_dsn_is_kept(make_mw: Any, app_name: str) -> None:
    outer, _ = stack(make_mw, settings_app(["application_name"]))
    assert webtest.TestApp(outer).get("/").text == app_name


def dsn_params_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    params = dbapi.dsn_parameters(get_connection(environ))
    body = " ".join(f"{k}={v}" for k, v in sorted(params.items())).encode()
    start_response("200 OK", HDRS)
    return [body]


def test_tcp_keepalive_defaults(make_mw: Any) -> None:
    outer, _ = stack(make_mw, dsn_params_app)
    params = dict(p.split("=", 1) for p in webtest.TestApp(outer).get("/").text.split())
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "30"
    assert params["keepalives_interval"] == "10"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "60000"
    assert params["connect_timeout"] == "5"


def test_dsn_keepalive_settings_win(make_mw: Any, pg: Any, test_db: str) -> None:
    dsn = pg.dsn(dbname=test_db, keepalives_idle=99, connect_timeout=7)
    outer, _ = stack(make_mw, dsn_params_app, dsn=dsn)
    params = dict(p.split("=", 1) for p in webtest.TestApp(outer).get("/").text.split())
    assert (params["keepalives_idle"], params["connect_timeout"]) == ("99", "7")


def test_configure_hook_runs_once_per_new_connection(
    make_mw: Any, rt_dsn: str, rt: RoundTrips, admin: Any, app_name: str
) -> None:
    configured: list[int] = []

    def configure(conn: Any) -> None:
        configured.append(conn.info.backend_pid)
        with conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'Asia/Tokyo'")

    outer, _mw = stack(make_mw, settings_app(["TimeZone"]), dsn=rt_dsn, configure=configure)
    client = webtest.TestApp(outer)
    rt.reset()
    for _ in range(5):
        assert client.get("/").text == "Asia/Tokyo"
    assert len(configured) == 1
    assert rt.counts()["SET TIME ZONE 'Asia/Tokyo'"] == 1
    terminate(admin, app_name)
    assert client.get("/").text == "Asia/Tokyo"
    assert len(configured) == 2
    assert configured[0] != configured[1]


def test_on_begin_settings_vanish_at_commit_and_rollback(make_mw: Any) -> None:
    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        user = environ.get("HTTP_X_USER")
        if user:
            with conn.cursor() as cur:
                cur.execute("SELECT set_config('app.user', %s, true)", (user,))
                cur.execute("SET LOCAL work_mem = '9MB'")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        user = query(conn, "SELECT current_setting('app.user', true)")[0][0]
        work_mem = query(conn, "SHOW work_mem")[0][0]
        status = "500 Internal Server Error" if environ["PATH_INFO"] == "/fail" else "200 OK"
        start_response(status, HDRS)
        return [f"{user or '-'} {work_mem}".encode()]

    outer, mw = stack(make_mw, app, on_begin=on_begin)
    client = webtest.TestApp(outer)
    default = client.get("/").text.split()[1]
    assert default != "9MB"
    assert client.get("/", headers={"X-User": "alice"}).text == "alice 9MB"
    assert client.get("/").text == f"- {default}"  # gone after the commit
    res = client.get("/fail", headers={"X-User": "bob"}, expect_errors=True)
    assert res.text == "bob 9MB"
    assert client.get("/").text == f"- {default}"  # gone after the rollback
    assert mw.stats()["opened"] == 1


# -- the server cannot be reached -----------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word (a hung server)."""
    listener = socket.socket()
    port = bind_free_port(listener)
    listener.listen(16)
    try:
        yield port
    finally:
        listener.close()


def test_server_refusing_connections_gives_503_at_once(make_mw: Any) -> None:
    outer, mw = stack(make_mw, pid_app, dsn=f"host=127.0.0.1 port={free_port()} dbname=x user=u")
    client = webtest.TestApp(outer)
    with log_records(logging.WARNING) as records:
        started = time.monotonic()
        res = client.get("/", expect_errors=True)
    assert time.monotonic() - started < 2
    assert res.status_int == 503
    assert res.headers["Retry-After"].isdigit()
    assert records
    assert records[0].levelno == logging.WARNING
    assert mw.stats()["connect_errors"] == 1


def test_hung_server_gives_503_within_connect_timeout(make_mw: Any, silent_server: int) -> None:
    timeout = 2  # libpq's smallest effective connect_timeout
    outer, _ = stack(
        make_mw,
        pid_app,
        dsn=f"host=127.0.0.1 port={silent_server} dbname=x user=u sslmode=disable",
        connect_timeout=timeout,
    )
    started = time.monotonic()
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    elapsed = time.monotonic() - started
    assert res.status_int == 503
    assert "Retry-After" in res.headers
    assert elapsed < timeout + 1.5, f"took {elapsed:.1f}s"
