"""Greenlets (gevent, eventlet): telling that a process runs them, and waiting that cooperates.

Under gevent or eventlet many requests run at once in one OS thread, each in
a greenlet, switched by an event loop whenever one waits for I/O. That
changes what a scope means:

* with monkey-patching, ``threading.local`` is per greenlet: a per-thread
  connection is a per-greenlet connection, and servers such as gunicorn's
  gevent worker run one greenlet per client connection (one backend each);
* without it (uWSGI's ``--gevent`` loop unless ``--gevent-monkey-patch``),
  every greenlet shares the one thread's connection, and a plain thread lock
  held while a greenlet waits blocks the whole loop.

So under greenlets wsgi_pgconn uses the pool scope by default, waits for a
pooled connection with the event loop's own primitive, in order of arrival,
and checks a kept connection with the unpatched ``poll`` (the patched one
yields to other greenlets even with a zero timeout).

:func:`detect` says whether (and how) this process runs greenlets; the
``greenlets`` setting (``WSGI_PGCONN_GREENLETS``: ``auto``, ``on``, ``off``)
can override it. This module imports neither gevent nor eventlet unless the
process already did.
"""

from __future__ import annotations

import logging
import select
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

__all__ = [
    "Greenlets",
    "Waiter",
    "detect",
    "make_waiter_factory",
    "patch_psycopg2",
    "unpatched_poll",
]

logger = logging.getLogger("wsgi_pgconn")


class Greenlets(NamedTuple):
    """What :func:`detect` found: the library (``"gevent"`` or ``"eventlet"``) and how."""

    library: str
    #: How it was recognised, for messages: "gevent monkey-patching", "uWSGI's gevent loop", ...
    how: str
    #: Whether ``threading`` is patched (its locks then cooperate with the loop).
    threading_patched: bool


def _gevent_patched(module: str) -> bool:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched(module))
    except Exception:  # a gevent without the function
        return False


def _eventlet_patched(module: str) -> bool:
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is None:
        return False
    try:
        return bool(patcher.is_monkey_patched(module))
    except Exception:
        return False


def detect() -> Greenlets | None:
    """Whether this process runs requests in greenlets, and how that was recognised.

    Recognised: uWSGI's gevent loop (``--gevent N``, with or without
    ``--gevent-monkey-patch``), gevent or eventlet monkey-patching (which
    gunicorn's ``gevent`` and ``eventlet`` workers apply), and gunicorn's
    gevent/eventlet worker classes loaded before they patch (``--preload``).
    Returns None for a threaded or single-threaded process. Never imports
    gevent or eventlet.
    """
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None:
        loop = getattr(uwsgi, "loop", None)
        if loop in (b"gevent", "gevent"):
            patched = _gevent_patched("threading")
            how = "uWSGI's gevent loop" + (
                " (--gevent-monkey-patch)" if patched else " (not monkey-patched)"
            )
            return Greenlets("gevent", how, patched)
    if _gevent_patched("threading") or _gevent_patched("socket"):
        return Greenlets("gevent", "gevent monkey-patching", _gevent_patched("threading"))
    if _eventlet_patched("thread") or _eventlet_patched("socket"):
        return Greenlets("eventlet", "eventlet monkey-patching", _eventlet_patched("thread"))
    if "gunicorn.workers.ggevent" in sys.modules:
        return Greenlets("gevent", "gunicorn's gevent worker", _gevent_patched("threading"))
    if "gunicorn.workers.geventlet" in sys.modules:
        return Greenlets("eventlet", "gunicorn's eventlet worker", _eventlet_patched("thread"))
    return None


def unpatched_poll() -> Callable[[], Any]:
    """``select.poll`` as the C library provides it, even after monkey-patching.

    A patched ``poll(0)`` yields to other greenlets; the liveness check of a
    kept connection must not (it is not I/O: it only asks whether the socket
    has something to read).
    """
    poll: Callable[[], Any] | None = getattr(select, "poll", None)
    module = getattr(poll, "__module__", None) or ""
    if module.startswith("gevent"):
        monkey = sys.modules.get("gevent.monkey")
        if monkey is not None:
            poll = monkey.get_original("select", "poll")
    elif poll is None or module.startswith("eventlet"):
        # eventlet's patching removes select.poll altogether.
        patcher = sys.modules.get("eventlet.patcher")
        if patcher is not None:
            poll = patcher.original("select").poll
    if poll is None:
        raise RuntimeError("select.poll is missing: wsgi_pgconn needs a platform with poll()")
    return poll


# -- waiting for a pooled connection --------------------------------------------------


class Waiter(Protocol):
    """One request waiting for a pooled connection: :meth:`wait` until :meth:`wake`."""

    def wait(self, timeout: float) -> bool:
        """Block (or yield, under greenlets) until woken; False after ``timeout`` seconds."""

    def wake(self) -> None:
        """Wake the waiter (called once, by whoever hands it a connection)."""


class _ThreadWaiter:
    """A waiter on a lock: a thread blocks; under monkey-patching the lock is the loop's."""

    __slots__ = ("_lock",)

    def __init__(self, lock_type: Callable[[], Any]) -> None:
        self._lock = lock_type()
        self._lock.acquire()

    def wait(self, timeout: float) -> bool:
        return bool(self._lock.acquire(True, timeout))

    def wake(self) -> None:
        self._lock.release()


class _GeventWaiter:
    """A waiter on gevent's Event: yields to the loop, whether or not threading is patched."""

    __slots__ = ("_event",)

    def __init__(self, event_type: Callable[[], Any]) -> None:
        self._event = event_type()

    def wait(self, timeout: float) -> bool:
        return bool(self._event.wait(timeout))

    def wake(self) -> None:
        self._event.set()


def make_waiter_factory(greenlets: Greenlets | None) -> Callable[[], Waiter]:
    """A factory of :class:`Waiter` that cooperates with the loop of ``greenlets`` (None: threads).

    Thread locks are used wherever they cooperate (threads; gevent or eventlet
    with ``threading`` patched). With gevent running without patching
    (uWSGI's ``--gevent`` alone), a plain lock would block the whole loop, so
    gevent's Event is used.
    """
    if greenlets is not None and greenlets.library == "gevent" and not greenlets.threading_patched:
        import gevent.event  # type: ignore[import-untyped, import-not-found, unused-ignore]

        event_type = gevent.event.Event
        return lambda: _GeventWaiter(event_type)
    lock_type = threading.Lock
    return lambda: _ThreadWaiter(lock_type)


# -- psycopg2 under gevent ------------------------------------------------------------


def patch_psycopg2() -> None:
    """Make psycopg2 wait for the server through gevent instead of blocking the process.

    Installs a process-wide psycopg2 wait callback (what psycogreen's
    ``patch_psycopg()`` does) that waits with ``gevent.socket.wait_read`` /
    ``wait_write``, and that, when the waiting greenlet is killed or times
    out (``gevent.Timeout``, ``GreenletExit``), asks the server to cancel
    the running statement before the exception goes on (psycopg2 then
    closes the connection, which wsgi_pgconn discards). Call it once, at
    import of ``wsgi.py``, before the first query. Needs gevent and psycopg2;
    psycopg 3 needs nothing (it waits through gevent's patched selectors).
    """
    from .drivers import load

    driver = load("psycopg2")
    install = getattr(driver, "install_gevent_wait", None)
    if install is None:  # pragma: no cover - the psycopg2 driver module has it
        raise RuntimeError("this psycopg2 driver cannot wait through gevent")
    install()
