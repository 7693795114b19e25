"""Failover to a streaming-replication standby named in a multi-host DATABASE_URL.

``host=a,b port=p1,p2 target_session_attrs=read-write`` goes to libpq as
given: a new connection lands on whichever server accepts writes. A kept
connection on a server that turned read-only fails its next write with
SQLSTATE 25006; the middleware then replaces that connection and every
other connection of the process opened before it, so the other threads do
not each fail once more on the old primary.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import dbapi
import pytest
from psycopg2.extensions import make_dsn
from scaling_servers import LOOPBACK, Node, poll, query
from scaling_wsgi import Response, call, write_app

from wsgi_pgconn import PgConnMiddleware

pytestmark = pytest.mark.cluster_only(
    "starts a primary and a streaming-replication standby of its own"
)

MakeMw = Callable[..., PgConnMiddleware]
DB = "postgres"
TABLE = "ledger"


@dataclasses.dataclass
class Pair:
    primary: Node
    standby: Node

    @property
    def url(self) -> str:
        """The multi-host connection string the application is configured with."""
        return make_dsn(
            host=f"{LOOPBACK},{LOOPBACK}",
            port=f"{self.primary.port},{self.standby.port}",
            user=self.primary.user,
            password=self.primary.password,
            dbname=DB,
            target_session_attrs="read-write",
            connect_timeout=2,
        )

    @property
    def uri(self) -> str:
        """The same as a postgresql:// URL (as DATABASE_URL usually is)."""
        password = quote(self.primary.password, safe="")
        return (
            f"postgresql://{self.primary.user}:{password}@"
            f"{LOOPBACK}:{self.primary.port},{LOOPBACK}:{self.standby.port}/{DB}"
            "?target_session_attrs=read-write&connect_timeout=2"
        )

    def primary_dsn(self) -> str:
        return self.primary.dsn(dbname=DB, application_name="scaling-admin")

    def standby_dsn(self) -> str:
        return self.standby.dsn(dbname=DB, application_name="scaling-admin")

    def fence_primary(self) -> None:
        fence(self.primary_dsn())

    def wait_standby_caught_up(self) -> None:
        """Until the standby has replayed all the WAL the primary has inserted.

        The insert position, not pg_current_wal_lsn() (the write position): the
        throwaway cluster runs synchronous_commit=off, so an acknowledged commit
        may still sit in the WAL buffers until the WAL writer writes and sends it.
        """
        (lsn,) = query(self.primary_dsn(), "SELECT pg_current_wal_insert_lsn()::text")[0]

        def replayed() -> bool | None:
            rows = query(
                self.standby_dsn(), "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)
            )
            return True if rows[0][0] else None

        poll("the standby replayed the primary's last WAL", replayed)

    def rows_on_new_primary(self) -> dict[str, int]:
        return {k: port for k, port in query(self.standby_dsn(), f"SELECT k, port FROM {TABLE}")}


def fence(dsn: str) -> None:
    """Make a server refuse writes, on its open sessions too (SIGHUP), and wait until every
    transaction that began before that has ended."""
    query(dsn, "ALTER SYSTEM SET default_transaction_read_only = on")
    query(dsn, "SELECT pg_reload_conf()")
    # A new backend sees the new value once the postmaster has re-read its
    # configuration, and by then it has signalled every existing backend: a
    # transaction begun later is read-only everywhere.
    fenced_at = poll("the server is read-only", lambda: _read_only_since(dsn))
    # One begun earlier may still write and commit (even if it has not written yet):
    # wait for those to end, or the standby may be promoted without them.
    poll(
        "the transactions begun before the fence have ended",
        lambda: None if _transactions_begun_before(dsn, fenced_at) else True,
    )


def unfence(dsn: str) -> None:
    query(dsn, "ALTER SYSTEM RESET default_transaction_read_only")
    query(dsn, "SELECT pg_reload_conf()")
    poll("the server accepts writes", lambda: None if _read_only_since(dsn) else True)


def _read_only_since(dsn: str) -> Any:
    (read_only, now), *_ = query(
        dsn, "SELECT current_setting('default_transaction_read_only'), now()"
    )
    return now if read_only == "on" else None


def _transactions_begun_before(dsn: str, moment: Any) -> list[tuple[Any, ...]]:
    return query(
        dsn,
        "SELECT pid FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND xact_start < %s",
        (moment,),
    )


@pytest.fixture(scope="module")
def template() -> Iterator[Node]:
    """A stopped cluster holding the table: each test's primary is a copy of it."""
    node = Node.initdb()
    try:
        node.start()
        query(node.dsn(DB), f"CREATE TABLE {TABLE} (k text PRIMARY KEY, port int NOT NULL)")
        node.stop()
        yield node
    finally:
        node.cleanup()


