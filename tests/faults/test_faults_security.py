"""Security: row-level security per request, session state under reset=discard, secrets.

Server: :class:`_faultkit.PoolServer`; each test states its worker count.
Every test in tests/faults is also checked by the autouse ``no_secret_leaks``
fixture (conftest.py): no password may appear in any log record, response,
``repr(mw)``, ``str(mw.settings)`` or ``mw.stats()``.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import secrets
import threading
import traceback
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import _faultkit as kit
import psycopg2.extensions
import pytest

from wsgi_pgconn import ConfigurationError, PgConnMiddleware, get_connection
from wsgi_pgconn.config import mask_dsn

USERS = ("alice", "bob", "carol")


@pytest.fixture
def rls(pg: Any, test_db: str, admin_dsn: str) -> Iterator[dict[str, str]]:
    """A non-superuser login role with a password, and a table with an RLS policy.

    The policy shows a row only when its owner equals the transaction-local
    setting ``app.user`` (set per request in ``on_begin``); inserts default
    the owner to it and are checked against it.
    """
    role = "faults_app_" + uuid.uuid4().hex[:8]
    password = "p'w " + secrets.token_urlsafe(12) + " \\x"  # quoting in key=value DSNs
    table = "docs_" + uuid.uuid4().hex[:8]
    kit.SECRETS.add(password)
    admin = kit.Admin(admin_dsn)
    admin.rows(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD %s", password)
    admin.rows(
        f"CREATE TABLE {table} (id serial PRIMARY KEY, "
        "owner text NOT NULL DEFAULT current_setting('app.user'), body text)"
    )
    admin.rows(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    admin.rows(
        f"CREATE POLICY own ON {table} USING (owner = current_setting('app.user', true)) "
        "WITH CHECK (owner = current_setting('app.user', true))"
    )
    admin.rows(f"GRANT SELECT, INSERT ON {table} TO {role}")
    admin.rows(f"GRANT USAGE ON SEQUENCE {table}_id_seq TO {role}")
    for user in USERS:
        for n in range(3):
            admin.rows(f"INSERT INTO {table} (owner, body) VALUES (%s, %s)", user, f"{user}-{n}")
    app_dsn: str = pg.dsn(
        dbname=test_db, user=role, password=password, application_name="rls-" + role[-8:]
    )
    try:
        yield {
            "role": role,
            "password": password,
            "table": table,
            "dsn": app_dsn,
            "app_name": "rls-" + role[-8:],
        }
    finally:
        kit.deadline_wait(
            lambda: not admin.rows("SELECT 1 FROM pg_stat_activity WHERE usename = %s", role),
            10,
            "the role's sessions to end",
        )
        admin.rows(f"DROP TABLE {table}")
        admin.rows(f"DROP ROLE {role}")
        admin.close()


def _rls_app(table: str, side: kit.Side) -> Any:
    """``/list``: owners visible; ``/add``: insert (optionally as ``owner``); ``/fail``: raise."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        conn = get_connection(environ)
        params = urllib.parse.parse_qs(environ["QUERY_STRING"])
        key = params.get("k", [""])[0]
        side.saw(key, conn)
        path = environ["PATH_INFO"]
        with conn.cursor() as cur:
            if path == "/add":
                if "owner" in params:
                    cur.execute(
                        f"INSERT INTO {table} (owner, body) VALUES (%s, %s)",
                        (params["owner"][0], key),
                    )
                else:
                    cur.execute(f"INSERT INTO {table} (body) VALUES (%s)", (key,))
            cur.execute(f"SELECT owner FROM {table}")
            owners = sorted({owner for (owner,) in cur.fetchall()})
            if path == "/fail":
                cur.execute("SELECT set_config('app.user', 'mallory', false)")
                raise RuntimeError("the application failed after reading")
        body = json.dumps({"owners": owners, "pid": conn.info.backend_pid}).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    return app


def _on_begin(conn: Any, environ: dict[str, Any]) -> None:
    user = environ.get("HTTP_X_USER", "")
    if user == "explode":
        raise RuntimeError("on_begin failed")
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('app.user', %s, true)", (user,))


