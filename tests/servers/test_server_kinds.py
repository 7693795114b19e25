"""The servers people deploy on: gevent, uWSGI (threads, prefork, gevent), waitress, werkzeug.

Each test starts the real server on ``ledger_wsgi.py`` (this folder) with the
run's driver (``WSGI_PGCONN_DRIVER`` is passed through), sends a bounded load
of writes from concurrent clients, each request on a fresh TCP connection
(``Connection: close``, what nginx sends upstream), and checks:

* the ledger: every 2xx has its row exactly once, no other answer has one,
  and no 5xx at all (the pool can serve every request within pool_timeout);
* the connections: the most backends seen at once in pg_stat_activity
  (sampled while the load runs), against what the scope promises;
* a clean stop: SIGTERM to the server's main process (what docker sends),
  after which no backend is left and PostgreSQL logged no "unexpected EOF"
  (the server's connections ask for ``log_min_messages=debug1``, the level
  at which PostgreSQL logs a client that vanished without saying goodbye).
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dbapi
import pytest
from _serverkit import Probe, server_env

from wsgi_pgconn.tooling.bench import servers

pytestmark = [pytest.mark.slow, pytest.mark.cluster_only("reads the server log")]

HERE = Path(__file__).resolve().parent
DEBUG1 = "-c log_min_messages=debug1"
EOF_MESSAGES = ("unexpected EOF", "could not receive data from client")
PSYCOPG2 = dbapi.PSYCOPG2


def need(python: str | None, *modules: str) -> str:
    for module in modules:
        if not servers.python_has(python, module):
            message = f"{module} not found in the servers' venv: run bash .ci/install-servers.sh"
            if os.environ.get("CI"):
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    assert python is not None
    return python


def need_uwsgi() -> None:
    if servers.venv_tool("uwsgi") is None:
        message = "uwsgi not found in the servers' venv: run bash .ci/install-servers.sh"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def execute(probe: Probe, sql: str) -> None:
    with probe.conn.cursor() as cur:
        cur.execute(sql)


@pytest.fixture(scope="module")
def ledger_tree() -> Iterator[str]:
    """World-readable copy of the package and ledger_wsgi.py."""
    root = servers.stage([servers.package_dir(), str(HERE / "ledger_wsgi.py")])
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Case:
    """One server under test: its table, its tag, what it answered, what the database saw."""

    def __init__(self, pg: Any, probe: Probe, app_dsn: Callable[..., str]) -> None:
        self.pg = pg
        self.probe = probe
        self.tag = "kinds-" + uuid.uuid4().hex[:8]
        self.table = "ledger_" + uuid.uuid4().hex[:8]
        execute(probe, f"CREATE TABLE {self.table} (k text NOT NULL)")
        self.dsn = app_dsn(self.tag, options=DEBUG1)
        self.log_start = len(pg.read_log())
        self.answers: dict[str, int] = {}
        self.latencies: list[float] = []
        self.most_backends = 0
        self.rounds = 0
        self.server: servers.Server | None = None

    def env(self, **extra: str) -> dict[str, str]:
        return server_env(
            self.dsn, APP_TABLE=self.table, WSGI_PGCONN_DRIVER=dbapi.NAME, **extra
        )

    def start(self, server: servers.Server) -> servers.Server:
        self.server = server
        server.start(ready_path="/health", ready_status=200, timeout=60)
        return server

    def backends(self) -> int:
        return self.probe.count(self.tag)

    def load(
        self, clients: int, per_client: int, sleep: float | None = None, timeout: float = 30
    ) -> None:
        """``clients`` threads, each sending ``per_client`` writes, one TCP connection each."""
        assert self.server is not None
        port = self.server.port
        self.rounds += 1
        round_ = self.rounds
        done = threading.Event()
        lock = threading.Lock()

        def sample() -> None:
            while not done.is_set():
                self.most_backends = max(self.most_backends, self.backends())
                done.wait(0.02)  # sampling interval

        def client(c: int) -> None:
            for i in range(per_client):
                key = f"{self.tag}-{round_}-{c}-{i}"
                path = f"/write?k={key}" + (f"&sleep={sleep}" if sleep else "")
                start = time.monotonic()
                try:
                    status, _, _ = servers.http_get(port, path, timeout=timeout)
                except (OSError, http.client.HTTPException):
                    status = 0  # cut off
                with lock:
                    self.answers[key] = status
                    self.latencies.append(time.monotonic() - start)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(client, range(clients)))
        finally:
            done.set()
            sampler.join(5)
        self.most_backends = max(self.most_backends, self.backends())

    def check_ledger(self) -> collections.Counter[int]:
        rows = collections.Counter(k for (k,) in self.probe.rows(f"SELECT k FROM {self.table}"))
        statuses = collections.Counter(self.answers.values())
        ok = {k for k, s in self.answers.items() if 200 <= s < 300}
        lost = [k for k in ok if rows[k] == 0]
        duplicated = [k for k, n in rows.items() if n > 1]
        phantom = [k for k, s in self.answers.items() if k not in ok and rows[k]]
        unknown = set(rows) - set(self.answers)
        assert not lost, f"2xx answers without their row: {lost[:5]}"
        assert not duplicated, f"rows written twice: {duplicated[:5]}"
        assert not phantom, f"failed answers whose row committed: {phantom[:5]}"
        assert not unknown, f"rows nobody asked for: {sorted(unknown)[:5]}"
        assert set(statuses) == {200}, f"answers: {dict(statuses)}\n{self.server_log_tail()}"
        return statuses

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    def server_log_tail(self) -> str:
        return "" if self.server is None else self.server.log_tail(30)

    def whoami(self) -> dict[str, Any]:
        assert self.server is not None
        status, _, body = servers.http_get(self.server.port, "/whoami", timeout=30)
        assert status == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def sigterm(self, timeout: float = 30) -> None:
        """SIGTERM to the server's main process only (docker's stop), and wait for the group."""
        assert self.server is not None
        assert self.server.proc is not None
        proc = self.server.proc
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except Exception:
            pytest.fail(f"{self.server.name} still running {timeout} s after SIGTERM")
        self.probe.wait_for(
            f"{self.server.name}'s backends to go", self.probe.none_of(self.tag), timeout
        )

    def unclean_closes(self) -> list[str]:
        return [
            line
            for line in self.pg.read_log()[self.log_start :].splitlines()
            if any(m in line for m in EOF_MESSAGES)
        ]

    def assert_clean_stop(self) -> None:
        self.sigterm()
        problems = self.unclean_closes()
        assert not problems, "\n".join(problems)

    def cleanup(self) -> None:
        if self.server is not None:
            self.server.cleanup()
        with contextlib.suppress(Exception):
            execute(self.probe, f"DROP TABLE IF EXISTS {self.table}")


@pytest.fixture
def case(pg: Any, probe: Probe, app_dsn: Callable[..., str]) -> Iterator[Case]:
    c = Case(pg, probe, app_dsn)
    try:
        yield c
    finally:
        c.cleanup()


def warnings_in(log: str, pattern: str) -> list[str]:
    return [line for line in log.splitlines() if "WARNING" in line and re.search(pattern, line)]


# -- gunicorn's gevent worker ------------------------------------------------------------


def test_gunicorn_gevent_pool_by_default(ledger_tree, case):
    """gevent worker, scope unset: a shared pool per worker, served in order, no 503.

    20 clients, each request holding its connection 0.2 s, a pool of 4 in one
    worker: before, each greenlet (one per client connection) had its own
    backend, and pool waiters were not served in order.
    """
    python = need(servers.gunicorn_python(), "gevent", "psycogreen")
    case.start(
        servers.gunicorn_server(
            "ledger_wsgi:application",
            workers=1,
            worker_class="gevent",
            python_path=[ledger_tree],
            env=case.env(
                APP_PSYCOGREEN="psycogreen" if PSYCOPG2 else "", WSGI_PGCONN_POOL_TIMEOUT="5"
            ),
            extra_args=["--worker-connections", "100"],
            name="gunicorn-gevent",
        )
    )
    assert python
    case.load(clients=20, per_client=3, sleep=0.2)
    case.check_ledger()
    assert case.most_backends <= 4, case.most_backends
    # First come, first served: 20 requests on 4 connections wait at most ~5 turns of 0.2 s.
    assert case.p99() < 2.0, sorted(case.latencies)[-5:]
    stats = json.loads(servers.http_get(case.server.port, "/stats")[2])
    assert stats["scope"] == "pool"
    assert stats["pool_timeouts"] == 0
    assert not warnings_in(case.server.read_log(), "wait callback|blocks the whole process")
    case.assert_clean_stop()


# -- uWSGI ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fork_hooks", [False, True], ids=["plain", "py-call-uwsgi-fork-hooks"]
)
def test_uwsgi_threads_warmed_master(ledger_tree, case, fork_hooks):
    """Prefork without --lazy-apps, a query at import in the master, workers respawned.

    The master's connection is closed when its workers start (the master
    serves nothing and runs no exit hook); each worker names its backends
    with its own pid; a respawned worker's discarded inherited connection is
    not a WARNING; SIGTERM closes everything cleanly.
    """
    need_uwsgi()
    server = case.start(
        servers.uwsgi_server(
            "ledger_wsgi:application",
            processes=2,
            threads=4,
            max_requests=20,
            python_path=[ledger_tree],
            env=case.env(APP_WARM="1"),
            # With this option os.register_at_fork hooks run in the workers too.
            extra_args=["--py-call-uwsgi-fork-hooks"] if fork_hooks else [],
            name="uwsgi-warm",
        )
    )
    warm = re.search(r"warm-up at import in pid (\d+)", server.read_log())
    assert warm, server.log_tail()
    master_pid = int(warm.group(1))
    assert master_pid == server.proc.pid  # loaded in the master
    # The master's own backend goes once the workers have started.
    case.probe.wait_for("the master's connection to close", lambda: case.backends() == 0, 15)
    case.load(clients=8, per_client=10)
    case.check_ledger()
    assert case.most_backends <= 2 * 4, case.most_backends
    assert case.whoami()["pid"] != master_pid

    def respawned() -> bool:  # --max-requests recycles workers older than 1 s
        servers.http_get(server.port, "/health")
        return "Respawned uWSGI worker" in server.read_log()

    case.probe.wait_for("a worker to be respawned", respawned, 20)
    case.load(clients=4, per_client=5)  # served by respawned workers too
    case.check_ledger()
    log = server.read_log()
    assert not warnings_in(log, "forked"), warnings_in(log, "forked")
    case.assert_clean_stop()


def test_uwsgi_application_name_carries_the_worker_pid(ledger_tree, pg, probe, servers_db):
    """Without application_name in the DSN, each backend is named after the process that opened it.

    The master warms up at import (its registry and connection string are
    made there); the workers' backends must carry the workers' pids.
    """
    need_uwsgi()
    table = "ledger_" + uuid.uuid4().hex[:8]
    execute(probe, f"CREATE TABLE {table} (k text NOT NULL)")
    server = servers.uwsgi_server(
        "ledger_wsgi:application",
        processes=2,
        python_path=[ledger_tree],
        env=server_env(
            pg.dsn(dbname=servers_db),
            APP_TABLE=table,
            APP_WARM="1",
            WSGI_PGCONN_DRIVER=dbapi.NAME,
        ),
        name="uwsgi-appname",
    )
    try:
        server.start(ready_path="/health", ready_status=200, timeout=60)
        seen = {}
        deadline = time.monotonic() + 20
        while len(seen) < 2 and time.monotonic() < deadline:
            status, _, body = servers.http_get(server.port, "/whoami", timeout=30)
            assert status == 200, body
            me = json.loads(body)
            seen[me["pid"]] = me["application_name"]
        assert len(seen) == 2, seen
        for pid, name in seen.items():
            assert name == f"wsgi_pgconn[{pid}]", seen
    finally:
        server.cleanup()
        execute(probe, f"DROP TABLE IF EXISTS {table}")


def test_uwsgi_threads_lazy_apps(ledger_tree, case):
    need_uwsgi()
    case.start(
        servers.uwsgi_server(
            "ledger_wsgi:application",
            processes=2,
            threads=4,
            lazy_apps=True,
            python_path=[ledger_tree],
            env=case.env(),
            name="uwsgi-lazy",
        )
    )
    case.load(clients=8, per_client=10)
    case.check_ledger()
    assert case.most_backends <= 2 * 4, case.most_backends
    case.assert_clean_stop()


@pytest.mark.parametrize("monkey_patch", [False, True], ids=["no-monkey-patch", "monkey-patch"])
def test_uwsgi_gevent(ledger_tree, case, monkey_patch):
    """uWSGI's gevent loop: the pool by default, and it keeps answering (no lock across a switch).

    Without --gevent-monkey-patch the threading module is the real one: the
    pool waits on gevent's own Event. psycopg2 waits through gevent with the
    wait callback; psycopg 3 needs ``select`` patched, which the application
    does itself when uWSGI does not (APP_GEVENT_PATCH).
    """
    need(servers.venv_python(), "gevent")
    need_uwsgi()
    extra = {"WSGI_PGCONN_POOL_SIZE": "4", "WSGI_PGCONN_POOL_TIMEOUT": "5"}
    if PSYCOPG2:
        extra["APP_PSYCOGREEN"] = "wsgi_pgconn"
    elif not monkey_patch:
        extra["APP_GEVENT_PATCH"] = "1"
    case.start(
        servers.uwsgi_server(
            "ledger_wsgi:application",
            processes=1,
            gevent=50,
            gevent_monkey_patch=monkey_patch,
            python_path=[ledger_tree],
            env=case.env(**extra),
            name="uwsgi-gevent",
        )
    )
    case.load(clients=16, per_client=3, sleep=0.1)
    case.check_ledger()
    assert case.most_backends <= 4, case.most_backends
    # 48 requests of 0.1 s on 4 connections, cooperatively: about 1.2 s in all.
    assert case.p99() < 3.0, sorted(case.latencies)[-5:]
    stats = json.loads(servers.http_get(case.server.port, "/stats")[2])
    assert stats["scope"] == "pool"
    assert not warnings_in(case.server.read_log(), "blocks the whole process")
    case.assert_clean_stop()


# -- waitress and werkzeug -------------------------------------------------------------------


def test_waitress(ledger_tree, case):
    """waitress-serve, 4 threads, thread scope; SIGTERM (not handled by waitress) closes cleanly."""
    need(servers.venv_python(), "waitress")
    case.start(
        servers.waitress_server(
            "ledger_wsgi:application",
            threads=4,
            python_path=[ledger_tree],
            env=case.env(),
            name="waitress",
        )
    )
    case.load(clients=8, per_client=10)
    case.check_ledger()
    assert case.most_backends <= 4, case.most_backends
    assert case.backends() >= 1
    case.assert_clean_stop()


def test_werkzeug_threaded_pool_by_default(ledger_tree, case):
    """werkzeug's threaded server (a thread per request): recognised, pool scope by default."""
    case.start(
        servers.werkzeug_server(
            "ledger_wsgi:application",
            python_path=[ledger_tree],
            env=case.env(),
            name="werkzeug",
        )
    )
    case.load(clients=4, per_client=25)
    case.check_ledger()
    assert case.most_backends <= 4, case.most_backends
    stats = json.loads(servers.http_get(case.server.port, "/stats")[2])
    assert stats["scope"] == "pool"
    assert stats["opened"] <= 4, stats  # 100 requests, each on its own thread
    assert case.backends() >= 1
    case.assert_clean_stop()


def test_werkzeug_thread_scope_warns_once(ledger_tree, case):
    """scope=thread set explicitly on werkzeug's threaded server: one WARNING naming the fix."""
    case.start(
        servers.werkzeug_server(
            "ledger_wsgi:application",
            python_path=[ledger_tree],
            env=case.env(WSGI_PGCONN_SCOPE="thread"),
            name="werkzeug-thread",
        )
    )
    case.load(clients=1, per_client=12)
    case.check_ledger()
    case.probe.wait_for(
        "the churn warning",
        lambda: warnings_in(case.server.read_log(), "thread per request"),
        10,
    )
    found = warnings_in(case.server.read_log(), "thread per request")
    assert len(found) == 1, found
    assert "werkzeug" in found[0]
    assert "WSGI_PGCONN_SCOPE=pool" in found[0]
    case.assert_clean_stop()