@pytest.fixture
def pair(template: Node) -> Iterator[Pair]:
    """A primary and a hot standby streaming from it (pg_basebackup -R)."""
    primary = Node.copy_of(template)
    standby: Node | None = None
    try:
        primary.start()
        standby = Node.standby_of(primary).start()
        result = Pair(primary, standby)
        poll(
            "the standby is streaming",
            lambda: query(result.primary_dsn(), "SELECT 1 FROM pg_stat_replication") or None,
        )
        yield result
    finally:
        try:
            if standby is not None:
                standby.cleanup()
        finally:
            primary.cleanup()


# -- python -m wsgi_pgconn check -----------------------------------------------------------


def test_check_tells_a_standby(pair: Pair) -> None:
    """The check command says it is a standby, and how to reach the writable server."""
    from test_check import check_env, line, run_check

    standby = check_env(DATABASE_URL=pair.standby.dsn(dbname=DB))
    result = run_check("--processes", "1", "--threads", "1", env=standby)
    assert result.returncode == 0, result.stdout
    assert line(result.stdout, "standby") == "yes (in recovery)"
    assert "WARNING: the server is read-only (a standby, or fenced)" in result.stdout
    assert "target_session_attrs=read-write" in result.stdout
    # The multi-host URL the application should use lands on the primary.
    result = run_check("--processes", "1", "--threads", "1", env=check_env(DATABASE_URL=pair.uri))
    assert line(result.stdout, "standby") == "no"
    assert result.stdout.endswith("\nVerdict\n  OK\n"), result.stdout


# -- a deterministic check of the 25006 rule --------------------------------------------


def test_read_only_server_retires_every_connection(pair: Pair, make_mw: MakeMw) -> None:
    """One request meets a server that turned read-only; the process's other connections
    are replaced without failing, and the next requests land on the writable server.

    Twice: the error reaching the middleware (failover to the standby), then caught by
    the application, which answers 500 itself (a switch back to the first server)."""
    barrier = threading.Barrier(4, timeout=20)
    mw = make_mw(write_app(TABLE, barrier=barrier), dsn=pair.url, scope="pool", pool_size=4)

    def concurrently(prefix: str) -> list[str]:
        results: list[Response] = [Response()] * 4

        def one(i: int) -> None:
            results[i] = call(mw, "/", f"k={prefix}{i}&wait=1")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert all(r.ok for r in results), results
        return [r.text for r in results]

    primary, standby = str(pair.primary.port), str(pair.standby.port)
    assert concurrently("first") == [primary] * 4
    assert mw.stats()["idle"] == 4

    # Failover: the old primary keeps running, read-only.
    pair.fence_primary()
    pair.wait_standby_caught_up()
    pair.standby.promote()
    failed = call(mw, "/", "k=meets-read-only")
    assert isinstance(failed.error, dbapi.errors.ReadOnlySqlTransaction), failed
    assert concurrently("second") == [standby] * 4
    stats = mw.stats()
    assert (stats["discarded"]["retired"], stats["opened"]) == (4, 8), stats

    # And back, with an application that turns the error into its own 500 page:
    # the cursor recorded the SQLSTATE all the same.
    unfence(pair.primary_dsn())
    fence(pair.standby_dsn())
    failed = call(mw, "/", "k=meets-read-only-again&catch=1")
    assert (failed.code, failed.text) == (500, "database error 25006"), failed
    assert concurrently("third") == [primary] * 4
    stats = mw.stats()
    assert (stats["discarded"]["retired"], stats["opened"]) == (8, 12), stats

    on_standby = dict(query(pair.standby_dsn(), f"SELECT k, port FROM {TABLE}"))
    on_primary = dict(query(pair.primary_dsn(), f"SELECT k, port FROM {TABLE}"))
    assert {k for k in on_standby if k.startswith("second")} == {f"second{i}" for i in range(4)}
    assert {k for k in on_primary if k.startswith("third")} == {f"third{i}" for i in range(4)}
    assert not {"meets-read-only", "meets-read-only-again"} & (set(on_standby) | set(on_primary))


# -- under load ------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    key: str
    started: float
    ended: float
    response: Response

    @property
    def ok(self) -> bool:
        return self.response.ok


class Load:
    """Worker threads sending write requests (one new key each) until stopped."""

    def __init__(self, mw: PgConnMiddleware, threads: int) -> None:
        self.mw = mw
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(f"w{i}",), daemon=True)
            for i in range(threads)
        ]

    def _work(self, name: str) -> None:
        for i in range(50_000):  # bounded; stopped long before
            if self._stop.is_set():
                return
            key = f"{name}-{i}"
            started = time.monotonic()
            response = call(self.mw, "/", f"k={key}")
            outcome = Outcome(key, started, time.monotonic(), response)
            with self._lock:
                self.outcomes.append(outcome)

    def successes_since(self, since: float, port: int | None = None) -> int:
        with self._lock:
            return sum(
                1
                for o in self.outcomes
                if o.ok and o.started >= since and (port is None or o.response.text == str(port))
            )

    def wait_successes(self, count: int, since: float, port: int | None = None) -> None:
        poll(
            f"{count} successful requests",
            lambda: True if self.successes_since(since, port) >= count else None,
            timeout=30,
        )

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads)


