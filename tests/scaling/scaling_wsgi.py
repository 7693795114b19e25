"""A minimal WSGI server for the scaling tests, and the applications they run.

:func:`call` plays the server: it calls the application, iterates the body
and closes it, exactly as PEP 3333 asks, and returns what a client would see
(or the exception the server would have logged). :func:`open_response` stops
before iterating, for the streaming cases.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl

import dbapi

from wsgi_pgconn import get_connection

sql = dbapi.module.sql

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclasses.dataclass
class Response:
    status: str | None = None
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    error: BaseException | None = None

    @property
    def code(self) -> int:
        """The status code; 500 when the application raised (what a server would answer)."""
        if self.error is not None or self.status is None:
            return 500
        return int(self.status.split()[0])

    @property
    def ok(self) -> bool:
        return self.error is None and self.code < 400

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def environ_for(path: str = "/", query: str = "", *, multithread: bool = True) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


class OpenResponse:
    """A response whose body has not been iterated yet."""

    def __init__(self, app: App, environ: dict[str, Any]) -> None:
        self.response = Response()
        self.body: Iterable[bytes] = app(environ, self._start_response)

    def _start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.response.status, self.response.headers = status, headers
        return self._write

    def _write(self, data: bytes) -> None:
        self.response.body += data

    def finish(self) -> Response:
        """Iterate the rest of the body, then close it (always)."""
        try:
            for chunk in self.body:
                self.response.body += chunk
        except Exception as exc:
            self.response.error = exc
        finally:
            close = getattr(self.body, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:
                    self.response.error = self.response.error or exc
        return self.response


def open_response(app: App, path: str = "/", query: str = "") -> OpenResponse:
    return OpenResponse(app, environ_for(path, query))


def call(app: App, path: str = "/", query: str = "") -> Response:
    """One request, served completely."""
    try:
        opened = OpenResponse(app, environ_for(path, query))
    except Exception as exc:
        return Response(error=exc)
    return opened.finish()


# -- applications ---------------------------------------------------------------------


def params(environ: dict[str, Any]) -> dict[str, str]:
    return dict(parse_qsl(environ.get("QUERY_STRING", "")))


def matrix_app(table: str) -> App:
    """Every way a request can end, chosen by the path; ``?k=`` names the row it writes.

    ``/ok`` 200, ``/notfound`` 404 (commits), ``/raise`` raises, ``/exc_info``
    passes exc_info to start_response (with a 400), ``/5xx`` answers 503,
    ``/deferred`` violates a deferred unique constraint (fails at COMMIT),
    ``/stream`` writes while its body is iterated, ``/stream_raise`` writes,
    then fails while streaming, ``/read`` reports what the transaction sees.
    """
    insert = sql.SQL("INSERT INTO {} (k) VALUES (%s)").format(sql.Identifier(table))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        conn = get_connection(environ)
        key = params(environ).get("k", "")
        path = environ["PATH_INFO"]
        text = [("Content-Type", "text/plain")]
        if path in ("/stream", "/stream_raise"):

            def body() -> Iterator[bytes]:
                yield b"first "
                with conn.cursor() as cur:
                    cur.execute(insert, (key,))
                yield b"written "
                if path == "/stream_raise":
                    raise RuntimeError("failed while streaming")
                yield b"done"

            start_response("200 OK", text)
            return body()
        if path == "/read":
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT current_setting('transaction_isolation'), "
                    "current_setting('statement_timeout'), pg_backend_pid(), txid_current()"
                )
                row = cur.fetchone()
            start_response("200 OK", text)
            return [" ".join(str(v) for v in row or ()).encode()]
        with conn.cursor() as cur:
            cur.execute(insert, (key,))
            if path == "/deferred":
                cur.execute(insert, (key,))  # checked at COMMIT only
        if path == "/ok":
            start_response("200 OK", text)
        elif path == "/notfound":
            start_response("404 Not Found", text)
        elif path == "/raise":
            raise RuntimeError("the application failed")
        elif path == "/exc_info":
            try:
                raise ValueError("handled by the application's error page")
            except ValueError:
                start_response("400 Bad Request", text, sys.exc_info())
        elif path == "/5xx":
            start_response("503 Service Unavailable", text)
        elif path == "/deferred":
            start_response("200 OK", text)
        else:
            start_response("404 Not Found", text)
        return [path.encode()]

    return app


def ledger_app(table: str) -> App:
    """Writes the row ``?k=`` with its transaction id and backend, then ends as ``?end=`` says.

    The body is ``txid pid`` read at the end of the request: a committed row
    whose stored txid differs would mean the request's statements ran in
    more than one server transaction.
    """
    insert = sql.SQL(
        "INSERT INTO {} (k, txid, pid) VALUES (%s, txid_current(), pg_backend_pid())"
    ).format(sql.Identifier(table))

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        conn = get_connection(environ)
        args = params(environ)
        key, end = args["k"], args["end"]
        with conn.cursor() as cur:
            cur.execute(insert, (key,))
            if end == "deferred":
                cur.execute(insert, (key,))
            cur.execute("SELECT pg_sleep(0.001)")  # hold the server connection a little
            cur.execute("SELECT txid_current(), pg_backend_pid()")
            txid, pid = cur.fetchone() or (0, 0)
        if end == "raise":
            raise RuntimeError("application error")
        status = {"ok": "200 OK", "404": "404 Not Found", "5xx": "500 Internal Server Error"}
        start_response(status.get(end, "200 OK"), [("Content-Type", "text/plain")])
        return [f"{txid} {pid}".encode()]

    return app


def write_app(table: str, *, catch: bool = False, barrier: threading.Barrier | None = None) -> App:
    """Inserts ``?k=`` and answers with the server's port.

    ``catch`` (or ``?catch=1``): like Flask or Django, turn a database error
    into a 500 page instead of letting it reach the middleware. ``barrier``: with ``?wait=1``,
    wait for the other requests first (so concurrent requests hold distinct
    connections).
    """
    insert = sql.SQL("INSERT INTO {} (k, port) VALUES (%s, current_setting('port')::int)").format(
        sql.Identifier(table)
    )

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        conn = get_connection(environ)
        args = params(environ)
        key = args["k"]
        if barrier is not None and "wait" in args:
            barrier.wait()
        try:
            with conn.cursor() as cur:
                cur.execute(insert, (key,))
                cur.execute("SELECT current_setting('port')")
                port = (cur.fetchone() or ("?",))[0]
        except dbapi.Error as exc:
            if not (catch or "catch" in args):
                raise
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"database error {dbapi.sqlstate(exc)}".encode()]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(port).encode()]

    return app
