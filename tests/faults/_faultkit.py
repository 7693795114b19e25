"""Harness of the fault tests (and of scripts/soak.py): server, client, ledger, load.

* :class:`PoolServer`: wsgiref's HTTP handling on a **fixed pool of worker
  threads** (a thread lives as long as the server, so thread-scope connections
  are reused across requests, as under mod_wsgi or gunicorn gthread). Bound to
  127.0.0.1 on a free port of ``WSGI_PGCONN_PORT_RANGE`` (20000-29999 unless
  set). Application errors are logged through :mod:`logging` (logger
  ``faults.server``), not printed.
* :func:`http` / :func:`stream_then_reset`: one request per TCP connection.
* :class:`Ledger`: what every request was answered, checked against the rows
  in the database: a 2xx must have its row exactly once, anything else
  (4xx, 5xx, cut off) none, except a 500 that says its COMMIT is in doubt
  (the connection died between COMMIT and its answer): 0 or 1 row, counted.
* :class:`Load`: client threads bounded in request count and time.
* :class:`Side`: what the application saw, per request key (the backend pid it
  used, when it entered, how many attempts), written by the in-process app.

Nothing here sleeps to synchronise: waits are on conditions, with deadlines.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import random
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Iterator
from http import client as httpclient
from typing import Any

import psycopg2
import psycopg2.extensions
from proxy import bind_free_port

from wsgi_pgconn import get_connection

log = logging.getLogger("faults.server")

#: Every raw response received by :func:`http` in this test (scanned for secrets).
RESPONSES: list[bytes] = []
RECORD_RESPONSES = True
#: Secrets that must never appear in logs, responses, reprs or stats.
SECRETS: set[str] = set()
#: Middlewares built in this test (their repr, settings and stats are scanned).
MIDDLEWARES: list[Any] = []
#: Lines for the terminal summary (ledger totals, tables).
SUMMARY: list[str] = []
#: Servers started and not yet closed (a failing test's are closed by the fixture).
SERVERS: list[PoolServer] = []


def deadline_wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; AssertionError naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    event = threading.Event()
    delay = 0.002
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        event.wait(delay)  # polling interval, not synchronisation
        delay = min(delay * 2, 0.05)


# -- the server -------------------------------------------------------------------


class _ServerHandler(wsgiref.simple_server.ServerHandler):
    def log_exception(self, exc_info: Any) -> None:
        log.error("application error", exc_info=exc_info)


class _RequestHandler(wsgiref.simple_server.WSGIRequestHandler):
    def handle(self) -> None:
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _ServerHandler(
            self.rfile, self.wfile, self.get_stderr(), self.get_environ(), multithread=True
        )
        handler.request_handler = self  # type: ignore[attr-defined]
        handler.run(self.server.get_app())  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log


class PoolServer(wsgiref.simple_server.WSGIServer):
    """A WSGI server with ``workers`` long-lived worker threads (see the module docstring)."""

    request_queue_size = 256
    daemon_threads = True

    def __init__(self, app: Callable[..., Iterable[bytes]], workers: int = 4) -> None:
        socketserver.TCPServer.__init__(
            self, ("127.0.0.1", 0), _RequestHandler, bind_and_activate=False
        )
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.port = bind_free_port(self.socket)
            self.server_address = self.socket.getsockname()
            self.server_name, self.server_port = "127.0.0.1", self.port
            self.setup_environ()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise
        self.set_app(app)
        self._jobs: queue.Queue[tuple[Any, Any] | None] = queue.Queue()
        self.workers = [
            threading.Thread(target=self._work, name=f"faults-wsgi-{self.port}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self.workers:
            thread.start()
        self._acceptor = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"faults-accept-{self.port}",
        )
        self._acceptor.start()
        self._closed = False
        SERVERS.append(self)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._jobs.put((request, client_address))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                log.exception("request from %s failed in the server", client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("server error for %s", client_address)

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish queued requests, join every thread (AssertionError if stuck)."""
        if self._closed:
            return
        self._closed = True
        if self in SERVERS:
            SERVERS.remove(self)
        self.shutdown()
        self._acceptor.join(timeout)
        for _ in self.workers:
            self._jobs.put(None)
        end = time.monotonic() + timeout
        stuck = []
        for thread in self.workers:
            thread.join(max(0.0, end - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        self.server_close()
        if stuck:
            raise AssertionError(f"server worker threads still busy after {timeout}s: {stuck}")

    def __enter__(self) -> PoolServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the client ---------------------------------------------------------------------


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float


def http(
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One request on a fresh connection; raises OSError/HTTPException when cut off."""
    start = time.monotonic()
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        try:
            data = resp.read()
        finally:
            resp.close()
    finally:
        conn.close()
    result = Response(resp.status, dict(resp.getheaders()), data, time.monotonic() - start)
    if RECORD_RESPONSES:
        head = "".join(f"{k}: {v}\n" for k, v in result.headers.items())
        RESPONSES.append(f"{resp.status} {resp.reason}\n{head}\n".encode() + data)
    return result


def stream_then_reset(
    port: int,
    path: str,
    *,
    before_reset: Callable[[], object] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """GET ``path``; on a 200, read the first body bytes, then vanish (RST).

    ``before_reset`` runs between reading and resetting (to wait until the
    application has done its work). Returns the status and what was read; a
    non-200 answer is read to its end instead (no reset).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or data.endswith(b"\r\n\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        if status != 200:
            while chunk := sock.recv(65536):
                data += chunk
        if RECORD_RESPONSES:
            RESPONSES.append(data)
        if status == 200:
            if before_reset is not None:
                before_reset()
            # Linger 0: close() sends RST, so the server's next write fails at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return status, data


# -- what the application saw -------------------------------------------------


class Side:
    """Per request key: backend pid used, entry time, attempts; plus named events."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: dict[str, int] = {}
        self.entered: dict[str, float] = {}
        self.attempts: collections.Counter[str] = collections.Counter()
        self.inserted: set[str] = set()
        self.closed: set[str] = set()
        self.events: dict[str, threading.Event] = collections.defaultdict(threading.Event)

    def enter(self, key: str) -> None:
        with self.lock:
            self.entered.setdefault(key, time.monotonic())

    def saw(self, key: str, conn: psycopg2.extensions.connection) -> None:
        with self.lock:
            self.pids[key] = conn.info.backend_pid
            self.attempts[key] += 1

    def event(self, name: str) -> threading.Event:
        with self.lock:
            return self.events[name]


def query_key(environ: dict[str, Any]) -> str:
    values = urllib.parse.parse_qs(environ.get("QUERY_STRING", "")).get("k")
    return values[0] if values else ""


def entry_recorder(
    app: Callable[..., Iterable[bytes]], side: Side
) -> Callable[..., Iterable[bytes]]:
    """Outermost wrapper: records when a request entered (before any checkout)."""

    def wrapper(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        key = query_key(environ)
        if key:
            side.enter(key)
        return app(environ, start_response)

    return wrapper


def ledger_app(table: str, side: Side, *, hold: float = 0.0) -> Callable[..., Iterable[bytes]]:
    """``/write?k=KEY`` inserts one row; ``/stream?k=KEY`` inserts while streaming; ``/ping``.

    ``/stream`` sends a first chunk, then inserts its row in the streaming
    transaction (committed only if the body is exhausted), then keeps sending
    64 KiB chunks for at most 10 s: a client that resets the connection makes a
    write fail. ``hold`` adds ``pg_sleep`` after a write (slow requests).
    """
    insert = f"INSERT INTO {table} (k) VALUES (%s)"

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        conn = get_connection(environ)
        key = query_key(environ)
        if path == "/ping":
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
            return [b"ok\n"]
        if path == "/write":
            side.saw(key, conn)
            with conn.cursor() as cur:
                cur.execute(insert, (key,))
                if hold:
                    cur.execute("SELECT pg_sleep(%s)", (hold,))
            body = f"wrote {key}\n".encode()
            start_response(
                "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]
        if path == "/stream":
            side.saw(key, conn)
            start_response("200 OK", [("Content-Type", "application/octet-stream")])
            return _stream(conn, key, insert, side)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


def _stream(conn: Any, key: str, insert: str, side: Side) -> Iterator[bytes]:
    try:
        yield b"first\n"
        with conn.cursor() as cur:
            cur.execute(insert, (key,))
        with side.lock:
            side.inserted.add(key)
        side.event("inserted:" + key).set()
        end = time.monotonic() + 10
        chunk = b"x" * 65536
        while time.monotonic() < end:
            yield chunk
    finally:
        with side.lock:
            side.closed.add(key)
        side.event("closed:" + key).set()


# -- the ledger -------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    key: str
    status: int | None  # None: cut off (no complete response)
    started: float
    finished: float
    detail: str = ""
    kind: str = "write"  # write | stream-reset


#: What the middleware's 500 says when the connection died during COMMIT (outcome unknown).
IN_DOUBT = "whether the work was saved is unknown"


class Ledger:
    """Every request's answer; :meth:`check` compares them with the committed rows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: dict[str, Outcome] = {}
        self._cond = threading.Condition()

    def record(self, outcome: Outcome) -> None:
        with self._cond:
            if outcome.key in self.outcomes:
                raise AssertionError(f"key {outcome.key!r} used twice")
            self.outcomes[outcome.key] = outcome
            self._cond.notify_all()

    def count(self, predicate: Callable[[Outcome], bool] = lambda o: True) -> int:
        with self._cond:
            return sum(1 for o in self.outcomes.values() if predicate(o))

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: timed out after {timeout:g}s waiting for {what} "
                        f"({len(self.outcomes)} requests answered)"
                    )
                self._cond.wait(remaining)

    def snapshot(self) -> list[Outcome]:
        with self._cond:
            return list(self.outcomes.values())

    def check(self, rows: collections.Counter[str]) -> dict[str, Any]:
        """Totals, and the keys that break the rules; prints one summary line."""
        outcomes = self.snapshot()
        statuses = collections.Counter(o.status for o in outcomes)
        ok = [o for o in outcomes if o.status is not None and 200 <= o.status < 300]
        not_ok = [o for o in outcomes if o.status is None or not 200 <= o.status < 300]
        lost = [o.key for o in ok if rows.get(o.key, 0) == 0]
        duplicated = [key for key, n in rows.items() if n > 1]
        in_doubt = [o.key for o in not_ok if o.status == 500 and IN_DOUBT in o.detail]
        doubtful = set(in_doubt)
        phantom = [o.key for o in not_ok if rows.get(o.key, 0) > 0 and o.key not in doubtful]
        unknown = sorted(set(rows) - set(self.outcomes))
        report = {
            "requests": len(outcomes),
            "ok": len(ok),
            "errors": sum(n for s, n in statuses.items() if s is not None and s >= 500),
            "status": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
            "cut": statuses.get(None, 0),
            "lost": len(lost),
            "duplicated": len(duplicated),
            "phantom": len(phantom),
            "in_doubt": len(in_doubt),
            "in_doubt_committed": sum(1 for key in in_doubt if rows.get(key, 0) > 0),
            "unknown_rows": len(unknown),
        }
        line = (
            f"ledger[{self.name}]: requests={report['requests']} ok={report['ok']} "
            f"errors={report['errors']} cut={report['cut']} lost={report['lost']} "
            f"duplicated={report['duplicated']} phantom={report['phantom']} "
            f"in_doubt={report['in_doubt']} (committed {report['in_doubt_committed']}) "
            f"unknown_rows={report['unknown_rows']} statuses={report['status']}"
        )
        print(line)
        SUMMARY.append(line)
        report["lost_keys"] = lost[:10]
        report["duplicated_keys"] = duplicated[:10]
        report["phantom_keys"] = phantom[:10]
        report["in_doubt_committed_keys"] = [k for k in in_doubt if rows.get(k, 0) > 0][:10]
        return report

    def assert_holds(self, rows: collections.Counter[str]) -> dict[str, Any]:
        report = self.check(rows)
        assert report["lost"] == 0, f"2xx answers without their row: {report['lost_keys']}"
        assert report["duplicated"] == 0, f"rows written twice: {report['duplicated_keys']}"
        assert report["phantom"] == 0, (
            f"failed answers whose row committed: {report['phantom_keys']}"
        )
        assert report["unknown_rows"] == 0, "rows nobody asked for"
        return report


# -- load ---------------------------------------------------------------------------


RequestMaker = Callable[[int], tuple[str, str, str, bytes | None]]  # i -> key, method, path, body
Performer = Callable[[int], Outcome]


class Load:
    """``clients`` threads issuing requests until ``max_requests`` or ``time_limit``.

    Each request is ``make_request(i) -> (key, method, path, body)`` sent with
    :func:`http`, or ``perform(i) -> Outcome`` for anything else (a client
    that resets mid-stream). Every outcome goes into the ledger.
    """

    def __init__(
        self,
        port: int,
        ledger: Ledger,
        make_request: RequestMaker | None = None,
        *,
        perform: Performer | None = None,
        clients: int,
        max_requests: int,
        time_limit: float,
        timeout: float = 30.0,
    ) -> None:
        self.port = port
        self.ledger = ledger
        self.make_request = make_request
        self.perform = perform or self._http
        self.max_requests = max_requests
        self.timeout = timeout
        self.stop_event = threading.Event()
        self._tickets = iter(range(max_requests))
        self._ticket_lock = threading.Lock()
        self._end = time.monotonic() + time_limit
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._client, name=f"faults-client-{i}", daemon=True)
            for i in range(clients)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.join()

    def _ticket(self) -> int | None:
        if self.stop_event.is_set() or time.monotonic() > self._end:
            return None
        with self._ticket_lock:
            return next(self._tickets, None)

    def _http(self, i: int) -> Outcome:
        assert self.make_request is not None
        key, method, path, body = self.make_request(i)
        start = time.monotonic()
        try:
            resp = http(self.port, path, method=method, body=body, timeout=self.timeout)
        except (OSError, httpclient.HTTPException) as exc:
            return Outcome(key, None, start, time.monotonic(), repr(exc))
        return Outcome(key, resp.status, start, time.monotonic(), resp.body[:200].decode())

    def _client(self) -> None:
        try:
            while (i := self._ticket()) is not None:
                self.ledger.record(self.perform(i))
        except BaseException as exc:  # a harness bug: surface it in join()
            self.errors.append(exc)
            self.stop_event.set()

    def join(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise AssertionError(f"client threads still running after {timeout}s: {alive}")
        if self.errors:
            raise self.errors[0]

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)


# -- looking at the server ----------------------------------------------------------


class Admin:
    """An autocommit superuser connection that reconnects once if the server restarted."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: Any = None

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg2.connect(self.dsn, connect_timeout=5)
                    self._conn.autocommit = True
                with self._conn.cursor() as cur:
                    cur.execute(sql, args or None)
                    return cur.fetchall() if cur.description else []
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def keys(self, table: str) -> collections.Counter[str]:
        return collections.Counter(k for (k,) in self.rows(f"SELECT k FROM {table}"))

    def backends(self, app_name: str) -> list[tuple[int, str]]:
        return [
            (pid, state)
            for pid, state in self.rows(
                "SELECT pid, state FROM pg_stat_activity WHERE application_name = %s "
                "AND pid <> pg_backend_pid() ORDER BY pid",
                app_name,
            )
        ]

    def idle_in_transaction(self) -> list[tuple[Any, ...]]:
        return self.rows(
            "SELECT pid, application_name, query FROM pg_stat_activity "
            "WHERE state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
        )

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def committing(admin: Admin, app_name: str) -> list[int]:
    """Backends tagged ``app_name`` that wait for a lock while running COMMIT."""
    return [
        pid
        for (pid,) in admin.rows(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
            "AND wait_event_type = 'Lock' AND query = 'COMMIT'",
            app_name,
        )
    ]


def still_serves(port: int, n: int = 8, path: str = "/ping") -> None:
    """``n`` sequential requests after the fault: all must be answered 200."""
    for i in range(n):
        resp = http(port, path, timeout=15)
        assert resp.status == 200, f"request {i} after the fault: {resp.status} {resp.body!r}"


def wind_down(admin: Admin, app_name: str, server: PoolServer | None, mw: Any) -> None:
    """Close the server (joining its threads) and the middleware; then nothing may remain.

    Checks: no connection idle in transaction, and no backend left with the
    test's application_name (polled: a backend exits shortly after its client
    closes).
    """
    deadline_wait(
        lambda: not [r for r in admin.idle_in_transaction() if r[1] == app_name],
        10,
        "no connection idle in transaction",
    )
    if server is not None:
        server.close()
    if mw is not None:
        mw.close()
    deadline_wait(lambda: not admin.backends(app_name), 10, f"no backend left for {app_name}")
    assert not admin.idle_in_transaction(), admin.idle_in_transaction()


def unused_port() -> int:
    """A port of the port range that nothing listens on (connecting to it is refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        return bind_free_port(sock)
    finally:
        sock.close()


def random_key(prefix: str) -> Callable[[int], str]:
    tag = f"{prefix}-{random.randrange(16**6):06x}"
    return lambda i: f"{tag}-{i}"