def test_row_level_security_per_request(
    rls: dict[str, str], make_mw: Any, fadmin: kit.Admin
) -> None:
    """A request sees only its user's rows, on reused connections, after failures too.

    The app connects as a non-superuser role (superusers bypass RLS); on_begin
    sets ``app.user`` from the X-User header with ``set_config(.., true)``.
    Phase 1, PoolServer with 1 worker thread (scope=thread): one connection
    serves a scripted sequence of users, failed requests (including one whose
    on_begin raises, and one that set app.user at session level before
    failing) and anonymous requests. Phase 2, PoolServer with 2 worker threads,
    4 client threads, 160 random requests.
    """
    side = kit.Side()
    mw = make_mw(_rls_app(rls["table"], side), dsn=rls["dsn"], on_begin=_on_begin)
    seen: list[tuple[str, str, int, list[str]]] = []
    lock = threading.Lock()

    def request(port: int, user: str, path: str, key: str) -> kit.Response:
        headers = {"X-User": user} if user else {}
        resp = kit.http(port, f"{path}?k={key}", headers=headers)
        if resp.status == 200:
            data = json.loads(resp.body)
            with lock:
                seen.append((user, path, data["pid"], data["owners"]))
        return resp

    script = [
        ("alice", "/list", 200),
        ("bob", "/list", 200),
        ("alice", "/fail", 500),
        ("bob", "/list", 200),
        ("", "/list", 200),
        ("carol", "/add", 200),
        ("explode", "/list", 500),
        ("", "/list", 200),
        ("bob", "/fail", 500),
        ("", "/list", 200),
        ("alice", "/add", 200),
        ("carol", "/list", 200),
    ]
    with kit.PoolServer(mw, workers=1) as server:
        for i, (user, path, status) in enumerate(script):
            resp = request(server.port, user, path, f"s{i}")
            assert resp.status == status, (i, user, path, resp.status, resp.body)
        forged = request(server.port, "bob", "/add", "forged&owner=alice")
        assert forged.status == 500, "bob inserted a row owned by alice"
    pids = {pid for _, _, pid, _ in seen}
    assert len(pids) == 1, "phase 1 must run on one reused connection"

    rng = random.Random()

    def perform(i: int) -> kit.Outcome:
        user = rng.choice([*USERS, ""])
        path = rng.choice(["/list", "/list", "/add", "/fail"])
        resp = request(server2.port, user, path, f"r{i}")
        return kit.Outcome(f"r{i}", resp.status, 0.0, 0.0)

    with kit.PoolServer(mw, workers=2) as server2:
        ledger = kit.Ledger("rls")
        with kit.Load(
            server2.port, ledger, perform=perform, clients=4, max_requests=160, time_limit=40
        ) as load:
            load.join(60)
    wrong = [(user, path, owners) for user, path, _, owners in seen if owners not in ([], [user])]
    by_pid: dict[int, set[str]] = {}
    for user, _, pid, _ in seen:
        by_pid.setdefault(pid, set()).add(user)
    print(
        f"row-level security: {len(seen)} successful reads/writes on {len(by_pid)} connections, "
        f"users per connection {sorted(len(u) for u in by_pid.values())}; "
        f"phase 2 statuses {dict(collections.Counter(o.status for o in ledger.snapshot()))}"
    )
    assert not wrong, f"a request saw another user's rows: {wrong[:5]}"
    assert all(owners == [user] for user, _, _, owners in seen if user)
    assert all(len(users) > 1 for users in by_pid.values()), "connections were not shared"
    mallory = fadmin.rows(f"SELECT count(*) FROM {rls['table']} WHERE owner = 'mallory'")
    assert mallory == [(0,)]
    kit.deadline_wait(lambda: mw.stats().get("in_use", 0) == 0, 10, "connections released")
    mw.close()


def _discard_app(side: kit.Side) -> Any:
    """``/set?k=KEY``: record what the session shows, then SET things at session level."""

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        conn = get_connection(environ)
        key = kit.query_key(environ)
        side.saw(key, conn)
        with conn.cursor() as cur:
            cur.execute(
                "SELECT coalesce(current_setting('app.leak', true), ''), "
                "current_setting('statement_timeout'), current_setting('search_path'), "
                "coalesce(current_setting('app.configured', true), ''), current_user"
            )
            side.events["state:" + key] = cur.fetchone()  # type: ignore[assignment]
            cur.execute("SELECT set_config('app.leak', %s, false)", (key,))
            cur.execute("SET statement_timeout = '77s'")
            cur.execute("SET search_path = pg_catalog, public")
        fail = environ["PATH_INFO"] == "/set-and-fail"
        start_response("500 Failed" if fail else "200 OK", [("Content-Length", "0")])
        return [b""]

    return app


