"""Helpers of the SQLAlchemy and Flask tests (this module holds no tests).

* :func:`driver_name` is the driver of the run (``WSGI_PGCONN_DRIVER``);
  :func:`sa_url` turns a libpq connection string into a SQLAlchemy URL for
  that driver.
* :class:`WireCounter` is a TCP relay in front of PostgreSQL that counts the
  round trips its clients make: the client messages after which a client
  waits for the server (``Query`` of the simple protocol, ``Sync`` of the
  extended one, pipelines included), read from the byte stream itself.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import threading
from typing import Any

import psycopg2.extensions
import sqlalchemy

from wsgi_pgconn import drivers

__all__ = ["WireCounter", "driver_name", "sa_url"]

_STARTUP_CODES = {80877103, 80877104}  # SSLRequest, GSSENCRequest: answered with one byte


def driver_name() -> str:
    """The driver of this run: psycopg2 or psycopg."""
    return drivers.resolve(os.environ.get("WSGI_PGCONN_DRIVER") or "auto")


def sa_url(dsn: str, **params: str) -> sqlalchemy.engine.URL:
    """``dsn`` (libpq key=value) as a ``postgresql+<driver>`` URL; ``params`` added."""
    parsed = psycopg2.extensions.parse_dsn(dsn)
    query = {
        key: value
        for key, value in parsed.items()
        if key not in ("host", "port", "user", "password", "dbname")
    }
    query.update(params)
    return sqlalchemy.engine.URL.create(
        f"postgresql+{driver_name()}",
        username=parsed.get("user"),
        password=parsed.get("password"),
        host=parsed.get("host"),
        port=int(parsed["port"]) if "port" in parsed else None,
        database=parsed.get("dbname"),
        query=query,
    )


class _ClientStream:
    """Parses what one client sends: counts Query and Sync messages."""

    def __init__(self, counter: WireCounter) -> None:
        self.counter = counter
        self.buffer = b""
        self.started = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return
                (length, code) = struct.unpack("!ii", self.buffer[:8])
                if len(self.buffer) < length:
                    return
                self.buffer = self.buffer[length:]
                if code not in _STARTUP_CODES:
                    self.started = True  # the startup packet
                continue
            if len(self.buffer) < 5:
                return
            kind = self.buffer[:1]
            (length,) = struct.unpack("!i", self.buffer[1:5])
            if len(self.buffer) < 1 + length:
                return
            self.buffer = self.buffer[1 + length :]
            if kind in (b"Q", b"S"):
                self.counter._count()


class WireCounter:
    """A relay on 127.0.0.1 in front of ``(host, port)`` that counts client round trips.

    ``port`` is where clients connect; ``trips`` is the number of Query and
    Sync messages received from every client since :meth:`reset`. Each is a
    point where a client waits for the server's ReadyForQuery, so the count
    is exact whatever the timing: it comes from the bytes, not from when
    they arrive.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._trips = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="wire-counter", daemon=True)
        self._thread.start()

    @property
    def trips(self) -> int:
        with self._lock:
            return self._trips

    def reset(self) -> None:
        with self._lock:
            self._trips = 0

    def _count(self) -> None:
        with self._lock:
            self._trips += 1

    def _run(self) -> None:
        pairs: dict[socket.socket, tuple[socket.socket, _ClientStream | None]] = {}
        while not self._closing:
            for key, _ in self._selector.select():
                if key.data == "wake":
                    self._wake_r.recv(1)
                    continue
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    try:
                        client, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    server = socket.create_connection(self.target)
                    stream = _ClientStream(self)
                    pairs[client] = (server, stream)
                    pairs[server] = (client, None)
                    for s in (client, server):
                        s.setblocking(True)
                        self._selector.register(s, selectors.EVENT_READ, "relay")
                    continue
                if sock not in pairs:
                    continue
                peer, stream = pairs[sock]
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (sock, peer):
                        self._selector.unregister(s)
                        pairs.pop(s, None)
                        s.close()
                    continue
                if stream is not None:
                    stream.feed(data)
                peer.sendall(data)
        for sock in list(pairs):
            sock.close()

    def close(self) -> None:
        self._closing = True
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._selector.close()
        self.listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def dsn(self, dsn: str) -> str:
        """``dsn`` pointed at the relay (TCP, no TLS)."""
        params: dict[str, Any] = psycopg2.extensions.parse_dsn(dsn)
        params.update(host="127.0.0.1", port=str(self.port), sslmode="disable")
        result: str = psycopg2.extensions.make_dsn(**params)
        return result
