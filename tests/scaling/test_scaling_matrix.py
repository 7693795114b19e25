"""The commit/rollback rules and a concurrent ledger, through PgBouncer and pgpool-II.

Every case runs through PgBouncer in transaction mode (``pooler="transaction"``),
PgBouncer in session mode and pgpool-II in its plain connection-pooling mode.
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql
from scaling_names import APP_DB, CLIENT_USER, PGPOOL_ROLE, POOL_ROLE, Target
from scaling_servers import PgBouncer, PgPool
from scaling_wsgi import Response, call, ledger_app, matrix_app, open_response

from wsgi_pgconn import PgConnMiddleware

pytestmark = pytest.mark.cluster_only(
    "puts PgBouncer and pgpool-II in front of the throwaway cluster's unix socket"
)

MakeMw = Callable[..., PgConnMiddleware]


def committed(admin: Any, table: str) -> list[str]:
    with admin.cursor() as cur:
        cur.execute(sql.SQL("SELECT k FROM {} ORDER BY k").format(sql.Identifier(table)))
        return [row[0] for row in cur.fetchall()]


@pytest.fixture
def matrix(pooled: Target, make_mw: MakeMw, table: str) -> PgConnMiddleware:
    return make_mw(matrix_app(table), dsn=pooled.dsn, pooler=pooled.pooler, scope="thread")


@pytest.mark.parametrize(
    ("path", "code", "kept"),
    [
        ("/ok", 200, True),
        ("/notfound", 404, True),
        ("/raise", 500, False),
        ("/exc_info", 400, False),
        ("/5xx", 503, False),
        ("/deferred", 500, False),
    ],
)
def test_commit_or_rollback(
    pooled: Target,
    matrix: PgConnMiddleware,
    admin: Any,
    table: str,
    path: str,
    code: int,
    kept: bool,
) -> None:
    response = call(matrix, path, "k=" + path.strip("/"))
    assert response.code == code, response
    if path == "/raise":
        assert isinstance(response.error, RuntimeError)
    if path == "/deferred":
        assert response.status is not None
        assert response.status.startswith("500"), "a failed COMMIT must not answer 200"
        assert b"could not be committed" in response.body
    assert committed(admin, table) == ([path.strip("/")] if kept else [])
    # The connection is usable again, and nothing was left open on the server.
    assert call(matrix, "/ok", "k=after").code == 200
    assert "after" in committed(admin, table)


def test_streaming_commits_at_close(matrix: PgConnMiddleware, admin: Any, table: str) -> None:
    opened = open_response(matrix, "/stream", "k=streamed")
    iterator = iter(opened.body)
    assert next(iterator) == b"first "
    assert next(iterator) == b"written "
    assert committed(admin, table) == [], "not committed before the body is closed"
    response = opened.finish()
    assert response.ok, response
    assert response.body == b"done"
    assert committed(admin, table) == ["streamed"]


def test_streaming_failure_rolls_back(matrix: PgConnMiddleware, admin: Any, table: str) -> None:
    response = open_response(matrix, "/stream_raise", "k=lost").finish()
    assert isinstance(response.error, RuntimeError)
    assert committed(admin, table) == []
    assert call(matrix, "/ok", "k=next").ok
    assert committed(admin, table) == ["next"]


def test_isolation_level_reaches_the_server(pooled: Target, make_mw: MakeMw, table: str) -> None:
    """The isolation level travels with every BEGIN: it survives transaction pooling."""
    mw = make_mw(
        matrix_app(table), dsn=pooled.dsn, pooler=pooled.pooler, isolation_level="serializable"
    )
    for _ in range(3):
        response = call(mw, "/read")
        assert response.ok, response
        assert response.text.split()[0] == "serializable"


# -- the ledger ------------------------------------------------------------------------

ENDINGS = ("ok", "ok", "ok", "ok", "ok", "404", "raise", "5xx", "deferred", "ok")
COMMITTING = ("ok", "404")


@pytest.fixture
def ledger(admin: Any) -> Iterator[str]:
    name = "ledger_" + uuid.uuid4().hex[:10]
    with admin.cursor() as cur:
        cur.execute(
            sql.SQL(
                "CREATE TABLE {} (k text, txid bigint NOT NULL, pid int NOT NULL, "
                "CONSTRAINT {} UNIQUE (k) DEFERRABLE INITIALLY DEFERRED)"
            ).format(sql.Identifier(name), sql.Identifier(name + "_k"))
        )
    yield name
    with admin.cursor() as cur:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


def run_ledger(
    mws: list[PgConnMiddleware],
    table: str,
    threads_per_mw: int,
    requests: int,
    during: Callable[[], None] | None = None,
) -> dict[str, tuple[str, Response]]:
    """Concurrent requests, each writing one uniquely keyed row; key -> (ending, response).

    Every thread keeps its connection (scope=thread) until all threads have
    finished; ``during`` runs at that point, while every client connection
    is still open.
    """
    results: dict[str, tuple[str, Response]] = {}
    lock = threading.Lock()
    workers = len(mws) * threads_per_mw
    done = threading.Barrier(workers + 1, timeout=60)
    release = threading.Barrier(workers + 1, timeout=60)
    failures: list[BaseException] = []

    def worker(mw: PgConnMiddleware, name: str) -> None:
        try:
            for i in range(requests):
                key = f"{name}-{i}"
                ending = ENDINGS[zlib.crc32(key.encode()) % len(ENDINGS)]
                response = call(mw, "/", f"k={key}&end={ending}")
                with lock:
                    results[key] = (ending, response)
        except BaseException as exc:
            failures.append(exc)
        finally:
            done.wait()
            release.wait()

    threads = [
        threading.Thread(target=worker, args=(mw, f"m{m}t{t}"), daemon=True)
        for m, mw in enumerate(mws)
        for t in range(threads_per_mw)
    ]
    for thread in threads:
        thread.start()
    try:
        done.wait()
        if during is not None:
            during()
    finally:
        release.wait()
        for thread in threads:
            thread.join(30)
    assert not failures, failures
    assert not any(thread.is_alive() for thread in threads)
    return results


def check_ledger(admin: Any, table: str, results: dict[str, tuple[str, Response]]) -> set[int]:
    """Every committing request's row exactly once, from one transaction; no other row."""
    with admin.cursor() as cur:
        cur.execute(sql.SQL("SELECT k, txid, pid FROM {}").format(sql.Identifier(table)))
        rows = cur.fetchall()
    keys = [k for k, _, _ in rows]
    assert len(keys) == len(set(keys)), "a row was committed twice"
    stored = {k: (txid, pid) for k, txid, pid in rows}
    expected = set()
    for key, (ending, response) in results.items():
        if ending in COMMITTING:
            assert response.code == (200 if ending == "ok" else 404), (key, response)
            expected.add(key)
            txid, pid = (int(v) for v in response.text.split())
            assert stored.get(key) == (txid, pid), (
                f"{key}: the request's statements ran in more than one transaction"
            )
        elif ending == "raise":
            assert isinstance(response.error, RuntimeError), (key, response)
        else:
            assert response.code == 500, (key, response)
    assert set(stored) == expected, "rows of failed requests were committed or 2xx rows lost"
    return {pid for _, pid in stored.values()}


