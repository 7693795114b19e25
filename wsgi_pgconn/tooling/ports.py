"""The TCP ports the tooling and the test suite listen on, from one setting.

The throwaway PostgreSQL clusters, the benchmark's servers, the test suite's
WSGI servers, poolers and proxies, and the examples all pick a random free
port on 127.0.0.1 from one range: ``WSGI_PGCONN_PORT_RANGE``, ``FIRST-LAST``
(inclusive), by default ``20000-29999``.  The default stays below Linux's
ephemeral range (32768-60999), from which the kernel picks the local ports
of outgoing connections: a long load test leaves thousands of them in
TIME_WAIT, and a listener must not collide with them.

>>> parse_port_range("20000-29999")
(20000, 29999)
"""

from __future__ import annotations

import errno
import os
import random
import socket
from collections.abc import Collection

__all__ = [
    "DEFAULT_PORT_RANGE",
    "PORT_RANGE_ENV",
    "PortRangeError",
    "bind_free_port",
    "free_port",
    "parse_port_range",
    "port_range",
]

#: The environment variable that sets the range.
PORT_RANGE_ENV = "WSGI_PGCONN_PORT_RANGE"
#: ``(first, last)``, both included, when the variable is unset or empty.
DEFAULT_PORT_RANGE = (20000, 29999)
_LOOPBACK = "127.0.0.1"
_MAX_TRIES = 200


class PortRangeError(ValueError):
    """``WSGI_PGCONN_PORT_RANGE`` is not a valid range, or no port in it is free."""


def parse_port_range(text: str, *, name: str = PORT_RANGE_ENV) -> tuple[int, int]:
    """``"FIRST-LAST"`` -> ``(first, last)``; raises :class:`PortRangeError` naming ``name``."""
    first_text, sep, last_text = text.strip().partition("-")
    expected = (
        f"expected FIRST-LAST, two port numbers with 1 <= FIRST <= LAST <= 65535, "
        f"for example {DEFAULT_PORT_RANGE[0]}-{DEFAULT_PORT_RANGE[1]}"
    )
    try:
        if not sep:
            raise ValueError(text)
        first, last = int(first_text.strip()), int(last_text.strip())
    except ValueError:
        raise PortRangeError(f"{name}={text!r} is not valid: {expected}") from None
    if not 1 <= first <= last <= 65535:
        raise PortRangeError(f"{name}={text!r} is not valid: {expected}")
    return first, last


def port_range() -> tuple[int, int]:
    """The range in force: ``WSGI_PGCONN_PORT_RANGE``, else :data:`DEFAULT_PORT_RANGE`.

    Read at every call, so that a test (or a caller) may change the variable.
    """
    text = os.environ.get(PORT_RANGE_ENV, "")
    if not text.strip():
        return DEFAULT_PORT_RANGE
    return parse_port_range(text)


def _candidates(exclude: Collection[int]) -> list[int]:
    first, last = port_range()
    size = last - first + 1
    rng = random.SystemRandom()
    if size <= _MAX_TRIES:
        ports = list(range(first, last + 1))
        rng.shuffle(ports)
    else:
        ports = [rng.randint(first, last) for _ in range(_MAX_TRIES)]
    return [port for port in ports if port not in exclude]


def _none_free(host: str) -> PortRangeError:
    first, last = port_range()
    return PortRangeError(
        f"no free TCP port on {host} in {first}-{last} (after trying up to {_MAX_TRIES}); "
        f"set {PORT_RANGE_ENV}=FIRST-LAST to a range with free ports"
    )


def bind_free_port(
    sock: socket.socket, host: str = _LOOPBACK, exclude: Collection[int] = ()
) -> int:
    """Bind ``sock`` to a random free port of the range on ``host``; return the port.

    Binding is the only race-free way to own a port: use this when the caller
    listens itself.
    """
    for port in _candidates(exclude):
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                continue
            raise
        return port
    raise _none_free(host)


def free_port(host: str = _LOOPBACK, exclude: Collection[int] = ()) -> int:
    """A random port of the range that is free on ``host`` right now.

    For a server started in another process: it may still lose the port to
    somebody else before it binds it, so the callers retry or fail clearly.
    """
    for port in _candidates(exclude):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
        return port
    raise _none_free(host)
