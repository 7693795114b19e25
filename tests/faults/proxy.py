"""A small TCP proxy for fault tests, with a blackhole switch.

``BlackholeProxy(target_port)`` listens on 127.0.0.1 (a free port in
``WSGI_PGCONN_PORT_RANGE``, 20000-29999 unless set) and relays every
connection to ``127.0.0.1:target_port`` from one background thread.
``blackhole(True)`` makes the path stop answering without closing anything,
the way a dead router or a dropped VPN does:

* nothing more is relayed in either direction;
* every packet that reaches the proxy's client-facing sockets, and its
  listening socket, is dropped by the kernel *before* TCP sees it (a classic
  BPF socket filter that rejects everything, ``SO_ATTACH_FILTER``; no
  privileges needed). So the client's data is never acknowledged, its
  keepalive probes are never answered and its SYNs go nowhere: the client's
  own TCP timers (``tcp_user_timeout``, keepalives, ``connect_timeout``) are
  what notice, exactly as on a real network.

A userspace proxy alone could not do this: its kernel would acknowledge
everything, and no client-side TCP timer would ever fire.

``blackhole(False)`` restores the path: the filters are removed and relaying
resumes. A client that gave up meanwhile gets its stale bytes answered with a
reset by its own kernel, which ends that relayed pair. ``close()`` ends every
pair and the thread. Linux only (``SO_ATTACH_FILTER``).

Example::

    with BlackholeProxy(pg_port) as proxy:
        dsn = f"host=127.0.0.1 port={proxy.port} ..."
        ...
        proxy.blackhole(True)
        ...  # requests through the proxy now time out
        proxy.blackhole(False)
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import select
import socket
import threading
from types import TracebackType

from wsgi_pgconn.tooling.ports import bind_free_port

__all__ = ["BlackholeProxy", "bind_free_port"]

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
_CHUNK = 65536
_MAX_BUFFERED = 1 << 20  # per direction; stop reading a side while its peer lags


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(_SockFilter)),
    ]


_BPF_RET_K = 0x06  # BPF_RET | BPF_K: "return k"; k = 0 accepts 0 bytes: drop
_DROP_ALL = (_SockFilter * 1)(_SockFilter(_BPF_RET_K, 0, 0, 0))
# The kernel copies the program at setsockopt() time; _DROP_ALL stays alive anyway.
_DROP_ALL_PROG = bytes(_SockFprog(1, _DROP_ALL))


def _drop_everything(sock: socket.socket, on: bool) -> None:
    try:
        if on:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _DROP_ALL_PROG)
        else:
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EBADF, errno.ENOTCONN):
            raise


class _Pair:
    """One relayed connection: the client's socket and ours to the target."""

    __slots__ = ("client", "server", "to_client", "to_server")

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.to_server = bytearray()
        self.to_client = bytearray()

    def close(self) -> None:
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.close()


class BlackholeProxy:
    """Relay 127.0.0.1:``port`` to ``target_host:target_port``; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.port = bind_free_port(self._listener)
            self._listener.listen(64)
            self._listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self._listener.close()
            raise
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._blackholed = False
        self._stopping = False
        self.accepted = 0  # connections relayed since start
        self._thread = threading.Thread(target=self._run, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- control ------------------------------------------------------------

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    @property
    def active(self) -> int:
        """Relayed connections currently open."""
        with self._lock:
            return len(self._pairs)

    def blackhole(self, on: bool = True) -> None:
        """Stop (``True``) or resume (``False``) the path; takes effect at once."""
        with self._lock:
            self._blackholed = on
            _drop_everything(self._listener, on)
            for pair in self._pairs:
                _drop_everything(pair.client, on)
        self._wake()

    def reset_all(self) -> None:
        """Close every relayed connection now (the path itself stays up)."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()
        self._wake()

    def close(self, timeout: float = 10.0) -> None:
        """End every relayed connection and the relay thread."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"proxy thread did not stop within {timeout}s")
        self.reset_all()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()

    def __enter__(self) -> BlackholeProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "blackholed" if self._blackholed else "relaying"
        return (
            f"<BlackholeProxy 127.0.0.1:{self.port} -> {self.target[0]}:{self.target[1]} {state}>"
        )

    # -- the relay thread -----------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _run(self) -> None:
        while not self._stopping:
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            with self._lock:
                blackholed = self._blackholed
                pairs = list(self._pairs)
            owners: dict[int, tuple[_Pair | None, str]] = {}
            if not blackholed:
                poller.register(self._listener, select.POLLIN)
                owners[self._listener.fileno()] = (None, "listen")
                for pair in pairs:
                    for sock, side, inbox, outbox in (
                        (pair.client, "client", pair.to_server, pair.to_client),
                        (pair.server, "server", pair.to_client, pair.to_server),
                    ):
                        mask = 0
                        if len(inbox) < _MAX_BUFFERED:
                            mask |= select.POLLIN
                        if outbox:
                            mask |= select.POLLOUT
                        try:
                            poller.register(sock, mask)
                        except (ValueError, OSError):  # closed meanwhile
                            continue
                        owners[sock.fileno()] = (pair, side)
            for fd, events in poller.poll():
                if fd == self._wake_r.fileno():
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    continue
                pair, side = owners.get(fd, (None, ""))
                if side == "listen":
                    self._accept()
                elif pair is not None:
                    self._service(pair, side, events)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                server.settimeout(5)
                server.connect(self.target)
            except OSError:
                server.close()
                client.close()
                continue
            client.setblocking(False)
            server.setblocking(False)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            with self._lock:
                if self._blackholed:  # raced with blackhole(True): it must not answer either
                    _drop_everything(client, True)
                self._pairs.append(pair)
                self.accepted += 1

    def _service(self, pair: _Pair, side: str, events: int) -> None:
        sock, peer = (pair.client, pair.server) if side == "client" else (pair.server, pair.client)
        inbox = pair.to_server if side == "client" else pair.to_client
        outbox = pair.to_client if side == "client" else pair.to_server
        try:
            if events & select.POLLOUT and outbox:
                sent = sock.send(outbox)
                del outbox[:sent]
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                data = sock.recv(_CHUNK)
                if not data:
                    raise ConnectionResetError("end of stream")
                inbox += data
                sent = peer.send(inbox)
                del inbox[:sent]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            with self._lock:
                if pair in self._pairs:
                    self._pairs.remove(pair)
            pair.close()
