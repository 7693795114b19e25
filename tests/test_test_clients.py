"""A test client that leaves a streamed response open: the error says why and how to fix it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client

from wsgi_pgconn import get_connection


def streaming_app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    conn = get_connection(environ)
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body() -> Iterator[bytes]:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        yield b"one\n"

    return body()


def test_an_unclosed_streamed_response_names_the_fix(make_mw: Any) -> None:
    client = Client(make_mw(streaming_app))
    kept = client.get("/")  # werkzeug leaves a streamed response open unless asked
    assert kept.status_code == 200
    with pytest.raises(RuntimeError) as caught:
        client.get("/")
    message = str(caught.value)
    assert "response was never closed" in message
    assert "buffered=True" in message
    assert "with client.get(url) as response:" in message
    kept.close()


def test_buffered_or_closed_responses_release_the_connection(make_mw: Any) -> None:
    mw = make_mw(streaming_app)
    client = Client(mw)
    assert client.get("/", buffered=True).get_data() == b"one\n"
    with client.get("/") as response:
        assert response.status_code == 200
    assert client.get("/", buffered=True).status_code == 200
    assert mw.stats()["in_use"] == 0
