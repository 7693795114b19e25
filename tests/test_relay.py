"""The latency relay of the benchmark and of the round-trip tests (wsgi_pgconn.tooling.relay).

Against a tiny scripted TCP server (no PostgreSQL needed) and, for the
subprocess mode, the test server. Timing checks use lower bounds (the relay
must hold data at least that long); the bench reports the accuracy measured.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from wsgi_pgconn.tooling.relay import Relay, RelayProcess, parse_address, parse_duration

WAIT = 10.0


def startup_message() -> bytes:
    body = (3 << 16).to_bytes(4, "big") + b"user\x00u\x00\x00"
    return (len(body) + 4).to_bytes(4, "big") + body


def message(kind: bytes, payload: bytes) -> bytes:
    return kind + (len(payload) + 4).to_bytes(4, "big") + payload


QUERY = message(b"Q", b"SELECT 1\x00")
ANSWER = message(b"C", b"SELECT 1\x00") + message(b"Z", b"I")


class ScriptedServer:
    """Accepts one connection; answers every ``len(expect)`` bytes with ``answer``."""

    def __init__(self, expect: list[bytes], answers: list[bytes]) -> None:
        self.expect = expect
        self.answers = answers
        self.first_byte_at: float | None = None
        self.received = b""
        self.error: BaseException | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                for expected, answer in zip(self.expect, self.answers, strict=True):
                    got = b""
                    while len(got) < len(expected):
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        if self.first_byte_at is None:
                            self.first_byte_at = time.monotonic()
                        got += chunk
                    self.received += got
                    if answer:
                        conn.sendall(answer)
                conn.recv(1)  # until the client closes
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.listener.close()
        self.thread.join(WAIT)


@pytest.fixture
def scripted() -> Iterator[type[ScriptedServer]]:
    made: list[ScriptedServer] = []

    class Made(ScriptedServer):
        def __init__(self, expect: list[bytes], answers: list[bytes]) -> None:
            super().__init__(expect, answers)
            made.append(self)

    yield Made
    for server in made:
        server.close()


def exchange(sock: socket.socket, data: bytes, answer_size: int, *, piecewise: bool) -> bytes:
    if piecewise:
        for i in range(len(data)):  # one byte per write: frames cross chunks
            sock.sendall(data[i : i + 1])
    else:
        sock.sendall(data)
    got = b""
    while len(got) < answer_size:
        chunk = sock.recv(65536)
        assert chunk, "the relay closed the connection"
        got += chunk
    return got


# -- values -------------------------------------------------------------------------------


def test_parse_duration() -> None:
    assert parse_duration("1ms") == pytest.approx(0.001)
    assert parse_duration("0.5ms") == pytest.approx(0.0005)
    assert parse_duration("500us") == pytest.approx(0.0005)
    assert parse_duration("0.002s") == pytest.approx(0.002)
    assert parse_duration("0") == 0.0
    for bad in ("1", "fast", "-1ms", "1 hour"):
        with pytest.raises(ValueError, match=r"duration|unit"):
            parse_duration(bad)


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:5432") == ("127.0.0.1", 5432)
    assert parse_address("[::1]:6432") == ("::1", 6432)
    assert parse_address("/run/pg/.s.PGSQL.5432") == "/run/pg/.s.PGSQL.5432"
    with pytest.raises(ValueError, match="host:port"):
        parse_address("localhost")


# -- counting -----------------------------------------------------------------------------


@pytest.mark.parametrize("piecewise", [False, True], ids=["whole", "byte by byte"])
def test_turns_bytes_and_messages(scripted: Any, piecewise: bool) -> None:
    startup_answer = message(b"R", b"\x00\x00\x00\x00") + message(b"Z", b"I")
    server = scripted([startup_message(), QUERY, QUERY + QUERY], [startup_answer, ANSWER, ANSWER])
    with (
        Relay(("127.0.0.1", server.port)) as relay,
        socket.create_connection(("127.0.0.1", relay.port)) as sock,
    ):
        exchange(sock, startup_message(), len(startup_answer), piecewise=piecewise)
        before = relay.stats()
        assert before.turns == 1
        assert before.to_server.types == {"startup": 1}
        exchange(sock, QUERY, len(ANSWER), piecewise=piecewise)
        exchange(sock, QUERY + QUERY, len(ANSWER), piecewise=piecewise)  # two in one turn
        counted = relay.stats().since(before)
    assert counted.turns == 2
    assert counted.to_server.bytes == 3 * len(QUERY)
    assert counted.to_server.messages == 3
    assert counted.to_server.types == {"Q": 3}
    assert counted.to_client.types == {"C": 2, "Z": 2}
    assert counted.to_client.bytes == 2 * len(ANSWER)
    (conn,) = counted.connections
    assert conn.turns == 2
    assert server.received == startup_message() + 3 * QUERY  # passed on unchanged
    assert server.error is None


def test_ssl_request_answered_no_then_startup(scripted: Any) -> None:
    ssl_request = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")
    server = scripted([ssl_request, startup_message()], [b"N", message(b"Z", b"I")])
    with (
        Relay(("127.0.0.1", server.port)) as relay,
        socket.create_connection(("127.0.0.1", relay.port)) as sock,
    ):
        assert exchange(sock, ssl_request, 1, piecewise=False) == b"N"
        exchange(sock, startup_message(), 6, piecewise=False)
        counted = relay.stats()
    assert counted.turns == 2
    assert counted.to_server.types == {"ssl": 1, "startup": 1}
    assert counted.to_client.types == {"ssl-answer:N": 1, "Z": 1}


def test_closed_connections_stay_in_the_totals(scripted: Any) -> None:
    server = scripted([startup_message()], [ANSWER])
    with Relay(("127.0.0.1", server.port)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as sock:
            exchange(sock, startup_message(), len(ANSWER), piecewise=False)
        deadline = time.monotonic() + WAIT
        while relay.stats().closed < 1:  # the server side closes after the client
            assert time.monotonic() < deadline, "the relay never closed the connection"
            threading.Event().wait(0.01)  # polling interval, not synchronisation
        final = relay.stats()
    assert (final.accepted, final.closed, final.turns, final.connections) == (1, 1, 1, ())
    assert final.to_server.types == {"startup": 1}


# -- latency ------------------------------------------------------------------------------


def test_each_turn_is_held_for_the_rtt(scripted: Any) -> None:
    rtt = 0.05
    server = scripted([QUERY] * 3, [ANSWER] * 3)
    times = []
    with (
        Relay(("127.0.0.1", server.port), rtt=rtt, handshake=False) as relay,
        socket.create_connection(("127.0.0.1", relay.port)) as sock,
    ):
        for _ in range(3):
            start = time.monotonic()
            exchange(sock, QUERY, len(ANSWER), piecewise=False)
            times.append(time.monotonic() - start)
        counted = relay.stats()
    assert min(times) >= rtt
    assert counted.turns == 3
    assert sum(counted.late_us.values()) == 6  # three chunks each way, all delayed
    assert counted.cpu_seconds > 0


@pytest.mark.parametrize("handshake", [True, False])
def test_first_data_waits_for_the_handshake(scripted: Any, handshake: bool) -> None:
    """A real client could send only after a SYN/SYN-ACK round trip: one rtt more."""
    rtt = 0.2
    server = scripted([QUERY], [ANSWER])
    with Relay(("127.0.0.1", server.port), rtt=rtt, handshake=handshake) as relay:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port)) as sock:
            exchange(sock, QUERY, len(ANSWER), piecewise=False)
    assert server.first_byte_at is not None
    arrived = server.first_byte_at - start
    if handshake:
        assert arrived >= 1.5 * rtt
    else:
        assert rtt / 2 <= arrived < 1.5 * rtt


# -- as a subprocess, in front of PostgreSQL ----------------------------------------------------


def test_subprocess_relays_postgresql_and_reports(pg: Any, test_db: str, tmp_path: Path) -> None:
    params = psycopg2.extensions.parse_dsn(pg.dsn(dbname=test_db))
    host, port = params.get("host") or "127.0.0.1", int(params.get("port") or 5432)
    if host.startswith("/"):
        pytest.skip("the test server is reached over a unix socket")
    stats_file = tmp_path / "relay.json"
    relay = RelayProcess((host, port), rtt=0.002, stats_file=str(stats_file))
    with relay:
        conn = psycopg2.connect(pg.dsn(dbname=test_db, host="127.0.0.1", port=relay.port))
        try:
            conn.autocommit = True
            before = relay.stats()
            with conn.cursor() as cur:
                for _ in range(5):
                    cur.execute("SELECT 1")
            counted = relay.stats().since(before)
        finally:
            conn.close()
        final = relay.close()
    assert counted.turns == 5
    assert counted.to_server.types == {"Q": 5}
    assert relay._proc.returncode == 0
    assert final.accepted == 1
    assert final.cpu_seconds > 0
    saved = json.loads(stats_file.read_text())
    assert saved["turns"] == final.turns >= 5 + 4  # the startup's turns too
    assert "relay (rtt 2 ms)" in final.summary()


def test_listens_on_a_socket_the_caller_bound(scripted: Any) -> None:
    server = scripted([startup_message()], [ANSWER])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with (
        Relay(("127.0.0.1", server.port), listener=listener) as relay,
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        assert relay.port == port
        assert exchange(sock, startup_message(), len(ANSWER), piecewise=False) == ANSWER
