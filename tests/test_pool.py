"""Pool scope and stats() (issue 3).

Concurrency is a simulated threaded server: a fixed pool of worker threads
(:class:`test_core_helpers.FixedThreadPool`) calling the WSGI app directly.
Requests are held inside the application with events (:class:`Gate`), never
with sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import dbapi
import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    Gate,
    call,
    clean_env_fixture,
    deadline_poll,
    get_connection,
    pid_app,
    query,
    stack,
    threads_fixture,
    webtest,
)

from wsgi_pgconn import MiddlewareNotInstalled
from wsgi_pgconn.tooling.ports import free_port

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "text/plain")]


class Gates:
    """One Gate per path: a request to /hold/<name> waits at gate <name>."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Gate:
        with self._lock:
            return self._gates.setdefault(name, Gate())


def gated_app(gates: Gates) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith("/health"):
            try:
                get_connection(environ)
            except MiddlewareNotInstalled as exc:
                note = "no connection" if "exempt" in str(exc) else "wrong error"
            else:
                note = "has a connection"
            if path.startswith("/health/hold/"):
                gates[path.rsplit("/", 1)[1]].pass_through()
            start_response("200 OK", HDRS)
            return [note.encode()]
        conn = get_connection(environ)
        pid = conn.info.backend_pid
        if path.startswith("/hold/"):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            gates[path.rsplit("/", 1)[1]].pass_through()
        start_response("200 OK", HDRS)
        return [str(pid).encode()]

    return app


def hold(pool: Any, worker: int, outer: Any, gates: Gates, name: str, prefix: str = "") -> Any:
    """Start a request that holds its connection until ``gates[name].go`` is set."""
    future = pool.submit(worker, lambda: call(outer, f"{prefix}/hold/{name}"))
    assert gates[name].entered.wait(WAIT), f"request {name} never got in"
    return future


def release(gates: Gates, name: str, future: Any) -> int:
    gates[name].go.set()
    return int(future.result(WAIT).body)


def test_never_more_than_pool_size_connections(make_mw: Any, threads: Any) -> None:
    size, workers = 2, 6
    lock = threading.Lock()
    holding: set[int] = set()
    peak = [0]
    problems: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        pid = get_connection(environ).info.backend_pid
        with lock:
            if pid in holding:
                problems.append(f"backend {pid} in two requests")
            holding.add(pid)
            peak[0] = max(peak[0], len(holding))
            if mw.stats()["in_use"] > size:
                problems.append(f"in_use {mw.stats()['in_use']}")
        try:
            query(get_connection(environ), "SELECT 1")
        finally:
            with lock:
                holding.discard(pid)
        start_response("200 OK", HDRS)
        return [str(pid).encode()]

    outer, mw = stack(make_mw, app, scope="pool", pool_size=size, pool_timeout=WAIT)
    pool = threads(workers)
    results = pool.each(lambda i: [call(outer).code for _ in range(25)])
    assert all(code == 200 for codes in results for code in codes)
    assert problems == []
    assert 1 <= peak[0] <= size
    stats = mw.stats()
    assert stats["opened"] <= size
    assert stats["opened"] + stats["reused"] == workers * 25
    assert stats["in_use"] == 0


def test_request_waits_for_a_connection_then_gets_one(make_mw: Any, threads: Any) -> None:
    gates = Gates()
    outer, mw = stack(make_mw, gated_app(gates), scope="pool", pool_size=2, pool_timeout=WAIT)
    pool = threads(3)
    a = hold(pool, 0, outer, gates, "a")
    b = hold(pool, 1, outer, gates, "b")
    waiting = pool.submit(2, lambda: call(outer, "/"))
    deadline_poll(lambda: mw.stats()["pool_waits"] == 1, "the third request to wait")
    assert not waiting.done()
    pid_b = release(gates, "b", b)
    assert int(waiting.result(WAIT).body) == pid_b  # it got the connection b gave back
    release(gates, "a", a)
    stats = mw.stats()
    assert (stats["pool_waits"], stats["pool_timeouts"]) == (1, 0)
    assert stats["pool_wait_seconds"] > 0
    assert (stats["opened"], stats["in_use"], stats["idle"]) == (2, 0, 2)


def test_pool_exhausted_gives_503_after_pool_timeout(make_mw: Any, threads: Any) -> None:
    gates = Gates()
    timeout = 0.3
    outer, mw = stack(make_mw, gated_app(gates), scope="pool", pool_size=2, pool_timeout=timeout)
    pool = threads(2)
    a = hold(pool, 0, outer, gates, "a")
    b = hold(pool, 1, outer, gates, "b")
    started = time.monotonic()
    res = webtest.TestApp(outer).get("/", expect_errors=True)
    elapsed = time.monotonic() - started
    assert res.status_int == 503
    assert res.headers["Retry-After"].isdigit()
    assert timeout <= elapsed < timeout + 1.0
    release(gates, "a", a)
    release(gates, "b", b)
    stats = mw.stats()
    assert (stats["pool_waits"], stats["pool_timeouts"]) == (1, 1)
    assert timeout - 0.01 <= stats["pool_wait_seconds"] < timeout + 1.0
    assert webtest.TestApp(outer).get("/").status_int == 200  # the pool recovered


def test_pool_timeout_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, make_mw: Any, threads: Any
) -> None:
    monkeypatch.setenv("WSGI_PGCONN_SCOPE", "pool")
    monkeypatch.setenv("WSGI_PGCONN_POOL_SIZE", "1")
    monkeypatch.setenv("WSGI_PGCONN_POOL_TIMEOUT", "0.1")
    gates = Gates()
    outer, mw = stack(make_mw, gated_app(gates))
    pool = threads(1)
    a = hold(pool, 0, outer, gates, "a")
    assert call(outer).code == 503
    release(gates, "a", a)
    assert mw.stats()["pool_timeouts"] == 1