def _configure(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute("SET app.configured = 'yes'")


def test_discard_hides_session_sets(
    make_mw: Any, dsn: str, app_name: str, fadmin: kit.Admin
) -> None:
    """reset=discard: a session-level SET by one request is never seen by the next.

    Phase 1, PoolServer with 1 worker thread (scope=thread): 20 requests in a
    row on one connection, alternating committed and failed ones; each sees
    the defaults (and the configure hook's setting, re-applied after DISCARD
    ALL). Phase 2, PoolServer with 3 worker threads, 6 client threads, 120
    requests, pool scope with 2 connections.
    """
    side = kit.Side()
    mw = make_mw(_discard_app(side), dsn=dsn, reset="discard", configure=_configure)
    defaults = None
    with kit.PoolServer(mw, workers=1) as server:
        for i in range(20):
            path = "/set-and-fail" if i % 3 == 2 else "/set"
            resp = kit.http(server.port, f"{path}?k=a{i}")
            assert resp.status == (500 if i % 3 == 2 else 200)
            state = side.events["state:" + f"a{i}"]
            if defaults is None:
                defaults = state
            assert state == defaults, f"request {i} saw {state}, not {defaults}"
    assert defaults is not None
    assert defaults[0] == ""
    assert defaults[3] == "yes"
    assert defaults[1] != "77s"
    assert len(set(side.pids.values())) == 1, "one connection, not discarded"
    mw.close()

    side2 = kit.Side()
    mw2 = make_mw(
        _discard_app(side2),
        dsn=dsn,
        reset="discard",
        configure=_configure,
        scope="pool",
        pool_size=2,
        pool_timeout=10,
    )
    with kit.PoolServer(mw2, workers=3) as server:
        ledger = kit.Ledger("discard")
        with kit.Load(
            server.port,
            ledger,
            lambda i: (
                f"b{i}",
                "GET",
                ("/set-and-fail" if i % 4 == 3 else "/set") + f"?k=b{i}",
                None,
            ),
            clients=6,
            max_requests=120,
            time_limit=40,
        ) as load:
            load.join(60)
    states = {key: value for key, value in side2.events.items() if key.startswith("state:")}
    assert len(states) == 120
    leaked = {key: state for key, state in states.items() if state != defaults}
    print(
        f"reset=discard: {len(states)} requests on {len(set(side2.pids.values()))} connections; "
        f"stats {mw2.stats()}"
    )
    assert not leaked, f"requests saw an earlier request's SET: {list(leaked.items())[:5]}"
    mw2.close()
    kit.deadline_wait(lambda: not fadmin.backends(app_name), 10, "no backend left")


def test_discard_after_sql_commit(make_mw: Any, dsn: str) -> None:
    """reset=discard, and the request sends COMMIT as SQL before its SET.

    Server: PoolServer, 1 worker thread, scope=thread.
    """
    side = kit.Side()

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        conn = get_connection(environ)
        key = kit.query_key(environ)
        side.saw(key, conn)
        with conn.cursor() as cur:
            cur.execute("SELECT coalesce(current_setting('app.leak', true), '')")
            side.events["state:" + key] = cur.fetchone()[0]  # type: ignore[assignment,index]
            cur.execute("COMMIT")
            cur.execute("SELECT set_config('app.leak', %s, false)", (key,))
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    mw = make_mw(app, dsn=dsn, reset="discard")
    with kit.PoolServer(mw, workers=1) as server:
        for i in range(3):
            assert kit.http(server.port, f"/?k=c{i}").status == 200
    assert [side.events[f"state:c{i}"] for i in range(3)] == ["", "", ""]


# -- secrets ------------------------------------------------------------------------


def _chain_text(exc: BaseException) -> str:
    """What a traceback of ``exc`` shows (chained causes included unless suppressed)."""
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)


def _serve_once(mw: PgConnMiddleware) -> kit.Response:
    with kit.PoolServer(mw, workers=1) as server:
        return kit.http(server.port, "/", timeout=30)


