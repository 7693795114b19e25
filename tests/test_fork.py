"""Fork safety and clean process exit (issue 3).

The parent opens connections, forks (``os.fork`` in the test, as a preforking
server does after loading the app); the child serves requests through the
same middleware object and must get connections of its own, never touch
the parent's, and leave with ``os._exit``. The parent's connections must
still work afterwards: same backend pid, queries succeed.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from typing import Any

import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    Gate,
    backends,
    call,
    clean_env_fixture,
    get_connection,
    pid_app,
    query,
    stack,
    threads_fixture,
    wait_backends_gone,
)

from wsgi_pgconn import scopes as _registry

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "text/plain")]


def raw_fork() -> int:
    """fork(2) straight from libc: no os.register_at_fork hooks run (as uWSGI forks)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid: int = libc.fork()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid


def run_in_child(work: Callable[[], dict[str, Any]], *, raw: bool = False) -> dict[str, Any]:
    """Fork; the child runs ``work`` and reports its result as JSON; the parent returns it.

    The child always leaves with os._exit: no atexit handler, no pytest
    teardown may run in it.
    """
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that forking a multi-threaded process may deadlock;
        # forking while other threads hold connections is exactly what is tested.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = raw_fork() if raw else os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_fd)
            try:
                report = {"ok": True, **work()}
            except BaseException as exc:  # reported to the parent
                report = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            with os.fdopen(write_fd, "w") as out:
                json.dump(report, out)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as inp:
        text = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed: {text!r}"
    report: dict[str, Any] = json.loads(text)
    assert report["ok"], report
    return report


def child_serves(outer: Any, mw: Any, n: int = 3) -> Callable[[], dict[str, Any]]:
    def work() -> dict[str, Any]:
        pids = [int(call(outer).body) for _ in range(n)]
        stats = mw.stats()
        gc.collect()  # the parent's connection objects must survive collection here
        _registry.close_all_registries()  # what atexit would do at a normal exit
        return {"pids": pids, "opened": stats["opened"], "forked": stats["discarded"]["forked"]}

    return work


def test_fork_child_gets_its_own_connection(make_mw: Any, admin: Any, app_name: str) -> None:
    outer, mw = stack(make_mw, pid_app)
    parent_pid = int(call(outer).body)

    child = run_in_child(child_serves(outer, mw))

    assert len(set(child["pids"])) == 1
    assert child["pids"][0] != parent_pid
    assert child["opened"] == 1
    # The parent's connection was neither closed nor used by the child.
    assert [int(call(outer).body) for _ in range(3)] == [parent_pid] * 3
    stats = mw.stats()
    assert stats["opened"] == 1
    assert sum(stats["discarded"].values()) == 0
    wait_backends_gone(admin, child["pids"])
    assert [pid for pid, _ in backends(admin, app_name)] == [parent_pid]


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_fork_while_other_threads_hold_connections(
    scope: str, make_mw: Any, admin: Any, app_name: str, threads: Any, table: str
) -> None:
    """At fork time: idle connections on worker threads, and one request mid-transaction."""
    gate = Gate()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/hold":
            with get_connection(environ).cursor() as cur:
                cur.execute(f"INSERT INTO {table} (k) VALUES ('held across fork')")
            gate.pass_through()
        if environ["PATH_INFO"] == "/together":
            barrier.wait()  # every worker holds a connection at this moment
        return pid_app(environ, start_response)

    workers = 3
    outer, mw = stack(make_mw, app, scope=scope, pool_size=workers + 1)
    pool = threads(workers)
    barrier = threading.Barrier(workers, timeout=WAIT)

    def together(i: int) -> int:
        return int(call(outer, "/together").body)

    before = pool.each(together)
    held = pool.submit(0, lambda: call(outer, "/hold"))
    assert gate.entered.wait(WAIT)

    child = run_in_child(child_serves(outer, mw))

    gate.go.set()
    held_response = held.result(WAIT)
    assert held_response.code == 200
    assert child["pids"][0] not in before
    assert query(admin, f"SELECT k FROM {table}") == [("held across fork",)]
    after = pool.each(together)
    if scope == "thread":
        assert after == before
    else:
        assert set(after) == set(before)
    stats = mw.stats()
    assert sum(stats["discarded"].values()) == 0
    assert stats["opened"] == workers
    wait_backends_gone(admin, child["pids"])


