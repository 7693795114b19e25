"""Helpers of the real-server tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import pytest

TABLE = "example_item"


class Probe:
    """Looks at pg_stat_activity and the table from a connection of its own."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, args or None)
            return cur.fetchall()

    def backends(self, app_name: str) -> list[tuple[int, str, str | None]]:
        """(pid, state, wait_event_type) of the client backends tagged ``app_name``."""
        return [
            (pid, state, wait)
            for pid, state, wait in self.rows(
                "SELECT pid, state, wait_event_type FROM pg_stat_activity"
                " WHERE application_name = %s AND backend_type = 'client backend'"
                " AND datname = current_database() ORDER BY pid",
                app_name,
            )
        ]

    def count(self, app_name: str) -> int:
        return len(self.backends(app_name))

    def none_of(self, app_name: str) -> Callable[[], bool]:
        """A condition for :meth:`wait_for`: no backend tagged ``app_name`` is left."""
        return lambda: self.count(app_name) == 0

    def waiting_on_lock(self, app_name: str) -> int:
        return sum(1 for _, _, wait in self.backends(app_name) if wait == "Lock")

    def names(self, prefix: str) -> list[str]:
        return [
            n for (n,) in self.rows(f"SELECT name FROM {TABLE} WHERE starts_with(name, %s)", prefix)
        ]

    def wait_for(self, what: str, condition: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Poll ``condition`` until it is truthy; fail naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        self.conn.close()


@contextlib.contextmanager
def table_locked(pg: Any, servers_db: str) -> Iterator[None]:
    """Hold ACCESS EXCLUSIVE on the example table: every page request blocks in PostgreSQL."""
    conn = psycopg2.connect(pg.dsn(tcp=False, dbname=servers_db, application_name="servers-locker"))
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {TABLE} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        conn.rollback()
        conn.close()


class PendingRequests:
    """Raw HTTP requests sent now and read later, without threads.

    Each request says ``Connection: close``, so a response is complete at EOF.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.selector = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytearray] = {}
        self.done: list[bytes] = []

    def send(self, path: str = "/") -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode())
        sock.setblocking(False)
        self.buffers[sock] = bytearray()
        self.selector.register(sock, selectors.EVENT_READ)

    @property
    def pending(self) -> int:
        return len(self.buffers)

    def poll(self, timeout: float = 0.0) -> None:
        for key, _ in self.selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            if data:
                self.buffers[sock] += data
            else:
                self.selector.unregister(sock)
                self.done.append(bytes(self.buffers.pop(sock)))
                sock.close()

    def finish(self, timeout: float = 30.0) -> list[int]:
        """Read every response to the end; returns their status codes."""
        deadline = time.monotonic() + timeout
        while self.buffers and time.monotonic() < deadline:
            self.poll(0.1)
        if self.buffers:
            pytest.fail(f"{len(self.buffers)} responses did not arrive within {timeout:.0f} s")
        return self.statuses()

    def statuses(self) -> list[int]:
        return [int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0 for raw in self.done]

    def close(self) -> None:
        for sock in list(self.buffers):
            self.selector.unregister(sock)
            sock.close()
        self.buffers.clear()
        self.selector.close()


def server_env(dsn: str, **extra: str) -> dict[str, str]:
    """A process environment for a server: ours minus any wsgi_pgconn settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not k.startswith(("WSGI_PGCONN_", "PYTEST_"))
    }
    env["DATABASE_URL"] = dsn
    env.update(extra)
    return env
