"""A TCP relay that adds network latency and counts round trips.

Between a PostgreSQL client and its server, on one machine::

    client  --->  relay (127.0.0.1:PORT)  --->  PostgreSQL (127.0.0.1:5432)

The relay holds every chunk of data it reads for half the round-trip time
(``rtt``) before passing it on, in each direction, so that a request and its
answer cost one ``rtt`` more than on loopback: what ``tc qdisc ... netem
delay`` would do on a kernel that has netem. It also counts, per connection:

* **turns**: a client->server burst followed by a server->client burst, the
  round trips that wait for the network. A page of BEGIN + 3 queries + COMMIT
  sent one statement at a time makes 5; with BEGIN riding on the first query, 4.
* bytes, chunks (``recv()`` results) and PostgreSQL protocol messages in each
  direction, messages by type letter (``Q`` simple query, ``P``/``B``/``E``/``S``
  extended protocol, ``C`` CommandComplete, ``Z`` ReadyForQuery, ...;
  ``startup``, ``ssl``, ``gssenc`` and ``cancel`` for the untyped messages a
  client opens with). An encrypted (TLS/GSS) connection is counted in bytes
  and chunks only.

A new connection's first client data is also held one extra ``rtt``: the TCP
handshake a real network would cost before the client could send it
(``handshake=False`` / ``--no-handshake-delay`` turns that off). Turns never
include it.

The delay counts from the moment the kernel received the data (the socket's
receive time stamp, ``SO_TIMESTAMPNS``), so the relay's own wake-up latency
is not added to it; the relay asks to be woken earlier than data is due by
the lateness its wake-ups usually have (learnt as it runs), and passes on
together whatever falls due before its next possible wake-up. One thread runs
everything (epoll, a timer heap; ``select()`` on the epoll descriptor for
sub-millisecond waits; the thread's timer slack lowered to 1 µs on Linux).
Every snapshot says how much CPU the relay has used and how far from due
(late or early) it passed data on, so that a caller can print both beside
its results: on a virtual machine each wake-up of a process costs tens of
microseconds of CPU, and a turn with latency costs four of them (data and
timer, each way). Late outliers mean the machine kept the relay waiting for
a CPU (or, in process, for the interpreter lock). ``benchmarks/relay_check.py``
measures ``SELECT 1`` direct and through the relay at several round-trip
times: the rtt 0 row shows what the extra hop itself costs.

In process (tests, counting)::

    with Relay(("127.0.0.1", 5432), rtt=0.001) as relay:
        dsn = f"host=127.0.0.1 port={relay.port} ..."
        before = relay.stats()
        ...                                  # traffic through the relay
        print(relay.stats().since(before).turns)

The relay's thread shares the interpreter lock with the caller's threads:
for timing, run it as its own process (:class:`RelayProcess`, same methods)::

    python -m wsgi_pgconn.tooling.relay --listen 127.0.0.1:0 \\
        --target 127.0.0.1:5432 --rtt 1ms --stats-file stats.json

It prints one JSON line when it listens (``{"event": "listening", "port": ...}``),
answers ``stats`` on its standard input with a JSON line of statistics, and
ends at ``stop``, at the end of its standard input, or at SIGTERM/SIGINT,
writing its final statistics to ``--stats-file`` (SIGUSR1 writes them too,
without stopping).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "ConnectionStats",
    "DirectionStats",
    "Relay",
    "RelayProcess",
    "RelayStats",
    "main",
    "parse_address",
    "parse_duration",
]

_C2S = 0  # client -> server
_S2C = 1  # server -> client
_CHUNK = 65536
_MAX_PENDING = 4 << 20  # bytes held per direction before the relay stops reading its source
_FD_SETSIZE = 1024  # select() limit
_LATE_BUCKET_US = 10  # lateness histogram: 10 µs buckets
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux
_TIMESPEC = struct.Struct("@qq")
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_UNTYPED = {_SSL_REQUEST: "ssl", _GSSENC_REQUEST: "gssenc", _CANCEL_REQUEST: "cancel"}
_PR_SET_TIMERSLACK = 29
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_EPOLL_ERR = select.EPOLLERR | select.EPOLLHUP


# -- parsing the command line's values --------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|ms|us|µs)?\s*$")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


def parse_duration(text: str) -> float:
    """Seconds in ``"1ms"``, ``"0.5ms"``, ``"500us"``, ``"0.001s"`` or ``"0"``.

    >>> parse_duration("0.5ms")
    0.0005
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (examples: 1ms, 0.5ms, 500us, 0)")
    number, unit = float(match.group(1)), match.group(2)
    if unit is None:
        if number != 0:
            raise ValueError(f"{text!r} needs a unit: s, ms or us")
        return 0.0
    return number * _UNITS[unit]


