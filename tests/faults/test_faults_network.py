"""A network path that stops answering without closing, and a query that never ends.

The middleware's connections go through :class:`proxy.BlackholeProxy`; its
blackhole drops every packet at the proxy's sockets (kernel-level, no ACKs),
so what ends a stuck request is the client's own TCP machinery, configured in
the DSN: ``tcp_user_timeout`` (unacknowledged data), keepalives (a request
waiting for an answer that never comes) and ``connect_timeout`` (SYNs that go
nowhere). The core's defaults are 60 s for each; the tests pass short values.

Server: :class:`_faultkit.PoolServer` with **one** worker thread and
scope=thread, so "the thread serves again afterwards" is the same thread.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _faultkit as kit
import psycopg2.extensions
import pytest
from proxy import BlackholeProxy

from wsgi_pgconn.scopes import Registry

pytestmark = pytest.mark.slow

FAST_TCP = {
    "tcp_user_timeout": "1500",
    "keepalives": "1",
    "keepalives_idle": "1",
    "keepalives_interval": "1",
    "keepalives_count": "2",
    "connect_timeout": "2",
}
BOUND = 8.0  # seconds a request may take before it counts as hanging


def _loopback_port(pg: Any) -> int:
    """The server's port, when it listens on 127.0.0.1 (where the proxy relays to)."""
    if pg.host not in ("127.0.0.1", "localhost"):
        pytest.skip(f"the proxy relays to 127.0.0.1, and the server is at {pg.host or 'a socket'}")
    port: int = pg.port
    return port


def _via(dsn: str, proxy: BlackholeProxy) -> str:
    result: str = psycopg2.extensions.make_dsn(
        dsn, host="127.0.0.1", port=str(proxy.port), **FAST_TCP
    )
    return result


def _lock_app(table: str, side: kit.Side) -> Any:
    """``/locked?k=KEY``: waits for advisory lock 4242 inside the transaction, then inserts."""
    inner = kit.ledger_app(table, side)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] != "/locked":
            return inner(environ, start_response)
        key = kit.query_key(environ)
        conn = environ["wsgi_pgconn.connection"]
        side.saw(key, conn)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(4242)")
            cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (key,))
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    return app


def _waiting_on_lock(admin: kit.Admin, app_name: str) -> bool:
    return bool(
        admin.rows(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock'",
            app_name,
        )
    )