def test_ledger(
    pooled: Target, make_mw: MakeMw, admin: Any, ledger: str
) -> None:
    """2 'processes' x 4 threads of concurrent requests, through each pooler."""
    mws = [
        make_mw(ledger_app(ledger), dsn=pooled.dsn, pooler=pooled.pooler, scope="thread")
        for _ in range(2)
    ]
    results = run_ledger(mws, ledger, threads_per_mw=4, requests=15)
    assert len(results) == 2 * 4 * 15
    check_ledger(admin, ledger, results)


class PoolMonitor:
    """Samples PgBouncer's SHOW POOLS row of a database while a load runs: the peaks."""

    def __init__(self, bouncer: PgBouncer, database: str) -> None:
        self.bouncer, self.database = bouncer, database
        self.peak: dict[str, int] = {"cl_active": 0, "cl_waiting": 0, "sv_active": 0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.bouncer.console() as console:
            deadline = time.monotonic() + 60
            while not self._stop.is_set() and time.monotonic() < deadline:
                row = self.bouncer.pool(self.database, console)
                self.samples += 1
                for key in self.peak:
                    self.peak[key] = max(self.peak[key], int(row.get(key, 0)))
                self._stop.wait(0.002)  # sampling interval, not synchronisation

    def __enter__(self) -> PoolMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_ledger_many_clients_few_servers(
    bouncer_tx: PgBouncer, make_mw: MakeMw, admin: Any, ledger: str, test_db: str, app_name: str
) -> None:
    """4 'processes' x 6 threads = 24 client connections share PgBouncer's 4 server connections."""
    dsn = bouncer_tx.dsn(APP_DB, CLIENT_USER, application_name=app_name)
    processes, threads = 4, 6
    mws = [
        make_mw(ledger_app(ledger), dsn=dsn, pooler="transaction", scope="thread")
        for _ in range(processes)
    ]
    seen: dict[str, Any] = {}

    def sample() -> None:
        seen["clients"] = [
            c for c in bouncer_tx.show("CLIENTS") if c["application_name"] == app_name
        ]
        seen["servers"] = [s for s in bouncer_tx.show("SERVERS") if s["database"] == APP_DB]
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s "
                "AND pid = ANY(%s)",
                (POOL_ROLE, test_db, [s["remote_pid"] for s in seen["servers"]]),
            )
            seen["backends"] = {pid for (pid,) in cur.fetchall()}

    started = time.monotonic()
    with PoolMonitor(bouncer_tx, APP_DB) as monitor:
        results = run_ledger(mws, ledger, threads_per_mw=threads, requests=20, during=sample)
    elapsed = time.monotonic() - started
    pids = check_ledger(admin, ledger, results)
    clients, servers = len(seen["clients"]), len(seen["servers"])
    print(
        f"\n[scaling] {processes}x{threads} client connections -> PgBouncer "
        f"(transaction, pool 4): clients={clients} servers={servers} "
        f"pg_stat_activity={len(seen['backends'])} distinct backend pids in ledger={len(pids)} "
        f"requests={len(results)} in {elapsed:.2f}s; peaks over {monitor.samples} samples "
        f"of SHOW POOLS: {monitor.peak}"
    )
    assert clients == processes * threads
    assert 1 <= servers <= 4
    assert len(seen["backends"]) == servers, "every PgBouncer server is a live backend"
    assert pids <= seen["backends"], "every request ran on one of those few backends"
    assert monitor.peak["sv_active"] <= 4