def test_lifo_most_recently_returned_first(make_mw: Any, threads: Any) -> None:
    gates = Gates()
    outer, _mw = stack(make_mw, gated_app(gates), scope="pool", pool_size=3)
    pool = threads(3)
    futures = {name: hold(pool, i, outer, gates, name) for i, name in enumerate("xyz")}
    pids = {name: release(gates, name, futures[name]) for name in ("y", "z", "x")}  # x last
    assert len(set(pids.values())) == 3
    # Sequential requests: always the most recently returned one.
    assert {int(call(outer).body) for _ in range(5)} == {pids["x"]}
    # Two at once: the two most recently returned (x, then z).
    f1 = hold(pool, 0, outer, gates, "p")
    f2 = hold(pool, 1, outer, gates, "q")
    assert {release(gates, "p", f1), release(gates, "q", f2)} == {pids["x"], pids["z"]}


def test_exempt_paths_neither_wait_for_nor_hold_a_connection(make_mw: Any, threads: Any) -> None:
    gates = Gates()
    outer, mw = stack(
        make_mw,
        gated_app(gates),
        scope="pool",
        pool_size=1,
        pool_timeout=0.2,
        exempt_paths=["/health"],
    )
    pool = threads(2)
    # The only connection is busy: /health still answers at once, without one.
    a = hold(pool, 0, outer, gates, "a")
    res = call(outer, "/health")
    assert (res.code, res.body) == (200, b"no connection")
    release(gates, "a", a)
    # A /health request in flight does not hold the connection.
    h = pool.submit(1, lambda: call(outer, "/health/hold/h"))
    assert gates["h"].entered.wait(WAIT)
    assert call(outer, "/").code == 200
    gates["h"].go.set()
    assert h.result(WAIT).body == b"no connection"
    stats = mw.stats()
    assert (stats["pool_waits"], stats["pool_timeouts"]) == (0, 0)
    assert stats["opened"] + stats["reused"] == 2  # only the two non-exempt requests


def test_exempt_paths_from_the_environment(monkeypatch: pytest.MonkeyPatch, make_mw: Any) -> None:
    monkeypatch.setenv("WSGI_PGCONN_EXEMPT_PATHS", "/health,/static/")
    outer, mw = stack(make_mw, gated_app(Gates()))
    client = webtest.TestApp(outer)
    assert client.get("/health").text == "no connection"
    assert mw.stats()["opened"] == 0


def test_failed_connect_frees_its_pool_slot(make_mw: Any) -> None:
    port = free_port()  # nothing listens there
    outer, mw = stack(
        make_mw,
        pid_app,
        scope="pool",
        pool_size=1,
        pool_timeout=5,
        dsn=f"host=127.0.0.1 port={port} dbname=x user=u",
    )
    client = webtest.TestApp(outer)
    for _ in range(3):
        started = time.monotonic()
        res = client.get("/", expect_errors=True)
        assert res.status_int == 503
        assert "cannot be reached" in res.text  # not "busy": the slot was given back
        assert time.monotonic() - started < 1  # not pool_timeout: there is nothing to wait for
    stats = mw.stats()
    # One attempt; the next two came during its back-off and were answered at once.
    assert stats["connect_errors"] + stats["connect_backoffs"] == 3
    assert stats["connect_errors"] >= 1
    assert (stats["pool_timeouts"], stats["in_use"], stats["waiting"]) == (0, 0, 0)


# -- stats() -------------------------------------------------------------------------------------


def test_stats_count_correctly(make_mw: Any, admin: Any, app_name: str) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        conn = get_connection(environ)
        if path != "/idle":
            query(conn, "SELECT 1")
        if path == "/die":
            with contextlib.suppress(dbapi.OperationalError):  # a framework would log it
                query(conn, "SELECT pg_terminate_backend(pg_backend_pid())")
        status = {"/500": "500 Internal Server Error", "/404": "404 Not Found"}.get(path, "200 OK")
        start_response(status, HDRS)
        return [b""]

    def veto(environ: dict[str, Any], status: str, headers: list[tuple[str, str]]) -> bool:
        return status[:1] in "45"

    outer, mw = stack(make_mw, app, scope="pool", pool_size=2, commit_veto=veto)
    client = webtest.TestApp(outer)
    assert mw.stats() == {}  # nothing before the first request
    client.get("/")  # opened 1, commit
    client.get("/")  # reused, commit
    client.get("/idle")  # reused, no transaction: neither
    client.get("/404", expect_errors=True)  # reused, veto -> rollback
    client.get("/500", expect_errors=True)  # reused, veto -> rollback
    client.get("/die", expect_errors=True)  # reused, broken -> rollback, discarded
    client.get("/")  # opened 2, commit
    stats = mw.stats()
    expected = {
        "scope": "pool",
        "opened": 2,
        "reused": 5,
        "commits": 3,
        "rollbacks": 3,
        "vetoes": 2,
        "pool_waits": 0,
        "pool_timeouts": 0,
        "in_use": 0,
        "idle": 1,
    }
    assert {k: stats[k] for k in expected} == expected
    required = {"dead", "too_old", "idle_too_long", "forked", "broken"}
    assert required <= set(stats["discarded"])
    assert stats["discarded"] == {**dict.fromkeys(stats["discarded"], 0), "broken": 1}
    assert stats["pool_wait_seconds"] == 0
    # a dead idle connection
    query(
        admin,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
        app_name,
    )
    from test_core_helpers import backends

    deadline_poll(lambda: backends(admin, app_name) == [], "the backend to exit")
    client.get("/")
    stats = mw.stats()
    assert (stats["discarded"]["dead"], stats["opened"], stats["reused"]) == (1, 3, 5)