def test_blackhole_before_request(
    pg: Any, make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """The path dies while the thread's connection is idle.

    The idle socket shows nothing (no FIN ever arrives), so the connection is
    used: its first statement is never acknowledged and tcp_user_timeout
    fails it. The next request needs a new connection: its SYNs vanish and
    connect_timeout answers 503. When the path is back, the thread serves (once
    the connect back-off is over).
    """
    side = kit.Side()
    key = kit.random_key("bh")
    with BlackholeProxy(_loopback_port(pg)) as proxy:
        mw = make_mw(_lock_app(ledger_table, side), dsn=_via(dsn, proxy))
        server = kit.PoolServer(mw, workers=1)
        ledger = kit.Ledger("blackhole-idle")

        def send(i: int) -> kit.Response:
            resp = kit.http(server.port, f"/write?k={key(i)}", timeout=30)
            ledger.record(kit.Outcome(key(i), resp.status, 0.0, resp.elapsed))
            return resp

        assert send(0).status == 200
        proxy.blackhole(True)
        first = send(1)
        second = send(2)
        proxy.blackhole(False)
        # The failed connect started a back-off (at most connect_backoff_max): the
        # requests in it are answered 503 at once; the first after it connects.
        back = time.monotonic()
        third = send(3)
        i = 3
        while third.status == 503 and time.monotonic() - back < Registry.connect_backoff_max + 1:
            i += 1
            third = send(i)
        print(
            f"blackhole: request on the idle connection answered {first.status} after "
            f"{first.elapsed:.2f}s; a new connection {second.status} after {second.elapsed:.2f}s; "
            f"after the path came back {third.status}; stats {mw.stats()}"
        )
        assert first.status == 500
        assert first.elapsed < BOUND
        assert second.status == 503
        assert second.elapsed < BOUND
        assert second.headers.get("Retry-After") == "1"
        assert third.status == 200
        kit.still_serves(server.port)
        ledger.assert_holds(fadmin.keys(ledger_table))
        server.close()
        mw.close()
    kit.wind_down(fadmin, app_name, None, None)


def test_blackhole_while_waiting_for_an_answer(
    pg: Any, make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """The path dies while a query is running; its answer never arrives.

    The query waits on an advisory lock the test holds; once it is waiting the
    path is blackholed and the lock released, so the server answers into the
    void. The client has nothing unacknowledged, so keepalives (with
    tcp_user_timeout) end the wait. The transaction never committed.
    """
    side = kit.Side()
    key = kit.random_key("bhq")
    with BlackholeProxy(_loopback_port(pg)) as proxy:
        mw = make_mw(_lock_app(ledger_table, side), dsn=_via(dsn, proxy))
        server = kit.PoolServer(mw, workers=1)
        ledger = kit.Ledger("blackhole-query")
        assert kit.http(server.port, "/ping").status == 200
        fadmin.rows("SELECT pg_advisory_lock(4242)")
        results: list[kit.Response] = []
        try:
            client = threading.Thread(
                target=lambda: results.append(
                    kit.http(server.port, f"/locked?k={key(0)}", timeout=30)
                ),
                daemon=True,
            )
            client.start()
            kit.deadline_wait(lambda: _waiting_on_lock(fadmin, app_name), 10, "query waiting")
            proxy.blackhole(True)
            blackholed_at = time.monotonic()
        finally:
            fadmin.rows("SELECT pg_advisory_unlock(4242)")
        client.join(30)
        assert not client.is_alive(), "the request hung"
        failed_after = time.monotonic() - blackholed_at
        (resp,) = results
        ledger.record(kit.Outcome(key(0), resp.status, 0.0, resp.elapsed))
        proxy.blackhole(False)
        after = kit.http(server.port, f"/write?k={key(1)}")
        ledger.record(kit.Outcome(key(1), after.status, 0.0, after.elapsed))
        print(
            f"blackhole during a query: answered {resp.status} {failed_after:.2f}s after the "
            f"path died; next request {after.status}; stats {mw.stats()}"
        )
        assert resp.status == 500
        assert failed_after < BOUND
        assert after.status == 200
        kit.still_serves(server.port)
        ledger.assert_holds(fadmin.keys(ledger_table))
        server.close()
        mw.close()
    kit.wind_down(fadmin, app_name, None, None)


def test_blackhole_during_commit_is_in_doubt(
    pg: Any,
    make_mw: Any,
    dsn: str,
    app_name: str,
    fadmin: kit.Admin,
    ledger_table: str,
    commit_waits_on_lock: int,
) -> None:
    """The path dies while COMMIT runs (it waits on a lock the test holds): outcome unknown.

    COMMIT reached a live session and its answer never came back: the 500
    must say that whether the work was saved is unknown, never "nothing was
    saved" (here the server does commit, once the lock is released).
    """
    side = kit.Side()
    key = kit.random_key("bhc")
    lock = commit_waits_on_lock
    with BlackholeProxy(_loopback_port(pg)) as proxy:
        mw = make_mw(kit.ledger_app(ledger_table, side), dsn=_via(dsn, proxy))
        server = kit.PoolServer(mw, workers=1)
        assert kit.http(server.port, "/ping").status == 200
        fadmin.rows("SELECT pg_advisory_lock(%s)", lock)
        results: list[kit.Response] = []
        try:
            client = threading.Thread(
                target=lambda: results.append(
                    kit.http(server.port, f"/write?k={key(0)}", timeout=30)
                ),
                daemon=True,
            )
            client.start()
            kit.deadline_wait(lambda: bool(kit.committing(fadmin, app_name)), 10, "COMMIT")
            proxy.blackhole(True)
        finally:
            fadmin.rows("SELECT pg_advisory_unlock(%s)", lock)
        client.join(30)
        assert not client.is_alive(), "the request hung"
        (resp,) = results
        proxy.blackhole(False)
        rows = fadmin.keys(ledger_table)
        print(f"blackhole during COMMIT: {resp.status} {resp.body!r}; rows {rows}")
        assert resp.status == 500
        assert kit.IN_DOUBT.encode() in resp.body
        kit.still_serves(server.port)
        server.close()
        mw.close()
    kit.wind_down(fadmin, app_name, None, None)


def test_statement_timeout_bounds_a_stuck_query(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin, ledger_table: str
) -> None:
    """A live server, a query stuck on a lock: statement_timeout answers 500 in time.

    Server: PoolServer, 1 worker thread, scope=thread; statement_timeout=300ms.
    """
    side = kit.Side()
    key = kit.random_key("st")
    mw = make_mw(_lock_app(ledger_table, side), dsn=dsn, statement_timeout="300ms")
    server = kit.PoolServer(mw, workers=1)
    fadmin.rows("SELECT pg_advisory_lock(4242)")
    try:
        resp = kit.http(server.port, f"/locked?k={key(0)}", timeout=30)
    finally:
        fadmin.rows("SELECT pg_advisory_unlock(4242)")
    after = kit.http(server.port, f"/locked?k={key(1)}")
    print(
        f"statement_timeout: answered {resp.status} after {resp.elapsed:.2f}s; stats {mw.stats()}"
    )
    assert resp.status == 500
    assert 0.25 < resp.elapsed < 5
    assert after.status == 200
    assert side.pids[key(0)] == side.pids[key(1)], (
        "a cancelled statement must not cost the connection"
    )
    assert fadmin.keys(ledger_table) == {key(1): 1}
    kit.wind_down(fadmin, app_name, server, mw)