def test_session_mode_pins_one_server_per_client(
    bouncer_session: PgBouncer, make_mw: MakeMw, admin: Any, ledger: str, app_name: str
) -> None:
    """The contrast: in session mode each persistent client connection holds a server."""
    dsn = bouncer_session.dsn(APP_DB, CLIENT_USER, application_name=app_name)
    mws = [make_mw(ledger_app(ledger), dsn=dsn, pooler="session", scope="thread") for _ in range(2)]
    seen: dict[str, Any] = {}

    def sample() -> None:
        mine = [c for c in bouncer_session.show("CLIENTS") if c["application_name"] == app_name]
        seen["clients"] = len(mine)
        seen["servers"] = len({c["link"] for c in mine if c["link"]})

    results = run_ledger(mws, ledger, threads_per_mw=4, requests=5, during=sample)
    check_ledger(admin, ledger, results)
    print(f"\n[scaling] 2x4 client connections -> PgBouncer (session): {seen}")
    assert seen == {"clients": 8, "servers": 8}, "each client is pinned to its own server"


def test_failed_connection_is_reported(bouncer_tx: PgBouncer, make_mw: MakeMw, table: str) -> None:
    """A wrong password at PgBouncer: 503 and a counted connect error, not a hang."""
    dsn = bouncer_tx.dsn(APP_DB, CLIENT_USER)
    bad = psycopg2.extensions.make_dsn(dsn, password="wrong")
    mw = make_mw(matrix_app(table), dsn=bad, pooler="transaction")
    response = call(mw, "/ok", "k=x")
    assert response.code == 503
    assert mw.stats()["connect_errors"] == 1


def test_pgpool_gives_each_client_connection_its_own_backend(
    pgpool: PgPool, make_mw: MakeMw, test_db: str, table: str
) -> None:
    """pgpool-II caches backends per child process, and a child serves one client
    connection at a time: persistent connections gain no sharing from it."""
    dsn = pgpool.dsn(test_db, PGPOOL_ROLE)
    mws = [
        make_mw(matrix_app(table), dsn=dsn, pooler="session", scope="pool", pool_size=1)
        for _ in range(6)
    ]
    pids = set()
    for _ in range(3):
        for mw in mws:
            response = call(mw, "/read")
            assert response.ok, response
            pids.add(int(response.text.split()[-2]))
    print(f"\n[scaling] 6 persistent clients through pgpool-II: {len(pids)} backends")
    assert len(pids) == 6
