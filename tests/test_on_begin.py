"""The on_begin hook: once before the first statement of each of a request's transactions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from test_core_helpers import call

from wsgi_pgconn import get_connection

HDRS = [("Content-Type", "text/plain")]


def set_user(conn: Any, environ: dict[str, Any]) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT set_config('app.user', %s, true)", (environ["PATH_INFO"][1:],))


def current_user(cur: Any) -> str:
    cur.execute("SELECT current_setting('app.user', true)")
    (value,) = cur.fetchone()
    return str(value)


def test_runs_again_for_a_streamed_bodys_transaction_on_an_earlier_cursor(make_mw: Any) -> None:
    """A cursor created before the early COMMIT and used while streaming still gets the hook."""
    seen: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        cur = get_connection(environ).cursor()
        seen.append(current_user(cur))  # the request's first statement: the hook ran

        def body() -> Iterator[bytes]:
            yield b"first\n"  # the COMMIT happened before this chunk was sent
            seen.append(current_user(cur))  # a new transaction: the hook runs again
            yield b"second\n"

        start_response("200 OK", HDRS)
        return body()

    calls: list[str] = []

    def on_begin(conn: Any, environ: dict[str, Any]) -> None:
        calls.append(environ["PATH_INFO"])
        set_user(conn, environ)

    mw = make_mw(app, on_begin=on_begin)
    response = call(mw, "/alice")
    assert response.code == 200
    assert seen == ["alice", "alice"]
    assert calls == ["/alice", "/alice"]
    assert mw.stats()["commits"] == 2


def test_not_run_for_a_request_that_never_queries(make_mw: Any) -> None:
    calls: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        get_connection(environ)
        start_response("200 OK", HDRS)
        return [b""]

    mw = make_mw(app, on_begin=lambda conn, environ: calls.append("ran"))
    assert call(mw, "/").code == 200
    assert calls == []
