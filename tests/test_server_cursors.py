"""Server-side (named) cursors read by a streamed body (issue 11, item 4).

A view that opens a named cursor, reads a first batch and returns a body that
reads the rest must get every row: the request's COMMIT (which would close
the cursor) waits until the server closes the response, as for work done
while streaming. The trade-off, checked here too: that COMMIT happens after
the status line was sent, so the work done before it is committed only when
the whole body was sent. A cursor closed (or dropped) before the status line
changes nothing: COMMIT before the status, as always. Both drivers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from test_core_helpers import get_connection, idle_in_transaction, query, stack
from werkzeug.test import Client

TEXT = [("Content-Type", "text/plain")]
ROWS = 10


def insert(environ: dict[str, Any], table: str, k: str) -> None:
    with get_connection(environ).cursor() as cur:
        cur.execute(f"INSERT INTO {table} (k) VALUES (%s)", (k,))


def rows(admin: Any, table: str) -> list[str]:
    return [k for (k,) in query(admin, f"SELECT k FROM {table} ORDER BY id")]


def cursor_app(table: str, *, close_first: bool = False, seen: list[Any] | None = None) -> Any:
    """Writes a row, opens a named cursor, reads its first row, streams the rest.

    ``close_first``: read everything and close the cursor before answering.
    ``seen``: receives the rows of ``table`` visible to another connection at
    the moment the status line is handed over (filled by the test's spy).
    """

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        insert(environ, table, "view")
        conn = get_connection(environ)
        cur = conn.cursor("stream_rows")
        cur.itersize = 2  # a FETCH of two rows at a time
        cur.execute("SELECT g FROM generate_series(1, %s) AS g", (ROWS,))
        first = next(iter(cur))[0]
        if close_first:
            rest = [g for (g,) in cur]
            cur.close()
            start_response("200 OK", TEXT)
            return [f"{g}\n".encode() for g in [first, *rest]]
        start_response("200 OK", TEXT)

        def body() -> Iterator[bytes]:
            try:
                yield f"{first}\n".encode()
                for (g,) in cur:
                    yield f"{g}\n".encode()
            finally:
                cur.close()

        return body()

    return app


def spy(wsgi: Any, on_status: Any) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        def seen(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            on_status(status)
            return start_response(status, headers, exc_info)

        return wsgi(environ, seen)

    return app


def test_named_cursor_read_in_a_streamed_body_gets_every_row(
    admin: Any, table: str, make_mw: Any
) -> None:
    at_status: list[list[str]] = []
    outer, mw = stack(make_mw, cursor_app(table))
    client = Client(spy(outer, lambda status: at_status.append(rows(admin, table))))
    res = client.get("/", buffered=True)
    assert res.status_code == 200
    assert res.get_data() == b"".join(f"{g}\n".encode() for g in range(1, ROWS + 1))
    # The COMMIT waited for the body: not yet visible at the status line, then committed.
    assert at_status == [[]]
    assert rows(admin, table) == ["view"]
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"], stats["in_use"]) == (1, 0, 0)
    assert idle_in_transaction(admin) == []


def test_closed_named_cursor_keeps_the_commit_before_the_status(
    admin: Any, table: str, make_mw: Any
) -> None:
    at_status: list[list[str]] = []
    outer, mw = stack(make_mw, cursor_app(table, close_first=True))
    client = Client(spy(outer, lambda status: at_status.append(rows(admin, table))))
    res = client.get("/", buffered=True)
    assert res.get_data().splitlines()[-1] == str(ROWS).encode()
    assert at_status == [["view"]]  # committed before the status line, as without cursors
    assert mw.stats()["commits"] == 1


def test_client_gone_while_streaming_a_cursor_rolls_the_request_back(
    admin: Any, table: str, make_mw: Any
) -> None:
    """The trade-off: with the COMMIT after the body, a body not sent whole rolls back all."""
    outer, mw = stack(make_mw, cursor_app(table))
    res = Client(outer).get("/", buffered=False)
    try:
        chunks = iter(res.response)
        assert next(chunks) == b"1\n"
        assert next(chunks) == b"2\n"
    finally:
        res.close()
    assert rows(admin, table) == []
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"], stats["in_use"]) == (0, 1, 0)
    assert idle_in_transaction(admin) == []


@pytest.mark.parametrize("requests", [3])
def test_next_request_on_the_connection_is_not_deferred(
    admin: Any, table: str, make_mw: Any, requests: int
) -> None:
    """A cursor of an earlier request does not make later requests commit late."""
    at_status: list[list[str]] = []
    streaming = cursor_app(table)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/stream":
            return streaming(environ, start_response)
        insert(environ, table, "plain" + environ["QUERY_STRING"])
        start_response("200 OK", TEXT)
        return [b"ok"]

    outer, _ = stack(make_mw, app)
    client = Client(spy(outer, lambda status: at_status.append(rows(admin, table))))
    assert client.get("/stream", buffered=True).status_code == 200
    for i in range(requests):
        assert client.get(f"/?{i}", buffered=True).get_data() == b"ok"
    plain = at_status[1:]
    assert [len(seen) for seen in plain] == list(range(2, 2 + requests))  # COMMIT before each
