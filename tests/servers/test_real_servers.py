"""The Flask example under real servers: mod_wsgi-express (daemon mode) and gunicorn.

Each test starts a server on the example, checks that concurrent requests
are all answered correctly (commits, rollbacks, streaming), and then checks
in pg_stat_activity that the server holds exactly the connections its scope
promises and none is left idle in a transaction.

Warming every thread without sleeping: the test locks the example table,
sends page requests that each block inside PostgreSQL on that lock (one per
server thread, each holding its own connection), polls pg_stat_activity
until the expected number of backends is waiting, then releases the lock.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from _serverkit import Probe, server_env, table_locked

from wsgi_pgconn.tooling.bench import servers

pytestmark = pytest.mark.slow


def tag() -> str:
    return "srv-" + uuid.uuid4().hex[:10]


def request(port: int, path: str, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
    headers = {}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    status, _, payload = servers.http_get(
        port, path, timeout=30, method=method, body=data, headers=headers
    )
    return status, payload


def exercise(port: int, probe: Probe, prefix: str, writes: int = 32) -> None:
    """Concurrent writes, failing writes, streams and pages; everything must be right."""

    def write(i: int) -> tuple[str, int, bytes]:
        if i % 4 == 3:
            status, payload = request(port, f"/fail?name={prefix}-fail-{i}", "POST")
            return "fail", status, payload
        status, payload = request(port, "/items", "POST", {"name": f"{prefix}-ok-{i}"})
        return "ok", status, payload

    def stream(n: int) -> tuple[int, bytes]:
        return request(port, f"/stream?n={n}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        writes_f = [pool.submit(write, i) for i in range(writes)]
        streams_f = [pool.submit(stream, 500 + i) for i in range(4)]
        pages_f = [pool.submit(request, port, "/") for _ in range(8)]
        results = [f.result() for f in writes_f]
        stream_results = [(500 + i, f.result()) for i, f in enumerate(streams_f)]
        page_results = [f.result() for f in pages_f]

    ids = []
    for kind, status, payload in results:
        if kind == "ok":
            assert status == 201, payload[:300]
            ids.append(json.loads(payload)["id"])
        else:
            assert status == 500, payload[:300]
    assert len(set(ids)) == len(ids)
    for n, (status, payload) in stream_results:
        assert status == 200
        lines = payload.decode().splitlines()
        assert len(lines) == n + 1
        assert lines[-1] == "end"
        assert (
            lines[n - 1] == f"{n} {hashlib.md5(str(n).encode(), usedforsecurity=False).hexdigest()}"
        )
    for status, payload in page_results:
        assert status == 200, payload[:300]
        assert b"items</h1>" in payload

    expected_ok = sorted(f"{prefix}-ok-{i}" for i in range(writes) if i % 4 != 3)
    status, payload = request(port, "/items")
    assert status == 200
    listed = sorted(
        item["name"] for item in json.loads(payload)["items"] if item["name"].startswith(prefix)
    )
    assert listed == expected_ok  # committed writes are visible, /fail writes were rolled back
    assert sorted(probe.names(prefix)) == expected_ok

    status, payload = request(port, "/health")
    assert status == 200
    assert json.loads(payload) == {"ok": True, "database": False}  # exempt: no connection


def warm_every_thread(
    port: int, probe: Probe, app_name: str, pg: Any, db: str, pending: Any, expected: int
) -> None:
    """Make ``expected`` requests block in PostgreSQL at once, one per server thread.

    More requests are sent until ``expected`` backends of the server wait on
    the lock (servers that queue requests per process may need extra ones
    to reach every process).  Then the lock is released and every response
    must be a 200.
    """
    requests = pending(port)
    cap = expected * 8
    with table_locked(pg, db):
        for _ in range(expected):
            requests.send("/")
        probe.wait_for(
            f"{expected} backends of {app_name} waiting on the table lock",
            lambda: _send_until(requests, probe, app_name, expected, cap),
            timeout=30,
        )
        assert probe.count(app_name) == expected, probe.backends(app_name)
    assert set(requests.finish()) == {200}


def _send_until(requests: Any, probe: Probe, app_name: str, expected: int, cap: int) -> bool:
    waiting = probe.waiting_on_lock(app_name)
    if waiting >= expected:
        return True
    if requests.pending < cap:
        requests.send("/")
    requests.poll()
    return False


def assert_settled(
    probe: Probe, app_name: str, expected: int | None = None, at_most: int | None = None
) -> None:
    """No connection of the server stays in a transaction; the count is as promised."""
    probe.wait_for(
        f"{app_name}'s connections to be idle",
        lambda: all(state == "idle" for _, state, _ in probe.backends(app_name)),
        timeout=10,
    )
    backends = probe.backends(app_name)
    assert not [b for b in backends if b[1].startswith("idle in transaction")]
    if expected is not None:
        assert len(backends) == expected, backends
    if at_most is not None:
        assert 0 < len(backends) <= at_most, backends


# -- mod_wsgi-express ------------------------------------------------------------


def test_mod_wsgi_thread_scope(
    mod_wsgi_available, served_tree, app_dsn, probe, run_server, pg, servers_db, pending
):
    app_name = tag()
    server = run_server(
        servers.mod_wsgi_server(
            served_tree + "/flask_example/wsgi.py",
            processes=2,
            threads=4,
            python_path=[served_tree],
            env=server_env(app_dsn(app_name)),
            name="mod_wsgi-thread",
        ),
        app_name,
    )
    exercise(server.port, probe, app_name)
    warm_every_thread(server.port, probe, app_name, pg, servers_db, pending, expected=2 * 4)
    assert_settled(probe, app_name, expected=2 * 4)


def test_mod_wsgi_setenv_pool(
    mod_wsgi_available, served_tree, app_dsn, probe, run_server, pg, servers_db, pending
):
    """Settings from --setenv (SetEnv, per-request environ only) are honoured."""
    app_name = tag()
    server = run_server(
        servers.mod_wsgi_server(
            served_tree + "/flask_example/wsgi.py",
            processes=2,
            threads=4,
            python_path=[served_tree],
            env=server_env(app_dsn(app_name)),
            setenv={
                "WSGI_PGCONN_SCOPE": "pool",
                "WSGI_PGCONN_POOL_SIZE": "2",
                "WSGI_PGCONN_POOL_TIMEOUT": "1",
            },
            name="mod_wsgi-pool",
        ),
        app_name,
    )
    exercise(server.port, probe, app_name, writes=16)
    assert probe.count(app_name) <= 4
    # Occupy all 8 threads: 2 x 2 requests get a connection and block on the
    # lock; the other 4 find their process's pool empty and get a 503 after
    # WSGI_PGCONN_POOL_TIMEOUT.  With the setenv values ignored (thread
    # scope) all 8 would block instead and no 503 would come.
    requests = pending(server.port)
    with table_locked(pg, servers_db):
        for _ in range(8):
            requests.send("/")

        def four_refused() -> bool:
            requests.poll()
            assert probe.count(app_name) <= 4, probe.backends(app_name)
            return len(requests.done) >= 4 and probe.waiting_on_lock(app_name) == 4

        probe.wait_for("4 blocked requests and 4 refused by the pool", four_refused, timeout=30)
        assert requests.statuses() == [503] * 4
        assert probe.count(app_name) == 4
    assert sorted(requests.finish()) == [200] * 4 + [503] * 4
    assert_settled(probe, app_name, at_most=4)


def test_mod_wsgi_process_scope(
    mod_wsgi_available, served_tree, app_dsn, probe, run_server, pg, servers_db, pending
):
    app_name = tag()
    server = run_server(
        servers.mod_wsgi_server(
            served_tree + "/flask_example/wsgi.py",
            processes=2,
            threads=1,
            python_path=[served_tree],
            env=server_env(app_dsn(app_name), WSGI_PGCONN_SCOPE="process"),
            name="mod_wsgi-process",
        ),
        app_name,
    )
    exercise(server.port, probe, app_name, writes=12)
    warm_every_thread(server.port, probe, app_name, pg, servers_db, pending, expected=2)
    assert_settled(probe, app_name, expected=2)


EOF_MESSAGES = ("unexpected EOF", "could not receive data from client")


def unclean_closes(log: str, pids: set[int] | None = None) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if any(m in line for m in EOF_MESSAGES)
        and (pids is None or any(f"[{p}]" in line for p in pids))
    ]


@pytest.mark.cluster_only("reads the server log")
def test_mod_wsgi_maximum_requests_closes_cleanly(
    mod_wsgi_available, served_tree, app_dsn, probe, run_server, pg
):
    """A daemon process recycled by --maximum-requests says goodbye to PostgreSQL.

    PostgreSQL logs "unexpected EOF on client connection" for a client that
    vanished without a Terminate message only at DEBUG1 (unless a transaction
    was open), so the server's connections ask for log_min_messages=debug1.
    A control connection whose process dies without closing proves that the
    log shows such an exit.
    """
    app_name = tag()
    debug_options = "-c log_min_messages=debug1"
    log_start = len(pg.read_log())

    control = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys, psycopg2; c = psycopg2.connect(sys.argv[1]); "
            "print(c.get_backend_pid(), flush=True); os._exit(0)",
            app_dsn(app_name + "-control", options=debug_options),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    control_pid = int(control.stdout)
    probe.wait_for(
        "the control connection's unclean exit to be logged",
        lambda: unclean_closes(pg.read_log()[log_start:], {control_pid}),
        timeout=10,
    )

    server = run_server(
        servers.mod_wsgi_server(
            served_tree + "/flask_example/wsgi.py",
            processes=1,
            threads=1,
            python_path=[served_tree],
            env=server_env(app_dsn(app_name, options=debug_options)),
            maximum_requests=4,
            name="mod_wsgi-maxreq",
        ),
        app_name,
    )
    assert request(server.port, "/")[0] == 200
    (first_pid,) = [pid for pid, _, _ in probe.backends(app_name)]
    seen = {first_pid}

    def recycled() -> bool:
        assert request(server.port, "/")[0] == 200
        pids = {pid for pid, _, _ in probe.backends(app_name)}
        seen.update(pids)
        return bool(pids) and first_pid not in pids

    probe.wait_for(
        "the daemon process to be recycled and its connection replaced", recycled, timeout=30
    )
    problems = unclean_closes(pg.read_log()[log_start:], seen)
    assert not problems, "\n".join(problems)
    assert_settled(probe, app_name, expected=1)


# -- gunicorn ---------------------------------------------------------------------


def test_gunicorn_sync_preload(
    gunicorn_available, served_tree, app_dsn, probe, run_server, pg, servers_db, pending
):
    """Sync workers, --preload: connections open lazily in each worker after the fork."""
    app_name = tag()
    server = run_server(
        servers.gunicorn_server(
            "wsgi:application",
            workers=2,
            python_path=[served_tree + "/flask_example", served_tree],
            env=server_env(app_dsn(app_name)),
            preload=True,
            name="gunicorn-sync",
        ),
        app_name,
    )
    assert probe.count(app_name) == 0  # nothing opened in the master at import
    exercise(server.port, probe, app_name, writes=16)
    warm_every_thread(server.port, probe, app_name, pg, servers_db, pending, expected=2)
    assert_settled(probe, app_name, expected=2)


def test_gunicorn_gthread(
    gunicorn_available, served_tree, app_dsn, probe, run_server, pg, servers_db, pending
):
    app_name = tag()
    server = run_server(
        servers.gunicorn_server(
            "wsgi:application",
            workers=2,
            threads=4,
            worker_class="gthread",
            python_path=[served_tree + "/flask_example", served_tree],
            env=server_env(app_dsn(app_name)),
            name="gunicorn-gthread",
        ),
        app_name,
    )
    exercise(server.port, probe, app_name)
    warm_every_thread(server.port, probe, app_name, pg, servers_db, pending, expected=2 * 4)
    assert_settled(probe, app_name, expected=2 * 4)
