"""Faults under concurrent load, checked with a ledger.

Every request writes one uniquely keyed row (``/write?k=KEY``); the client
side records every answer. After the fault: each 2xx has its row exactly
once, each 5xx (or cut-off) answer has none, no connection is idle in a
transaction, the process still serves, and once the server and the middleware
are closed no backend of the test remains in pg_stat_activity.

Server: :class:`_faultkit.PoolServer` (wsgiref's HTTP handling on a fixed
pool of worker threads, so thread-scope connections live across requests);
each test states its worker count. The ledger connections use
``synchronous_commit=on``: the throwaway cluster runs with it off, and an
immediate shutdown would otherwise lose commits that were acknowledged.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import _faultkit as kit
import psycopg2.extensions
import pytest

from wsgi_pgconn.scopes import Registry

pytestmark = pytest.mark.slow


def durable(dsn: str, **params: Any) -> str:
    """``dsn`` with synchronous_commit on (an acknowledged COMMIT survives a crash)."""
    result: str = psycopg2.extensions.make_dsn(dsn, options="-c synchronous_commit=on", **params)
    return result


def writes(prefix: str) -> kit.RequestMaker:
    key = kit.random_key(prefix)
    return lambda i: (key(i), "GET", f"/write?k={key(i)}", None)


@pytest.mark.cluster_only("restarts the server")
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_under_load(
    mode: str,
    pg: Any,
    make_mw: Any,
    dsn: str,
    app_name: str,
    fadmin: kit.Admin,
    ledger_table: str,
) -> None:
    """PostgreSQL restarted (pg_ctl restart -m MODE) under load.

    Server: PoolServer, 4 worker threads; scope=thread; 6 client threads.
    Requests that start once the server accepts connections again all succeed
    (after the connect back-off: those that start within it may get 503).
    """
    side = kit.Side()
    mw = make_mw(kit.ledger_app(ledger_table, side), dsn=durable(dsn), connect_timeout=2)
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=4)
    ledger = kit.Ledger(f"restart-{mode}")
    with kit.Load(
        server.port, ledger, writes(mode), clients=6, max_requests=20000, time_limit=45
    ) as load:
        ledger.wait_for(lambda: len(ledger.outcomes) >= 60, 20, "60 answers before the restart")
        restart_began = time.monotonic()
        pg.restart(mode)
        back = time.monotonic()
        # Successes, not answers: the 503s of the connect back-off come fast, and
        # 150 of them can arrive before the back-off has ended.
        ledger.wait_for(
            lambda: sum(
                1 for o in ledger.outcomes.values() if o.started > back and o.status == 200
            )
            >= 150,
            30,
            "150 successes of requests started after the restart",
        )
        load.stop_event.set()
    assert load.done
    outcomes = ledger.snapshot()
    after = [o for o in outcomes if o.started > back]
    # A process whose connects failed during the restart backs off (at most
    # connect_backoff_max, then one request tries): a request started in that
    # window may still be answered 503 at once; any later one must succeed.
    settled = back + Registry.connect_backoff_max + 0.25
    failed_after = [
        (o.key, o.status, o.detail[:80])
        for o in after
        if o.status != 200 and not (o.status == 503 and o.started < settled)
    ]
    during = [o for o in outcomes if o.started <= back and o.finished >= restart_began]
    print(
        f"restart -m {mode}: took {back - restart_began:.2f}s; requests overlapping it: "
        f"{len(during)} ({sum(1 for o in during if o.status != 200)} failed); "
        f"after it: {len(after)} ({len(failed_after)} failed); stats: {mw.stats()}"
    )
    assert not failed_after, (
        f"requests started after the server was back failed: {failed_after[:5]}"
    )
    ledger.assert_holds(fadmin.keys(ledger_table))
    assert len(fadmin.backends(app_name)) <= 4
    kit.still_serves(server.port)
    kit.wind_down(fadmin, app_name, server, mw)


def test_terminate_backends_under_load(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, admin_dsn: str, ledger_table: str
) -> None:
    """pg_terminate_backend on random backends of the application, under load.

    Server: PoolServer, 4 worker threads; scope=thread; 6 client threads.
    Every 12 answers a random backend of the app (idle or busy) is terminated,
    and ``pg_terminate_backend(pid, 5000)`` waits until it is gone. A request
    that *entered* the middleware after its backend was gone must never have
    been handed that connection (checked for every request, not only failures).
    """
    side = kit.Side()
    mw = make_mw(kit.ledger_app(ledger_table, side), dsn=durable(dsn))
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=4)
    ledger = kit.Ledger("terminate")
    killer = kit.Admin(admin_dsn)
    gone: dict[int, float] = {}
    states: dict[str, int] = {}
    rng = random.Random()
    try:
        with kit.Load(
            server.port, ledger, writes("kill"), clients=6, max_requests=5000, time_limit=45
        ) as load:
            for n in range(1, 31):
                ledger.wait_for(lambda n=n: len(ledger.outcomes) >= 12 * n, 20, f"{12 * n} answers")
                victims = killer.backends(app_name)
                idle = [v for v in victims if v[1] == "idle"]
                if idle and rng.random() < 0.5:
                    victims = idle
                if not victims:
                    continue
                pid, state = rng.choice(victims)
                (terminated,) = killer.rows("SELECT pg_terminate_backend(%s, 5000)", pid)[0]
                if terminated:
                    gone[pid] = time.monotonic()
                    states[state] = states.get(state, 0) + 1
            target = len(ledger.outcomes) + 100
            ledger.wait_for(lambda: len(ledger.outcomes) >= target, 20, "100 more answers")
            load.stop_event.set()
    finally:
        killer.close()
    stale = [
        (key, pid)
        for key, pid in side.pids.items()
        if pid in gone and side.entered.get(key, 0.0) > gone[pid]
    ]
    report = ledger.assert_holds(fadmin.keys(ledger_table))
    print(
        f"terminated {len(gone)} backends (by state at the kill: {states}); "
        f"failed requests: {report['errors']}; stats: {mw.stats()}"
    )
    assert len(gone) >= 20
    assert not stale, f"requests handed a connection whose backend was already gone: {stale[:5]}"
    assert report["errors"] <= len(gone), "more failures than kills"
    assert report["cut"] == 0
    kit.still_serves(server.port)
    kit.wind_down(fadmin, app_name, server, mw)


def _hold_app(table: str, side: kit.Side, release: threading.Event) -> Any:
    """``/hold?k=KEY``: insert, then keep the connection until ``release`` (max 15 s)."""
    inner = kit.ledger_app(table, side)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] != "/hold":
            return inner(environ, start_response)
        key = kit.query_key(environ)
        conn = environ["wsgi_pgconn.connection"]
        with conn.cursor() as cur:
            cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (key,))
        side.event("held:" + key).set()
        released = release.wait(15)
        start_response("200 OK" if released else "500 Not Released", [("Content-Length", "0")])
        return [b""]

    return app


def _parallel(fn: Any, args: list[Any], timeout: float = 30) -> list[Any]:
    """Run ``fn(arg)`` for every arg in its own thread; results (or exceptions) in order."""
    results: list[Any] = [None] * len(args)

    def run(i: int) -> None:
        try:
            results[i] = fn(args[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(args))]
    for thread in threads:
        thread.start()
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests still running: deadlock?"
    return results


def test_pool_exhaustion_answers_503_within_timeout(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """Pool scope, pool_size=2, pool_timeout=0.5; two requests hold both connections.

    Server: PoolServer, 8 worker threads. Four more requests wait and get 503
    with Retry-After after ~pool_timeout (not sooner, not much later); when the
    holders finish, both connections come back and requests are served again.
    """
    side = kit.Side()
    release = threading.Event()
    mw = make_mw(
        _hold_app(ledger_table, side, release),
        dsn=dsn,
        scope="pool",
        pool_size=2,
        pool_timeout=0.5,
    )
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=8)
    key = kit.random_key("pool")
    holders = threading.Thread(
        target=lambda: holder_results.extend(
            _parallel(lambda k: kit.http(server.port, f"/hold?k={k}"), [key(0), key(1)])
        ),
        daemon=True,
    )
    holder_results: list[Any] = []
    holders.start()
    try:
        for i in (0, 1):
            assert side.event("held:" + key(i)).wait(10), "holder never got a connection"
        assert mw.stats()["in_use"] == 2
        waiters = _parallel(
            lambda k: kit.http(server.port, f"/write?k={k}"), [key(i) for i in range(2, 6)]
        )
    finally:
        release.set()
        holders.join(30)
    assert not holders.is_alive()
    for resp in waiters:
        assert isinstance(resp, kit.Response), resp
        assert resp.status == 503, (resp.status, resp.body)
        assert resp.headers.get("Retry-After") == "1"
        assert 0.45 <= resp.elapsed < 5, f"answered after {resp.elapsed:.2f}s"
    assert [r.status for r in holder_results] == [200, 200]
    stats = mw.stats()
    print(
        f"pool exhaustion: waiters answered 503 after "
        f"{', '.join(f'{r.elapsed:.2f}s' for r in waiters)}; stats {stats}"
    )
    assert stats["pool_timeouts"] == 4
    assert (stats["in_use"], stats["idle"], stats["opened"]) == (0, 2, 2)
    rows = fadmin.keys(ledger_table)
    assert rows == {key(0): 1, key(1): 1}
    kit.still_serves(server.port)
    assert len(fadmin.backends(app_name)) == 2
    kit.wind_down(fadmin, app_name, server, mw)


def test_pool_exhaustion_under_load(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """Pool scope, pool_size=2, pool_timeout=0.1, slow requests (40 ms pg_sleep), 8 clients.

    Server: PoolServer, 8 worker threads. Some requests are answered 503 and
    wrote nothing, the rest 200 with their row; nobody deadlocks and every
    connection comes back to the pool.
    """
    side = kit.Side()
    mw = make_mw(
        kit.ledger_app(ledger_table, side, hold=0.04),
        dsn=dsn,
        scope="pool",
        pool_size=2,
        pool_timeout=0.1,
    )
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=8)
    ledger = kit.Ledger("pool-exhaustion")
    with kit.Load(
        server.port, ledger, writes("pool"), clients=8, max_requests=200, time_limit=30
    ) as load:
        load.join(60)
    report = ledger.assert_holds(fadmin.keys(ledger_table))
    stats = mw.stats()
    print(f"pool under load: stats {stats}")
    assert report["requests"] == 200
    assert report["cut"] == 0
    assert set(report["status"]) <= {"200", "503"}
    assert report["status"].get("503", 0) == stats["pool_timeouts"] > 0
    assert report["status"].get("200", 0) > 0
    deadline_checked = mw.stats()
    assert deadline_checked["in_use"] == 0
    assert deadline_checked["idle"] == 2
    kit.still_serves(server.port)
    kit.wind_down(fadmin, app_name, server, mw)


def test_client_goes_away_mid_stream(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """The client resets the connection while a streamed body is being sent.

    Server: PoolServer, 1 worker thread; scope=thread (so the next request
    runs on the same connection). The row inserted while streaming is rolled
    back, the connection is not discarded, and the next request reuses it.
    """
    side = kit.Side()
    mw = make_mw(kit.ledger_app(ledger_table, side), dsn=dsn)
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=1)
    key = kit.random_key("gone")
    ledger = kit.Ledger("client-gone")
    for i in range(0, 10, 2):
        gone, after = key(i), key(i + 1)
        start = time.monotonic()
        status, head = kit.stream_then_reset(
            server.port,
            f"/stream?k={gone}",
            before_reset=lambda gone=gone: side.event("inserted:" + gone).wait(10),
        )
        assert status == 200
        assert b"\r\n\r\nfirst\n" in head
        assert side.event("closed:" + gone).wait(15), "the body was never closed"
        kit.deadline_wait(lambda: mw.stats()["in_use"] == 0, 10, "the connection released")
        ledger.record(kit.Outcome(gone, None, start, time.monotonic(), kind="stream-reset"))
        resp = kit.http(server.port, f"/write?k={after}")
        ledger.record(kit.Outcome(after, resp.status, start, time.monotonic()))
        assert resp.status == 200
        assert side.pids[after] == side.pids[gone], "the connection was not reused"
    assert side.inserted == {key(i) for i in range(0, 10, 2)}
    ledger.assert_holds(fadmin.keys(ledger_table))
    stats = mw.stats()
    print(f"client gone mid-stream: stats {stats}")
    assert stats["opened"] == 1
    assert stats["rollbacks"] >= 5
    assert sum(stats["discarded"].values()) == 0
    kit.still_serves(server.port)
    kit.wind_down(fadmin, app_name, server, mw)


def test_client_disconnects_mixed_into_load(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """Every 4th request streams and the client resets mid-body, under load.

    Server: PoolServer, 4 worker threads; scope=thread; 6 client threads.
    """
    side = kit.Side()
    mw = make_mw(kit.ledger_app(ledger_table, side), dsn=dsn)
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=4)
    ledger = kit.Ledger("client-disconnects")
    key = kit.random_key("mix")

    def perform(i: int) -> kit.Outcome:
        k = key(i)
        start = time.monotonic()
        if i % 4:
            resp = kit.http(server.port, f"/write?k={k}")
            return kit.Outcome(k, resp.status, start, time.monotonic())
        status, _ = kit.stream_then_reset(
            server.port,
            f"/stream?k={k}",
            before_reset=lambda: side.event("inserted:" + k).wait(10),
        )
        assert status == 200
        return kit.Outcome(k, None, start, time.monotonic(), kind="stream-reset")

    with kit.Load(
        server.port, ledger, perform=perform, clients=6, max_requests=240, time_limit=40
    ) as load:
        load.join(60)
    kit.deadline_wait(lambda: len(side.closed) == 60, 15, "every reset body closed")
    report = ledger.assert_holds(fadmin.keys(ledger_table))
    assert report["requests"] == 240
    assert report["ok"] == 180
    stats = mw.stats()
    print(f"disconnects under load: stats {stats}")
    assert stats["opened"] <= 4
    kit.still_serves(server.port)
    kit.wind_down(fadmin, app_name, server, mw)