def report(name: str, load: Load, switch_started: float, new_port: int) -> dict[str, Any]:
    failures = [o for o in load.outcomes if not o.ok]
    first_new = min(
        (o.ended for o in load.outcomes if o.ok and o.response.text == str(new_port)),
        default=float("nan"),
    )
    kinds: dict[str, int] = {}
    for o in failures:
        kind = type(o.response.error).__name__ if o.response.error else str(o.response.code)
        kinds[kind] = kinds.get(kind, 0) + 1
    numbers = {
        "requests": len(load.outcomes),
        "failed": len(failures),
        "failures_by_kind": kinds,
        "failure_window_ms": round(
            1000 * (max(o.ended for o in failures) - min(o.started for o in failures)), 1
        )
        if failures
        else 0.0,
        "until_first_success_on_new_primary_ms": round(1000 * (first_new - switch_started), 1),
    }
    print(f"\n[scaling] {name}: {numbers}")
    return numbers


def first_success_on(load: Load, port: int) -> float:
    return min(o.ended for o in load.outcomes if o.ok and o.response.text == str(port))


def check_ledger(pair: Pair, load: Load, in_doubt: Callable[[Outcome], bool]) -> int:
    """Every 2xx row is on the new primary exactly once; no failed request's row is,
    unless ``in_doubt`` (its connection broke during COMMIT). Returns the in-doubt count."""
    rows = pair.rows_on_new_primary()
    doubtful = 0
    for o in load.outcomes:
        if o.ok:
            assert o.key in rows, f"{o.key} was answered {o.response.status} but is lost"
        elif o.key in rows:
            assert in_doubt(o), f"{o.key} failed ({o.response}) yet was committed"
            doubtful += 1
    return doubtful


def test_planned_switchover_under_load(pair: Pair, make_mw: MakeMw) -> None:
    """Fence the primary read-only, let the standby catch up, promote it, stop the old one."""
    mw = make_mw(write_app(TABLE), dsn=pair.uri, scope="thread")
    threads = 4
    with Load(mw, threads) as load:
        load.wait_successes(40, since=0)
        switch = time.monotonic()
        pair.fence_primary()
        fenced = time.monotonic()
        pair.wait_standby_caught_up()
        pair.standby.promote()
        promoted = time.monotonic()
        pair.primary.stop()
        stopped = time.monotonic()
        load.wait_successes(40, since=time.monotonic(), port=pair.standby.port)
    report("planned switchover (fence, promote, stop)", load, switch, pair.standby.port)
    steps = {
        "fence_ms": fenced - switch,
        "catch_up_and_promote_ms": promoted - fenced,
        "stop_old_primary_ms": stopped - promoted,
    }
    print("[scaling] switchover steps:", {k: round(1000 * v, 1) for k, v in steps.items()})
    check_ledger(pair, load, in_doubt=lambda o: False)
    failures = [o for o in load.outcomes if not o.ok]
    read_only = [
        o for o in failures if isinstance(o.response.error, dbapi.errors.ReadOnlySqlTransaction)
    ]
    # One 25006 per connection at most, and only for requests in flight at the fence:
    # the others were retired, not retried on the old primary.
    assert len(read_only) <= threads
    assert all(o.started >= switch - 1 for o in failures)
    first_new = first_success_on(load, pair.standby.port)
    assert all(o.started <= first_new for o in failures), "errors after the switch was over"
    assert all(o.response.code == 503 or o in read_only for o in failures), failures[:5]
    stats = mw.stats()
    print(f"[scaling] switchover middleware stats: {stats}")


def test_failover_when_the_primary_stops(pair: Pair, make_mw: MakeMw) -> None:
    """The primary goes away (fast shutdown), then the standby is promoted."""
    mw = make_mw(write_app(TABLE), dsn=pair.url, scope="thread")
    with Load(mw, 4) as load:
        load.wait_successes(40, since=0)
        switch = time.monotonic()
        pair.primary.stop()
        stopped = time.monotonic()
        pair.standby.promote()
        promoted = time.monotonic()
        load.wait_successes(40, since=time.monotonic(), port=pair.standby.port)
    report("failover (primary stops, standby promoted)", load, switch, pair.standby.port)
    steps = {"stop_ms": stopped - switch, "promote_ms": promoted - stopped}
    print("[scaling] failover steps:", {k: round(1000 * v, 1) for k, v in steps.items()})

    def broke_in_flight(o: Outcome) -> bool:
        return isinstance(o.response.error, dbapi.OperationalError) or o.response.code == 500

    doubtful = check_ledger(pair, load, in_doubt=broke_in_flight)
    print(f"[scaling] failed but committed (connection lost during COMMIT): {doubtful}")
    failures = [o for o in load.outcomes if not o.ok]
    first_new = first_success_on(load, pair.standby.port)
    assert all(o.started >= switch - 1 for o in failures)
    assert all(o.started <= first_new for o in failures), "errors after the switch was over"
    in_flight = [o for o in failures if o.response.code != 503]
    assert len(in_flight) <= 4, "only requests in flight at the stop fail with an error"