def _ok_app(environ: dict[str, Any], start_response: Any) -> Any:
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT 1")
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def test_password_never_shown_for_bad_dsns(
    pg: Any,
    test_db: str,
    make_mw: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wrong password, unreachable host, unparsable strings, URLs, DATABASE_URL.

    Server: PoolServer, 1 worker thread per case. Each served case is answered
    503; each unparsable one raises ConfigurationError when the middleware is
    built. The autouse fixture then scans every log record (DEBUG and up),
    response, repr(mw), str(mw.settings) and mw.stats(); here the exceptions'
    messages and printed tracebacks are scanned too.
    """
    wrong = "Wr0ng " + secrets.token_hex(8)
    url_pw = "p@ss:w/rd?" + secrets.token_hex(6)
    bad = "b4d'" + secrets.token_hex(6)
    kit.SECRETS.update({wrong, url_pw, urllib.parse.quote(url_pw, safe=""), bad})
    texts: list[str] = []

    served = {
        "wrong password": pg.dsn(dbname=test_db, password=wrong),
        "unreachable port": psycopg2.extensions.make_dsn(
            pg.dsn(dbname=test_db), port=str(kit.unused_port()), connect_timeout="2"
        ),
        "wrong password (URL)": (
            f"postgresql://postgres:{urllib.parse.quote(url_pw, safe='')}@127.0.0.1:{pg.port}/"
            f"{test_db}?connect_timeout=3"
        ),
        "unknown host": psycopg2.extensions.make_dsn(
            pg.dsn(dbname=test_db, password=wrong),
            host="no-such-host.invalid",
            connect_timeout="2",
        ),
    }
    for what, dsn in served.items():
        mw = make_mw(_ok_app, dsn=dsn)
        resp = _serve_once(mw)
        assert resp.status == 503, (what, resp.status, resp.body)
        texts += [resp.body.decode(), repr(mw), str(mw.settings), mw.settings.masked_dsn]

    unparsable = [
        f"host=127.0.0.1 password={bad} port",  # missing '='
        f"password='{bad}",  # unterminated quote
        f"postgresql://postgres:{bad}%zz@127.0.0.1/db",  # bad percent-encoding in the password
        f"postgresql://postgres:{bad}@[::1/db",  # bad IPv6 literal
    ]
    for dsn in unparsable:
        with pytest.raises(ConfigurationError) as info:
            PgConnMiddleware(_ok_app, dsn=dsn)
        texts.append(_chain_text(info.value))
        assert "DATABASE_URL" in str(info.value) or "dsn" in str(info.value)
        assert mask_dsn(dsn) == "<unparsable connection string>"
    monkeypatch.setenv("DATABASE_URL", unparsable[0])
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(_ok_app)
    texts.append(_chain_text(info.value))

    monkeypatch.setenv("DATABASE_URL", served["wrong password"])
    mw = PgConnMiddleware(_ok_app)
    kit.MIDDLEWARES.append(mw)
    try:
        assert _serve_once(mw).status == 503
    finally:
        mw.close()
    logged = [r for r in caplog.records if r.name == "wsgi_pgconn" and r.levelno >= logging.WARNING]
    assert len(logged) >= len(served), "each failed connect is logged"
    leaks = [(s, t) for t in texts for s in kit.SECRETS if s and s in t]
    assert not leaks, f"a password appeared in: {leaks[0][1][:300]!r}"


def test_sslpassword_is_masked(pg: Any, test_db: str, make_mw: Any) -> None:
    """Server: PoolServer, 1 worker thread; the DSN carries an sslpassword."""
    secret = "ssl-" + secrets.token_hex(8)
    kit.SECRETS.add(secret)  # the autouse scan covers logs, responses, reprs and stats
    mw = make_mw(_ok_app, dsn=pg.dsn(dbname=test_db, sslpassword=secret))
    assert _serve_once(mw).status == 200
    assert secret not in repr(mw.settings)


def test_configuration_error_carries_no_password(pg: Any) -> None:
    """No server: the middleware is never built."""
    bad = "b4d" + secrets.token_hex(6)
    with pytest.raises(ConfigurationError) as info:
        PgConnMiddleware(_ok_app, dsn=f"postgresql://postgres:{bad}%zz@127.0.0.1/db")
    context = info.value.__context__
    assert context is None or bad not in str(context)