def test_fork_child_of_a_pool_with_idle_connections(make_mw: Any) -> None:
    outer, mw = stack(make_mw, pid_app, scope="pool", pool_size=2)
    parent_pid = int(call(outer).body)
    child = run_in_child(child_serves(outer, mw, n=5))
    assert parent_pid not in child["pids"]
    assert child["opened"] == 1  # LIFO: one connection serves a sequential child
    assert int(call(outer).body) == parent_pid


@pytest.mark.parametrize("scope", ["thread", "pool"])
def test_fork_without_at_fork_hooks_discards_inherited_connections(
    scope: str, make_mw: Any, admin: Any
) -> None:
    """uWSGI forks its workers in C: Python's at-fork hooks never run in the child.

    The child must still recognise the parent's connection as inherited
    (discarded as "forked", never used, never closed) and open its own.
    """
    outer, mw = stack(make_mw, pid_app, scope=scope, pool_size=2)
    parent_pid = int(call(outer).body)
    forked_before = mw.stats()["discarded"]["forked"]

    child = run_in_child(child_serves(outer, mw), raw=True)

    assert parent_pid not in child["pids"]
    assert len(set(child["pids"])) == 1
    assert child["forked"] == forked_before + 1
    assert [int(call(outer).body) for _ in range(3)] == [parent_pid] * 3
    assert mw.stats()["discarded"]["forked"] == forked_before
    wait_backends_gone(admin, child["pids"])


# -- process exit -----------------------------------------------------------------------------


EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    from wsgiref.util import setup_testing_defaults
    from wsgi_pgconn import PgConnMiddleware, get_connection

    def app(environ, start_response):
        with get_connection(environ).cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            pid = cur.fetchone()[0]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(pid).encode()]

    application = PgConnMiddleware(app)  # DATABASE_URL and WSGI_PGCONN_SCOPE from the environment

    def serve():
        environ = {}
        setup_testing_defaults(environ)
        environ["wsgi.multithread"] = True
        result = application(environ, lambda status, headers, exc_info=None: None)
        try:
            return b"".join(result).decode()
        finally:
            if hasattr(result, "close"):
                result.close()

    pids = [serve()]
    # A worker thread of a server's pool, still alive (blocked) when the process exits.
    served, stop = threading.Event(), threading.Event()
    def worker():
        pids.append(serve())
        served.set()
        stop.wait()
    threading.Thread(target=worker, daemon=True).start()
    served.wait(10)
    print(" ".join(pids), flush=True)
    if sys.argv[1] == "abrupt":
        os._exit(0)
    """
)


def unclean_lines(log: str, pid: int) -> list[str]:
    markers = ("unexpected EOF on client connection", "could not receive data from client")
    return [
        line for line in log.splitlines() if f"[{pid}]" in line and any(m in line for m in markers)
    ]


@pytest.mark.cluster_only("reads the server log")
@pytest.mark.parametrize("scope", ["thread", "pool"])
@pytest.mark.parametrize("exit_kind", ["normal", "abrupt"])
def test_process_exit_closes_connections_cleanly(
    exit_kind: str, scope: str, pg: Any, test_db: str, app_name: str, admin: Any
) -> None:
    # An idle backend that finds its socket closed without a Terminate message logs
    # "unexpected EOF on client connection" at DEBUG1: turn that on for these backends only.
    dsn = pg.dsn(dbname=test_db, application_name=app_name, options="-c log_min_messages=debug1")
    env = {**os.environ, "DATABASE_URL": dsn, "WSGI_PGCONN_SCOPE": scope}
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, exit_kind],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    if scope == "thread":
        assert pids[0] != pids[1]
    wait_backends_gone(admin, pids)
    log = pg.read_log()
    found = [line for pid in set(pids) for line in unclean_lines(log, pid)]
    if exit_kind == "normal":
        assert found == [], "\n".join(found)
    else:  # the control: os._exit leaves the server to find the socket closed
        assert found
