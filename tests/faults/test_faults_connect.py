"""A server that refuses one more connection, a connect storm, and permanent connect errors.

* Pool scope whose growth fails (the role's ``CONNECTION LIMIT`` is reached)
  while the pool holds live connections: requests wait for one of them, up to
  ``pool_timeout``, as psycopg_pool's clients do; 503 only when none comes in time.
* A process whose connect failed backs off (bounded, jittered): requests that
  need a new connection meanwhile get 503 at once, without an attempt and
  without a log line; the first request after the back-off tries again.
* A permanent connect error (wrong password, missing database or role, no DSN
  and no ``PG*`` variable) is logged once, at ERROR, with the fix and without
  the password; the requests are still answered 503 (the server may be fixed
  without a restart).

The roles are made per test (``CREATE ROLE ... CONNECTION LIMIT n``), so the
limit is the server's real refusal ("too many connections for role", SQLSTATE
53300). Requests run in a fixed pool of worker threads calling the WSGI
application directly (:class:`test_core_helpers.FixedThreadPool`).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import _faultkit as kit
import pytest
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    call,
    clean_env_fixture,
    get_connection,
    threads_fixture,
)

from wsgi_pgconn.scopes import Registry

HDRS = [("Content-Type", "text/plain")]


@pytest.fixture
def role(
    pg: Any, test_db: str, fadmin: kit.Admin, app_name: str
) -> Iterator[Callable[[int], tuple[str, str]]]:
    """``make(limit)``: a login role with ``CONNECTION LIMIT limit``; (name, dsn)."""
    made: list[str] = []

    def make(limit: int) -> tuple[str, str]:
        name = "r_" + uuid.uuid4().hex[:10]
        password = secrets.token_hex(12)
        kit.SECRETS.add(password)
        fadmin.rows(f"CREATE ROLE {name} LOGIN PASSWORD %s CONNECTION LIMIT {limit}", password)
        made.append(name)
        dsn: str = pg.dsn(dbname=test_db, user=name, password=password, application_name=app_name)
        return name, dsn

    yield make
    for name in made:
        fadmin.rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", name
        )
        kit.deadline_wait(
            lambda name=name: (
                not fadmin.rows("SELECT 1 FROM pg_stat_activity WHERE usename = %s", name)
            ),
            WAIT,
            f"the backends of {name} to exit",
        )
        fadmin.rows(f"DROP ROLE {name}")


class Hold:
    """A request to /hold waits (holding its connection) until ``go`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()


def holding_app(hold: Hold, *, sleep: float = 0.0) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (sleep,))
            (pid, _) = cur.fetchone()
        if environ["PATH_INFO"] == "/hold":
            hold.entered.set()
            assert hold.go.wait(WAIT), "never released"
        start_response("200 OK", HDRS)
        return [str(pid).encode()]

    return app


def connect_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "wsgi_pgconn" and r.levelno == level and "connect" in r.getMessage()
    ]


# -- pool scope: a failed attempt to grow waits for a pooled connection ---------------------


def test_pool_waits_for_a_held_connection_when_it_cannot_grow(
    make_mw: Any, role: Any, threads: Any
) -> None:
    """pool_size=2, the server allows one connection: the second request waits for the first's."""
    _, dsn = role(1)
    hold = Hold()
    mw = make_mw(holding_app(hold), dsn=dsn, scope="pool", pool_size=2, pool_timeout=5)
    pool = threads(2)
    first = pool.submit(0, lambda: call(mw, "/hold"))
    assert hold.entered.wait(WAIT)
    started = time.monotonic()
    second = pool.submit(1, lambda: call(mw, "/"))
    # It tried to open a second connection, was refused, and now waits for the first's.
    kit.deadline_wait(
        lambda: second.done() or mw.stats()["waiting"] == 1, WAIT, "the second request to wait"
    )
    assert not second.done(), f"answered {second.result().status} instead of waiting"
    assert mw.stats()["connect_errors"] >= 1
    hold.go.set()
    a, b = first.result(WAIT), second.result(WAIT)
    assert (a.code, b.code) == (200, 200)
    assert a.body == b.body  # the one connection the server allows, handed over
    assert time.monotonic() - started < 5
    stats = mw.stats()
    assert stats["opened"] == 1
    assert (stats["pool_waits"], stats["pool_timeouts"], stats["connect_backoffs"]) == (1, 0, 0)
    assert (stats["waiting"], stats["in_use"], stats["idle"], stats["pool_max"]) == (0, 0, 1, 2)


def test_overlapping_requests_on_a_pool_that_cannot_grow(
    make_mw: Any, role: Any, threads: Any
) -> None:
    """pool_size=2, one connection obtainable, two overlapping 100 ms requests: both 200."""
    _, dsn = role(1)
    mw = make_mw(holding_app(Hold(), sleep=0.1), dsn=dsn, scope="pool", pool_size=2, pool_timeout=5)
    pool = threads(2)
    codes = pool.each(lambda i: call(mw, "/").code)
    assert codes == [200, 200]
    stats = mw.stats()
    assert (stats["opened"], stats["reused"], stats["pool_timeouts"]) == (1, 1, 0)


def test_many_requests_share_the_one_obtainable_connection(
    make_mw: Any, role: Any, threads: Any
) -> None:
    """40 concurrent requests on a pool of 4 with one connection obtainable: no 503."""
    _, dsn = role(1)
    mw = make_mw(
        holding_app(Hold(), sleep=0.01), dsn=dsn, scope="pool", pool_size=4, pool_timeout=5
    )
    pool = threads(40)
    barrier = threading.Barrier(40)

    def request(i: int) -> int:
        barrier.wait(WAIT)
        return call(mw, "/").code

    codes = pool.each(request)
    assert codes.count(200) == 40, f"{codes.count(503)} of 40 answered 503"
    stats = mw.stats()
    print(f"40 requests, one connection obtainable: {stats}")
    assert stats["opened"] == 1
    assert stats["opened"] + stats["reused"] == 40
    assert stats["connect_errors"] >= 1
    assert (stats["pool_timeouts"], stats["connect_backoffs"]) == (0, 0)
    assert 1 <= stats["pool_waits"] <= 39
    assert stats["pool_wait_seconds"] > 0
    assert (stats["waiting"], stats["in_use"]) == (0, 0)


def test_pool_that_cannot_grow_answers_503_after_pool_timeout(
    make_mw: Any, role: Any, threads: Any
) -> None:
    """Nothing can be had in time (the one connection is held): 503 after pool_timeout."""
    _, dsn = role(1)
    hold = Hold()
    timeout = 0.3
    mw = make_mw(holding_app(hold), dsn=dsn, scope="pool", pool_size=4, pool_timeout=timeout)
    pool = threads(2)
    first = pool.submit(0, lambda: call(mw, "/hold"))
    assert hold.entered.wait(WAIT)
    started = time.monotonic()
    second = pool.submit(1, lambda: call(mw, "/")).result(WAIT)
    elapsed = time.monotonic() - started
    hold.go.set()
    assert first.result(WAIT).code == 200
    assert second.code == 503
    assert b"busy" in second.body
    assert timeout <= elapsed < timeout + 2
    stats = mw.stats()
    assert (stats["pool_waits"], stats["pool_timeouts"]) == (1, 1)
    assert stats["connect_errors"] >= 1
    assert call(mw, "/").code == 200  # and it recovers


# -- the connect back-off ----------------------------------------------------------------------


def test_refused_connect_backs_off_then_tries_again(
    make_mw: Any, role: Any, fadmin: kit.Admin, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """After a failed connect: 503 at once without an attempt; after the back-off, an attempt."""
    monkeypatch.setattr(Registry, "connect_backoff_first", 1.0)
    monkeypatch.setattr(Registry, "connect_backoff_max", 1.0)
    name, dsn = role(0)  # the server refuses every connection of this role
    mw = make_mw(holding_app(Hold()), dsn=dsn, scope="pool", pool_size=4, pool_timeout=5)
    failed_at = time.monotonic()
    assert call(mw, "/").code == 503
    assert mw.stats()["connect_errors"] == 1
    for _ in range(5):  # within the back-off (0.5-1 s): no attempt, answered at once
        started = time.monotonic()
        res = call(mw, "/")
        assert res.code == 503
        assert b"cannot be reached" in res.body
        assert time.monotonic() - started < 0.25
    stats = mw.stats()
    assert (stats["connect_errors"], stats["connect_backoffs"]) == (1, 5)
    fadmin.rows(f"ALTER ROLE {name} CONNECTION LIMIT -1")
    codes: list[int] = []
    kit.deadline_wait(lambda: codes.append(call(mw, "/").code) or codes[-1] == 200, 5, "a 200")
    recovered_after = time.monotonic() - failed_at
    stats = mw.stats()
    # No attempt during the back-off; the first request after it connected.
    assert (stats["connect_errors"], stats["opened"]) == (1, 1)
    assert 0.5 <= recovered_after < 3
    assert set(codes[:-1]) <= {503}
    assert len(connect_records(caplog, logging.WARNING)) == 1
    assert any("again after 1 failed" in m for m in connect_records(caplog, logging.INFO))


def test_thread_scope_connect_storm_is_bounded(
    make_mw: Any, role: Any, threads: Any, caplog: Any
) -> None:
    """Thread scope at the connection limit: 80 requests on 8 threads, 2 connections allowed.

    Without a back-off every request on a thread without a connection tries
    again and logs a WARNING (about 60 attempts and lines here).
    """
    _, dsn = role(2)
    mw = make_mw(holding_app(Hold()), dsn=dsn, scope="thread")
    pool = threads(8)
    barrier = threading.Barrier(8)

    def requests(i: int) -> list[int]:
        barrier.wait(WAIT)
        return [call(mw, "/").code for _ in range(10)]

    started = time.monotonic()
    codes = [code for batch in pool.each(requests) for code in batch]
    elapsed = time.monotonic() - started
    stats = mw.stats()
    attempts = stats["opened"] + stats["connect_errors"]
    warnings = connect_records(caplog, logging.WARNING)
    print(
        f"connect storm: {codes.count(200)} x 200, {codes.count(503)} x 503 in {elapsed:.2f}s; "
        f"{attempts} connect attempts, {len(warnings)} WARNING(s); {stats}"
    )
    assert set(codes) <= {200, 503}
    assert codes.count(200) >= 20  # the two threads with a connection served all theirs
    assert stats["opened"] == 2
    # The first wave (the 6 threads that found no connection at once), then at
    # most one attempt per back-off (at least 50 ms each).
    assert stats["connect_errors"] <= 6 + elapsed / 0.05 + 1, stats
    assert stats["connect_errors"] + stats["connect_backoffs"] == codes.count(503)
    assert stats["connect_backoffs"] > 0
    assert len(warnings) == 1, warnings


# -- permanent connect errors: ERROR once, with the fix, never the password ------------------------


def _bad_dsn(kind: str, pg: Any, test_db: str, app_name: str) -> tuple[str, list[str]]:
    """A DSN that fails permanently, and what the ERROR must say about it."""
    if kind == "wrong-password":
        wrong = "wrong-" + secrets.token_hex(8)
        kit.SECRETS.add(wrong)
        dsn = pg.dsn(dbname=test_db, password=wrong, application_name=app_name)
        return dsn, [
            f'check DATABASE_URL: password authentication failed for user "{pg.user}"',
            "SQLSTATE 28P01",
        ]
    if kind == "missing-database":
        name = "no_such_db_" + uuid.uuid4().hex[:6]
        dsn = pg.dsn(dbname=name, application_name=app_name)
        return dsn, [f'check DATABASE_URL: database "{name}" does not exist', "SQLSTATE 3D000"]
    if kind == "bad-port-value":
        password = "pw-" + secrets.token_hex(8)
        kit.SECRETS.add(password)
        dsn = f"postgresql://{pg.user}:{password}@127.0.0.1:notaport/{test_db}"
        return dsn, ['check DATABASE_URL: ', '"notaport"', "check the parameter's value"]
    if kind == "bad-sslmode":
        dsn = pg.dsn(dbname=test_db, sslmode="bogus", application_name=app_name)
        return dsn, ["check DATABASE_URL: ", 'sslmode value: "bogus"', "check sslmode"]
    assert kind == "unknown-role"
    user = "no_such_role_" + uuid.uuid4().hex[:6]
    # Over the unix socket (trust) the server says that the role does not exist;
    # with password authentication it does not tell, and the password fails.
    dsn = pg.dsn(tcp=False, dbname=test_db, user=user, application_name=app_name)
    return dsn, ["check DATABASE_URL: ", f'"{user}"', "SQLSTATE 28"]


def _until_attempts(mw: Any, attempts: int) -> list[int]:
    """Requests until ``attempts`` connects have failed (each back-off lasts under 0.5 s)."""
    codes: list[int] = []
    kit.deadline_wait(
        lambda: codes.append(call(mw, "/").code) or mw.stats()["connect_errors"] >= attempts,
        10,
        f"{attempts} failed connects",
    )
    return codes


@pytest.mark.parametrize(
    "kind", ["wrong-password", "missing-database", "unknown-role", "bad-port-value", "bad-sslmode"]
)
def test_permanent_connect_error_logged_once_with_the_fix(
    kind: str, pg: Any, test_db: str, app_name: str, make_mw: Any, caplog: Any
) -> None:
    dsn, expected = _bad_dsn(kind, pg, test_db, app_name)
    mw = make_mw(holding_app(Hold()), dsn=dsn, scope="thread")
    codes = _until_attempts(mw, 3)
    errors = connect_records(caplog, logging.ERROR)
    print(f"{kind}: {len(codes)} requests, stats {mw.stats()}; ERROR: {errors}")
    assert set(codes) == {503}
    assert len(errors) == 1, errors
    for text in expected:
        assert text in errors[0]
    assert connect_records(caplog, logging.WARNING) == []
    stats = mw.stats()
    assert stats["connect_errors"] < len(codes)  # the back-off applies too
    assert stats["connect_errors"] + stats["connect_backoffs"] == len(codes)


@pytest.mark.usefixtures("clean_env")
def test_no_dsn_and_no_pg_variables_logged_once_with_the_fix(make_mw: Any, caplog: Any) -> None:
    for path in ("/var/run/postgresql/.s.PGSQL.5432", "/tmp/.s.PGSQL.5432"):  # noqa: S108
        if os.path.exists(path):
            pytest.skip(f"a server listens on libpq's default socket {path}")
    mw = make_mw(holding_app(Hold()), dsn="", scope="thread")
    codes = _until_attempts(mw, 2)
    errors = connect_records(caplog, logging.ERROR)
    assert set(codes) == {503}
    assert len(errors) == 1, errors
    assert "no database is configured: DATABASE_URL is not set" in errors[0]
    assert "postgresql://USER:PASSWORD@HOST" in errors[0]