def parse_address(text: str) -> tuple[str, int] | str:
    """``"host:port"`` (``"[::1]:port"``) as a tuple; a path (``/...``) for a unix socket."""
    if text.startswith("/"):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not host:port: {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _format_address(address: tuple[str, int] | str) -> str:
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


# -- statistics -------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectionStats:
    """What went one way on one connection (or on all of them)."""

    bytes: int = 0
    chunks: int = 0
    messages: int = 0
    types: dict[str, int] = field(default_factory=dict)

    def since(self, earlier: DirectionStats) -> DirectionStats:
        types = {
            key: value - earlier.types.get(key, 0)
            for key, value in self.types.items()
            if value != earlier.types.get(key, 0)
        }
        return DirectionStats(
            self.bytes - earlier.bytes,
            self.chunks - earlier.chunks,
            self.messages - earlier.messages,
            types,
        )

    def plus(self, other: DirectionStats) -> DirectionStats:
        types = dict(self.types)
        for key, value in other.types.items():
            types[key] = types.get(key, 0) + value
        return DirectionStats(
            self.bytes + other.bytes,
            self.chunks + other.chunks,
            self.messages + other.messages,
            types,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "chunks": self.chunks,
            "messages": self.messages,
            "types": dict(self.types),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DirectionStats:
        return cls(
            int(data["bytes"]),
            int(data["chunks"]),
            int(data["messages"]),
            {str(k): int(v) for k, v in data["types"].items()},
        )


@dataclass(frozen=True)
class ConnectionStats:
    """One relayed connection that is still open.

    ``client_port`` is the client's own port (its side of the connection to the
    relay); ``upstream_port`` the relay's port towards the server, which the
    server sees as ``inet_client_port()``.
    """

    id: int
    client_port: int
    upstream_port: int
    turns: int
    to_server: DirectionStats
    to_client: DirectionStats

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client_port": self.client_port,
            "upstream_port": self.upstream_port,
            "turns": self.turns,
            "to_server": self.to_server.as_dict(),
            "to_client": self.to_client.as_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConnectionStats:
        return cls(
            int(data["id"]),
            int(data["client_port"]),
            int(data["upstream_port"]),
            int(data["turns"]),
            DirectionStats.from_dict(data["to_server"]),
            DirectionStats.from_dict(data["to_client"]),
        )


@dataclass(frozen=True)
class RelayStats:
    """A snapshot of a relay's counters; ``later.since(earlier)`` is what happened between.

    ``turns``, ``to_server`` and ``to_client`` cover every connection since the
    relay started (closed ones too); ``connections`` lists the open ones.
    ``cpu_seconds`` is the CPU time the relay used (its thread in process, its
    process as a subprocess), ``wall_seconds`` the time it has been running;
    ``late_us`` a histogram of when data was passed on, relative to its due
    time (bucket start in µs -> chunks, 10 µs buckets, negative: early; empty
    without delay).
    """

    rtt: float
    accepted: int
    closed: int
    turns: int
    to_server: DirectionStats
    to_client: DirectionStats
    connections: tuple[ConnectionStats, ...]
    cpu_seconds: float
    wall_seconds: float
    late_us: dict[int, int] = field(default_factory=dict)

    @property
    def cpu_share(self) -> float:
        """CPU time over wall time: 0.05 is 5% of one core."""
        return self.cpu_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def cpu_us_per_turn(self) -> float:
        return self.cpu_seconds * 1e6 / self.turns if self.turns else float("nan")

    def turns_of(self, connection_id: int) -> int:
        """Turns of one open connection (0 if it is not open)."""
        for conn in self.connections:
            if conn.id == connection_id:
                return conn.turns
        return 0

    def late_percentile(self, fraction: float) -> float:
        """Sent minus due (µs, bucket upper bound) that ``fraction`` of the chunks stayed within."""
        total = sum(self.late_us.values())
        if total == 0:
            return 0.0
        seen = 0
        for bucket in sorted(self.late_us):
            seen += self.late_us[bucket]
            if seen >= fraction * total:
                return float(bucket + _LATE_BUCKET_US)
        return float(max(self.late_us) + _LATE_BUCKET_US)

    def summary(self) -> str:
        """One line for a report: CPU use, and when delayed data was passed on."""
        line = (
            f"relay (rtt {self.rtt * 1e3:g} ms): {self.turns} turns, "
            f"CPU {self.cpu_seconds:.3f} s in {self.wall_seconds:.1f} s "
            f"({self.cpu_share * 100:.1f}% of one core"
        )
        if self.turns:
            line += f", {self.cpu_us_per_turn:.1f} µs per turn"
        line += ")"
        if self.late_us:
            line += (
                f", sent minus due: p50 <= {self.late_percentile(0.5):g} µs, "
                f"p99 <= {self.late_percentile(0.99):g} µs"
            )
        return line

    def since(self, earlier: RelayStats) -> RelayStats:
        """The difference: what happened after ``earlier`` was taken (same relay)."""
        before = {conn.id: conn for conn in earlier.connections}
        connections = []
        for conn in self.connections:
            old = before.get(conn.id)
            if old is not None:
                conn = ConnectionStats(
                    conn.id,
                    conn.client_port,
                    conn.upstream_port,
                    conn.turns - old.turns,
                    conn.to_server.since(old.to_server),
                    conn.to_client.since(old.to_client),
                )
            connections.append(conn)
        late = {
            bucket: count - earlier.late_us.get(bucket, 0)
            for bucket, count in self.late_us.items()
            if count != earlier.late_us.get(bucket, 0)
        }
        return RelayStats(
            self.rtt,
            self.accepted - earlier.accepted,
            self.closed - earlier.closed,
            self.turns - earlier.turns,
            self.to_server.since(earlier.to_server),
            self.to_client.since(earlier.to_client),
            tuple(connections),
            self.cpu_seconds - earlier.cpu_seconds,
            self.wall_seconds - earlier.wall_seconds,
            late,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rtt": self.rtt,
            "accepted": self.accepted,
            "closed": self.closed,
            "turns": self.turns,
            "to_server": self.to_server.as_dict(),
            "to_client": self.to_client.as_dict(),
            "connections": [conn.as_dict() for conn in self.connections],
            "cpu_seconds": self.cpu_seconds,
            "wall_seconds": self.wall_seconds,
            "late_us": {str(k): v for k, v in self.late_us.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RelayStats:
        return cls(
            float(data["rtt"]),
            int(data["accepted"]),
            int(data["closed"]),
            int(data["turns"]),
            DirectionStats.from_dict(data["to_server"]),
            DirectionStats.from_dict(data["to_client"]),
            tuple(ConnectionStats.from_dict(c) for c in data["connections"]),
            float(data["cpu_seconds"]),
            float(data["wall_seconds"]),
            {int(k): int(v) for k, v in data.get("late_us", {}).items()},
        )


# -- the relay's connections ------------------------------------------------------------


class _Direction:
    """One direction of one relayed connection: its queue, counters and protocol parser."""

    __slots__ = (
        "armed",
        "bytes",
        "chunks",
        "done",
        "dst",
        "eof_in",
        "eof_out",
        "hdr",
        "index",
        "last_due",
        "link",
        "messages",
        "need",
        "other",
        "out",
        "paused",
        "pending",
        "queue",
        "reading",
        "single",
        "src",
        "types",
        "untyped",
    )

    def __init__(self, link: _Link, index: int, src: socket.socket, dst: socket.socket) -> None:
        self.link = link
        self.index = index
        self.src = src
        self.dst = dst
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.out = bytearray()
        self.pending = 0  # bytes queued or in ``out``
        self.last_due = 0.0
        self.paused = False  # not reading src: too much held for dst
        self.reading = True  # src is polled for reading (not paused, not ended)
        self.armed = False  # dst is polled for writing (``out`` did not fit)
        self.other: _Direction = self  # the opposite direction (set by _Link)
        self.eof_in = False  # src ended
        self.eof_out = False  # the end is to be passed on once ``out`` is sent
        self.done = False  # the end was passed on
        self.bytes = 0
        self.chunks = 0
        self.messages = 0
        self.types: dict[str, int] = {}
        # Parser: bytes of the current message still to skip; a partial header;
        # whether the next message is untyped (a client's first); whether the next
        # is a server's one-byte answer to an SSL/GSS request.
        self.need = 0
        self.hdr = b""
        self.untyped = index == _C2S
        self.single = False

    def stats(self) -> DirectionStats:
        return DirectionStats(self.bytes, self.chunks, self.messages, dict(self.types))


class _Link:
    """One relayed connection."""

    __slots__ = (
        "accepted_at",
        "c2s",
        "client",
        "client_port",
        "closed",
        "id",
        "last",
        "opaque",
        "s2c",
        "server",
        "turns",
        "upstream_port",
    )

    def __init__(
        self, ident: int, client: socket.socket, server: socket.socket, now: float
    ) -> None:
        self.id = ident
        self.client = client
        self.server = server
        self.accepted_at = now
        self.client_port = _port_of(client.getpeername())
        self.upstream_port = _port_of(server.getsockname())
        self.c2s = _Direction(self, _C2S, client, server)
        self.s2c = _Direction(self, _S2C, server, client)
        self.c2s.other = self.s2c
        self.s2c.other = self.c2s
        self.last = -1  # direction of the last data read
        self.turns = 0
        self.opaque = False  # encrypted: no protocol parsing
        self.closed = False

    def stats(self) -> ConnectionStats:
        return ConnectionStats(
            self.id,
            self.client_port,
            self.upstream_port,
            self.turns,
            self.c2s.stats(),
            self.s2c.stats(),
        )


def _port_of(address: Any) -> int:
    return int(address[1]) if isinstance(address, tuple) else 0


def _lower_timer_slack() -> None:
    """Let this thread's timers fire within 1 µs instead of the default 50 µs (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        ulong = ctypes.c_ulong
        libc.prctl(ctypes.c_int(_PR_SET_TIMERSLACK), ulong(1000), ulong(0), ulong(0), ulong(0))


@dataclass
class _Request:
    kind: str
    done: threading.Event = field(default_factory=threading.Event)
    result: RelayStats | None = None


class Relay:
    """Relay ``listen`` to ``target``, holding data ``rtt / 2`` each way; see the module docstring.

    ``target`` is ``(host, port)`` or a unix socket path; ``listen`` defaults
    to a free port on 127.0.0.1 (:attr:`port` says which); ``listener``, a
    bound TCP socket, is used instead of ``listen`` (a port picked by the
    caller's own rules). :meth:`start` runs the relay in a background thread;
    :meth:`serve_forever` in the calling one.
    """

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        rtt: float = 0.0,
        handshake: bool = True,
        connect_timeout: float = 5.0,
        listener: socket.socket | None = None,
    ) -> None:
        if rtt < 0:
            raise ValueError("rtt must be >= 0")
        self.target = target
        self.rtt = rtt
        self._half = rtt / 2
        self._handshake = rtt if handshake else 0.0
        self._connect_timeout = connect_timeout
        if listener is None:
            family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(listen)
            except BaseException:
                listener.close()
                raise
        self._listener = listener
        try:
            self._listener.listen(128)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.host: str = self._listener.getsockname()[0]
        self.port: int = self._listener.getsockname()[1]
        self._ep = select.epoll()
        self._ep.register(self._listener.fileno(), _EPOLLIN)
        self._ep.register(self._wake_r.fileno(), _EPOLLIN)
        self._fds: dict[int, tuple[_Direction, _Direction]] = {}  # fd -> (reads, writes)
        self._links: dict[int, _Link] = {}
        self._heap: list[tuple[float, int, _Direction]] = []
        self._seq = 0
        # How much earlier than due the loop asks to be woken: the usual lateness
        # of its wake-ups, learnt as it goes (at most a quarter of the delay).
        self._advance = 0.0
        self._max_advance = min(self._half / 4, 0.0002)
        self._ids = itertools.count(1)
        self._requests: deque[_Request] = deque()
        self._control: int | None = None  # subprocess mode: commands on stdin (a descriptor)
        self._control_buffer = b""
        #: Called in the loop after each wake-up (subprocess mode: signals).
        self.on_wake: Callable[[], None] | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._in_thread = False
        self._started_at = 0.0
        self._cpu_at_start = 0.0
        self._ended: tuple[float, float] | None = None  # (cpu, wall) when the loop ended
        # Counters of closed connections (open ones are summed at snapshot time).
        self._accepted = 0
        self._closed = 0
        self._closed_turns = 0
        self._closed_c2s = DirectionStats()
        self._closed_s2c = DirectionStats()
        self._late: dict[int, int] = {}  # (sent - due) // 10 µs -> chunks

    # -- control (any thread) -------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Relay:
        """Run the relay in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("already started")
        ready = threading.Event()
        self._in_thread = True
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), name=f"relay-{self.port}", daemon=True
        )
        self._thread.start()
        ready.wait()
        return self

    def serve_forever(self) -> None:
        """Run the relay in the calling thread until :meth:`stop` (or a ``stop`` command)."""
        self._serve(None)

    def stats(self, timeout: float = 10.0) -> RelayStats:
        """A snapshot, taken by the relay after it has read everything already sent to it.

        Whatever a client or the server wrote before this call is counted in it
        (on loopback, a completed ``send()`` is in the relay's receive buffer).
        """
        if self._thread is None or not self._thread.is_alive():
            return self._snapshot()
        request = _Request("stats")
        self._requests.append(request)
        self._wake()
        if not request.done.wait(timeout):
            raise TimeoutError(f"the relay did not answer within {timeout}s")
        assert request.result is not None
        return request.result

    def stop(self) -> None:
        """Ask the loop to end (from any thread, or a signal handler)."""
        self._stopping = True
        self._wake()

    def close(self, timeout: float = 10.0) -> RelayStats:
        """Stop, close every relayed connection and the listener; the final statistics."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            self.stop()
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError(f"relay thread did not stop within {timeout}s")
        final = self._snapshot()
        for link in list(self._links.values()):
            self._close_link(link)
        for sock in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError, ValueError):
            self._ep.close()
        return final

    def __enter__(self) -> Relay:
        return self if self._thread is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Relay {self.address} -> {_format_address(self.target)} rtt {self.rtt * 1e3:g} ms>"

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the loop (its own thread) ----------------------------------------------------

    def _cpu(self) -> float:
        return time.thread_time() if self._in_thread else time.process_time()

    def _serve(self, ready: threading.Event | None) -> None:
        _lower_timer_slack()
        self._started_at = time.monotonic()
        self._cpu_at_start = self._cpu()
        if ready is not None:
            ready.set()
        heap = self._heap
        poll = self._ep.poll
        epoll_fd = self._ep.fileno()
        monotonic = time.monotonic
        sleep_select = epoll_fd < _FD_SETSIZE
        try:
            while not self._stopping:
                timed = False
                wake_at = 0.0
                if heap:
                    # Wake early by the usual lateness of a wake-up, so as to send on time.
                    wake_at = heap[0][0] - self._advance
                    timeout = wake_at - monotonic()
                    if timeout <= 0:
                        events = poll(0)
                    elif sleep_select:
                        # epoll's timeout is whole milliseconds; select() waits to the µs.
                        if select.select([epoll_fd], [], [], timeout)[0]:
                            events = poll(0)
                        else:
                            events = []
                            timed = True
                    else:
                        events = poll(timeout)
                        timed = not events
                else:
                    events = poll()
                if events:
                    self._dispatch(events, control=True)
                if heap:
                    now = monotonic()
                    if timed:
                        late = now - wake_at
                        advance = self._advance + (late - self._advance) / 16
                        self._advance = min(max(advance, 0.0), self._max_advance)
                    # Everything due before the next wake-up could be goes now.
                    limit = now + self._advance
                    while heap and heap[0][0] <= limit:
                        d = heapq.heappop(heap)[2]
                        queue = d.queue
                        if queue and queue[0][0] <= limit:
                            self._flush(d, now, limit)
        finally:
            self._stopping = True
            self._ended = (self._cpu() - self._cpu_at_start, monotonic() - self._started_at)
            while self._requests:  # nobody waits forever
                request = self._requests.popleft()
                request.result = self._snapshot()
                request.done.set()

    def _dispatch(self, events: list[tuple[int, int]], *, control: bool) -> bool:
        """Handle epoll events; True if any connection had data to read."""
        fds = self._fds
        read_any = False
        for fd, mask in events:
            pair = fds.get(fd)
            if pair is not None:
                reads, writes = pair
                if mask & _EPOLLOUT and writes.out:
                    self._send(writes)
                if mask & (_EPOLLIN | _EPOLL_ERR) and not reads.link.closed:
                    if reads.reading:
                        self._read(reads)
                        read_any = True
                    elif mask & _EPOLL_ERR:
                        self._close_link(reads.link)
            elif fd == self._listener.fileno():
                self._accept()
            elif control and fd == self._wake_r.fileno():
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
                self._answer_requests()
                if self.on_wake is not None:
                    self.on_wake()
            elif control and fd == self._control:
                self._read_commands()
        return read_any

    def _read_everything(self) -> None:
        """Read what is already waiting on every connection (before a snapshot)."""
        for _ in range(64):
            if not self._dispatch(self._ep.poll(0), control=False):
                return

    def _answer_requests(self) -> None:
        if not self._requests:
            return
        self._read_everything()
        while self._requests:
            request = self._requests.popleft()
            request.result = self._snapshot()
            request.done.set()

    def _snapshot(self) -> RelayStats:
        links = [link for link in self._links.values() if not link.closed]
        c2s, s2c, turns = self._closed_c2s, self._closed_s2c, self._closed_turns
        connections = []
        for link in links:
            conn = link.stats()
            connections.append(conn)
            c2s = c2s.plus(conn.to_server)
            s2c = s2c.plus(conn.to_client)
            turns += conn.turns
        late = {bucket * _LATE_BUCKET_US: n for bucket, n in sorted(self._late.items())}
        if self._ended is not None:
            cpu, wall = self._ended
        elif self._started_at:
            cpu = self._cpu() - self._cpu_at_start
            wall = time.monotonic() - self._started_at
        else:
            cpu = wall = 0.0
        return RelayStats(
            rtt=self.rtt,
            accepted=self._accepted,
            closed=self._closed,
            turns=turns,
            to_server=c2s,
            to_client=s2c,
            connections=tuple(connections),
            cpu_seconds=cpu,
            wall_seconds=wall,
            late_us=late,
        )

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # BlockingIOError: nothing more waiting
                return
            try:
                server = self._connect_target()
            except OSError:
                client.close()
                continue
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._half:
                for sock in (client, server):  # arrival times from the kernel
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            try:
                link = _Link(next(self._ids), client, server, time.monotonic())
            except OSError:  # the client is gone already
                client.close()
                server.close()
                continue
            self._links[link.id] = link
            self._accepted += 1
            self._fds[client.fileno()] = (link.c2s, link.s2c)
            self._fds[server.fileno()] = (link.s2c, link.c2s)
            self._ep.register(client.fileno(), _EPOLLIN)
            self._ep.register(server.fileno(), _EPOLLIN)

    def _connect_target(self) -> socket.socket:
        if isinstance(self.target, str):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
            server = socket.socket(family, socket.SOCK_STREAM)
        try:
            server.settimeout(self._connect_timeout)
            server.connect(self.target)
            server.setblocking(False)
            if server.family != socket.AF_UNIX:
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            server.close()
            raise
        return server

    def _rearm(self, d: _Direction) -> None:
        """epoll for ``d.src``: read while ``d`` reads, write while the other way waits."""
        mask = _EPOLLIN if d.reading else 0
        if d.other.armed:
            mask |= _EPOLLOUT
        with contextlib.suppress(OSError, ValueError):
            self._ep.modify(d.src.fileno(), mask)

    def _read(self, d: _Direction) -> None:
        link = d.link
        arrived = 0.0
        try:
            if self._half:
                data, ancillary, _flags, _address = d.src.recvmsg(_CHUNK, 64)
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                        seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                        # The kernel's clock is the wall clock; ours is monotonic.
                        arrived = seconds + nanoseconds * 1e-9 - time.time() + time.monotonic()
            else:
                data = d.src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_link(link)
            return
        now = time.monotonic()
        if not 0 < now - arrived < 0.1:  # no kernel time stamp (or a wall clock step)
            arrived = now
        if not data:
            d.eof_in = True
            d.reading = False
            self._rearm(d)
            self._hold(d, None, arrived)
            return
        d.bytes += len(data)
        d.chunks += 1
        if not link.opaque:
            self._parse(d, data)
        if d.index == _C2S:
            link.last = _C2S
        elif link.last == _C2S:
            link.turns += 1
            link.last = _S2C
        else:
            link.last = _S2C
        self._hold(d, data, arrived)

    def _hold(self, d: _Direction, data: bytes | None, arrived: float) -> None:
        """Queue ``data`` (None: the end of the stream) to be passed on after the delay."""
        if self._half == 0:
            if data is None:
                d.eof_out = True
            else:
                d.out += data
                d.pending += len(data)
            self._send(d)
            return
        due = arrived + self._half
        if d.last_due == 0.0 and d.index == _C2S:
            due = max(due, d.link.accepted_at + self._handshake + self._half)
        if due < d.last_due:
            due = d.last_due  # never overtake earlier data
        d.last_due = due
        d.queue.append((due, data))
        if data is not None:
            d.pending += len(data)
            if d.pending > _MAX_PENDING and d.reading:
                d.reading = False
                d.paused = True
                self._rearm(d)
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, d))

    def _flush(self, d: _Direction, now: float, limit: float) -> None:
        """Move what is due by ``limit`` from ``d``'s queue to its output, and send."""
        queue = d.queue
        late = self._late
        parts = []
        while queue and queue[0][0] <= limit:
            due, data = queue.popleft()
            bucket = int((now - due) * 1e6 // _LATE_BUCKET_US)
            late[bucket] = late.get(bucket, 0) + 1
            if data is None:
                d.eof_out = True
                break
            parts.append(data)
        if parts:
            d.out += parts[0] if len(parts) == 1 else b"".join(parts)
        self._send(d)

    def _send(self, d: _Direction) -> None:
        link = d.link
        if link.closed:
            return
        out = d.out
        if out:
            try:
                sent = d.dst.send(out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close_link(link)
                return
            del out[:sent]
            d.pending -= sent
            if out:  # the rest when dst is writable
                if not d.armed:
                    d.armed = True
                    self._rearm(d.other)
                return
        if d.armed:
            d.armed = False
            self._rearm(d.other)
        if d.paused and d.pending <= _MAX_PENDING // 2:
            d.paused = False
            d.reading = not d.eof_in
            self._rearm(d)
        if d.eof_out and not d.done:
            d.done = True
            with contextlib.suppress(OSError):
                d.dst.shutdown(socket.SHUT_WR)
            if d.other.done:
                self._close_link(link)

    def _close_link(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        self._links.pop(link.id, None)
        self._closed += 1
        self._closed_turns += link.turns
        self._closed_c2s = self._closed_c2s.plus(link.c2s.stats())
        self._closed_s2c = self._closed_s2c.plus(link.s2c.stats())
        for sock in (link.client, link.server):
            with contextlib.suppress(OSError, ValueError):
                fd = sock.fileno()
                self._fds.pop(fd, None)
                self._ep.unregister(fd)
            with contextlib.suppress(OSError):
                sock.close()
        for d in (link.c2s, link.s2c):
            d.queue.clear()
            d.out.clear()

    # -- the PostgreSQL protocol, just enough to count messages ---------------------

    def _parse(self, d: _Direction, data: bytes) -> None:
        """Count the messages in ``data``; frames may span chunks."""
        if d.hdr:
            data = d.hdr + data
            d.hdr = b""
        i, n = 0, len(data)
        types = d.types
        while i < n:
            if d.need:
                step = d.need if d.need < n - i else n - i
                d.need -= step
                i += step
                continue
            if d.single:  # the server's one-byte answer to SSLRequest / GSSENCRequest
                answer = chr(data[i])
                i += 1
                d.single = False
                d.messages += 1
                key = f"{'ssl' if d.link.c2s.types.get('ssl') else 'gssenc'}-answer:{answer}"
                types[key] = types.get(key, 0) + 1
                if answer in "SG":
                    d.link.opaque = True  # encrypted from here on
                    return
                continue
            if d.untyped:
                if n - i < 8:
                    d.hdr = data[i:]
                    return
                length = int.from_bytes(data[i : i + 4], "big")
                code = int.from_bytes(data[i + 4 : i + 8], "big")
                kind = _UNTYPED.get(code, "startup")
                if kind in ("ssl", "gssenc"):
                    d.link.s2c.single = True
                elif kind == "startup":
                    d.untyped = False
                d.messages += 1
                types[kind] = types.get(kind, 0) + 1
                i += 8
                d.need = max(0, length - 8)
                continue
            if n - i < 5:
                d.hdr = data[i:]
                return
            kind = chr(data[i])
            length = int.from_bytes(data[i + 1 : i + 5], "big")
            d.messages += 1
            types[kind] = types.get(kind, 0) + 1
            i += 5
            d.need = max(0, length - 4)

    # -- subprocess mode: commands on stdin, signals ------------------------------------

    def listen_for_commands(self, fd: int) -> bool:
        """Take ``stats`` / ``stop`` lines on ``fd`` (stdin); False if it cannot be polled."""
        try:
            self._ep.register(fd, _EPOLLIN)
        except OSError:  # /dev/null or a regular file
            return False
        self._control = fd
        return True

    def _read_commands(self) -> None:
        assert self._control is not None
        try:
            data = os.read(self._control, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the end of stdin: the parent is gone or done
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(self._control)
            self._control = None
            self._stopping = True
            return
        self._control_buffer += data
        *lines, self._control_buffer = self._control_buffer.split(b"\n")
        for raw in lines:
            command = raw.strip().decode("ascii", "replace")
            if command == "stop":
                self._stopping = True
            elif command == "stats":
                self._read_everything()
                _emit({"event": "stats", "stats": self._snapshot().as_dict()})
            elif command:
                _emit({"event": "error", "error": f"unknown command {command!r}"})


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _write_stats_file(path: str, stats: RelayStats) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(stats.as_dict(), fh)
    os.replace(tmp, path)


# -- as a subprocess ----------------------------------------------------------------------


class RelayProcess:
    """:class:`Relay` in a child process (``python -m wsgi_pgconn.tooling.relay``).

    Same ``port``, ``stats()`` and ``close()`` as :class:`Relay`; ``pid`` is
    the child's. Its CPU use is its own process's, measured by itself.
    """

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        rtt: float = 0.0,
        handshake: bool = True,
        stats_file: str | None = None,
        python: str = sys.executable,
    ) -> None:
        argv = [
            python,
            "-m",
            "wsgi_pgconn.tooling.relay",
            "--listen",
            _format_address(listen),
            "--target",
            _format_address(target),
            "--rtt",
            f"{rtt * 1e6:.3f}us",
        ]
        if not handshake:
            argv.append("--no-handshake-delay")
        if stats_file:
            argv += ["--stats-file", stats_file]
        env = dict(os.environ)
        package_parent = os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        self.rtt = rtt
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        self._lock = threading.Lock()
        self._final: RelayStats | None = None
        first = self._message()
        if first.get("event") != "listening":
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the relay did not start: {first}")
        self.host: str = str(first["host"])
        self.port: int = int(first["port"])
        self.pid: int = self._proc.pid

    def _message(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"the relay process ended (exit code {code})")
        message: dict[str, Any] = json.loads(line)
        return message

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> RelayStats:
        with self._lock:
            if self._final is not None:
                return self._final
            assert self._proc.stdin is not None
            self._proc.stdin.write("stats\n")
            self._proc.stdin.flush()
            message = self._message()
        return RelayStats.from_dict(message["stats"])

    def close(self, timeout: float = 10.0) -> RelayStats:
        with self._lock:
            if self._final is not None:
                return self._final
            assert self._proc.stdin is not None
            try:
                self._proc.stdin.write("stop\n")
                self._proc.stdin.close()
                while True:
                    message = self._message()
                    if message.get("event") == "stopped":
                        break
            except BaseException:
                self._proc.kill()
                self._proc.wait()
                raise
            self._proc.wait(timeout)
            assert self._proc.stdout is not None
            self._proc.stdout.close()
            self._final = RelayStats.from_dict(message["stats"])
            return self._final

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc.poll() is None:
            self.close()


# -- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn.tooling.relay",
        description="A TCP relay that adds latency (rtt/2 each way) and counts round trips.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0: any free)")
    parser.add_argument("--target", required=True, help="host:port of the server, or a socket path")
    parser.add_argument("--rtt", default="0", help="round-trip time to add: 1ms, 0.5ms, 500us, 0")
    parser.add_argument(
        "--no-handshake-delay",
        action="store_true",
        help="do not hold a new connection's first data one extra rtt (the TCP handshake)",
    )
    parser.add_argument("--stats-file", help="JSON statistics, written at SIGUSR1 and at the end")
    args = parser.parse_args(argv)
    try:
        rtt = parse_duration(args.rtt)
        listen = parse_address(args.listen)
        target = parse_address(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    if isinstance(listen, str):
        parser.error("--listen takes host:port")

    relay = Relay(target, listen=listen, rtt=rtt, handshake=not args.no_handshake_delay)
    dump = threading.Event()

    def on_stop(signum: int, frame: FrameType | None) -> None:
        relay.stop()

    def on_dump(signum: int, frame: FrameType | None) -> None:
        dump.set()

    def after_wake() -> None:  # in the loop, after a signal woke it
        if dump.is_set() and args.stats_file:
            dump.clear()
            _write_stats_file(args.stats_file, relay.stats())

    # Signals wake the loop through the socket that stats requests use.
    signal.set_wakeup_fd(relay._wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, on_dump)
    relay.on_wake = after_wake
    relay.listen_for_commands(sys.stdin.fileno())
    _emit({"event": "listening", "host": relay.host, "port": relay.port, "pid": os.getpid()})
    try:
        relay.serve_forever()
    finally:
        final = relay.close()
        if args.stats_file:
            _write_stats_file(args.stats_file, final)
        with contextlib.suppress(OSError, ValueError):
            _emit({"event": "stopped", "stats": final.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
