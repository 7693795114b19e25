"""Scopes (issue 2): which connection a request gets.

Concurrency tests simulate a threaded server with a fixed pool of worker
threads (:class:`test_core_helpers.FixedThreadPool`) that call the WSGI
application directly, several requests per thread, as a real server does.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    Gate,
    backends,
    call,
    clean_env_fixture,
    deadline_poll,
    get_connection,
    pid_app,
    stack,
    threads_fixture,
    webtest,
)

from wsgi_pgconn import ConfigurationError

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "text/plain")]


def test_thread_scope_reuses_one_connection_for_100_requests(make_mw: Any) -> None:
    outer, mw = stack(make_mw, pid_app)
    client = webtest.TestApp(outer)
    pids = {client.get("/").text for _ in range(100)}
    assert len(pids) == 1
    stats = mw.stats()
    assert (stats["opened"], stats["reused"]) == (1, 99)
    assert (stats["in_use"], stats["idle"]) == (0, 1)


class InFlight:
    """Asserts that no backend serves two requests at the same moment."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, str] = {}
        self.violations: list[str] = []

    def enter(self, pid: int) -> None:
        me = threading.current_thread().name
        with self._lock:
            if pid in self._held:
                self.violations.append(f"backend {pid} used by {self._held[pid]} and {me}")
            self._held[pid] = me

    def leave(self, pid: int) -> None:
        with self._lock:
            self._held.pop(pid, None)


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_concurrent_threads_get_distinct_connections(
    scope: str, make_mw: Any, threads: Any
) -> None:
    workers = 6
    rounds = 5
    barrier = threading.Barrier(workers, timeout=WAIT)
    inflight = InFlight()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        pid = conn.info.backend_pid
        inflight.enter(pid)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                assert cur.fetchone() == (pid,)
            barrier.wait()  # all workers are inside a request at once
        finally:
            inflight.leave(pid)
        body = f"{threading.current_thread().name} {pid}".encode()
        start_response("200 OK", HDRS)
        return [body]

    outer, mw = stack(make_mw, app, scope=scope, pool_size=workers)
    pool = threads(workers)
    seen: list[list[tuple[str, int]]] = []
    for _ in range(rounds):
        bodies = pool.each(lambda i: call(outer).body.decode().split())
        seen.append([(name, int(pid)) for name, pid in bodies])
    assert inflight.violations == []
    for result in seen:
        assert len({pid for _, pid in result}) == workers  # concurrent: all distinct
    if scope == "thread":
        # each worker thread kept its own connection across rounds
        per_thread = {
            name: {pid for rnd in seen for n, pid in rnd if n == name} for name, _ in seen[0]
        }
        assert all(len(pids) == 1 for pids in per_thread.values()), per_thread
    stats = mw.stats()
    assert stats["opened"] == workers
    assert stats["reused"] == workers * (rounds - 1)
    assert (stats["in_use"], stats["idle"]) == (0, workers)


def test_thread_scope_many_requests_many_threads_never_share(make_mw: Any, threads: Any) -> None:
    """No barrier here: free-running workers, checked by the in-flight registry."""
    inflight = InFlight()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        pid = conn.info.backend_pid
        inflight.enter(pid)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                assert cur.fetchone() == (pid,)
        finally:
            inflight.leave(pid)
        start_response("200 OK", HDRS)
        return [str(pid).encode()]

    outer, mw = stack(make_mw, app)
    pool = threads(4)
    per_worker = pool.each(lambda i: {call(outer).body for _ in range(40)})
    assert inflight.violations == []
    assert all(len(pids) == 1 for pids in per_worker)
    assert len(set().union(*per_worker)) == 4
    assert mw.stats()["opened"] == 4


def test_thread_that_ends_closes_its_connection(make_mw: Any, admin: Any, app_name: str) -> None:
    """A server that starts a thread per request does not leak a connection per thread."""
    outer, mw = stack(make_mw, pid_app)
    pids = []
    for _ in range(3):
        worker = threading.Thread(target=lambda: pids.append(call(outer).body))
        worker.start()
        worker.join(WAIT)
    assert len(set(pids)) == 3
    deadline_poll(lambda: backends(admin, app_name) == [], "the ended threads' backends to go")
    assert mw.stats()["idle"] == 0


# -- process scope ----------------------------------------------------------------------------


def test_process_scope_refused_under_a_multithreaded_server(
    make_mw: Any, admin: Any, app_name: str
) -> None:
    outer, _mw = stack(make_mw, pid_app, scope="process")
    client = webtest.TestApp(outer)
    for _ in range(2):  # the first request fails, and so does every later one
        with pytest.raises(ConfigurationError) as info:
            client.get("/", extra_environ={"wsgi.multithread": True})
        message = str(info.value)
        assert "WSGI_PGCONN_SCOPE=process" in message
        assert "wsgi.multithread" in message
        assert "WSGI_PGCONN_SCOPE=thread" in message  # what to choose instead
        assert "pool" in message
    assert backends(admin, app_name) == []


def test_process_scope_one_connection_per_process(make_mw: Any) -> None:
    outer, mw = stack(make_mw, pid_app, scope="process")
    client = webtest.TestApp(outer)
    pids = {client.get("/").text for _ in range(20)}
    assert len(pids) == 1
    stats = mw.stats()
    assert (stats["scope"], stats["opened"], stats["reused"]) == ("process", 1, 19)


def test_process_scope_refuses_a_second_concurrent_request(make_mw: Any, threads: Any) -> None:
    """A server that says wsgi.multithread=False and still runs two requests at once."""
    gate = Gate()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            gate.pass_through()
        return pid_app(environ, start_response)

    outer, _mw = stack(make_mw, app, scope="process")
    pool = threads(1)
    held = pool.submit(0, lambda: call(outer, "/hold", multithread=False))
    assert gate.entered.wait(WAIT)
    with pytest.raises(ConfigurationError, match="two requests ran at once"):
        call(outer, "/", multithread=False)
    gate.go.set()
    assert held.result(WAIT).code == 200
    assert call(outer, "/", multithread=False).code == 200
