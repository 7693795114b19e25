"""Thread scope: one connection per thread, reused by every request on that thread."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import weakref

from ..drivers import IDLE
from .base import PooledConnection, Registry, _getpid, _inherited

__all__ = ["ThreadRegistry"]

logger = logging.getLogger("wsgi_pgconn")


class ThreadRegistry(Registry):
    """One connection per thread, reused by every request on that thread.

    The connection is closed when its thread ends. Servers that start a thread
    per request (werkzeug's and Django's development servers) thus get one
    connection per request, not a leak; when threads keep ending after one
    request each, one WARNING says so and names ``scope=pool``.
    """

    scope = "thread"
    #: Threads that ended after one request each, in a row, before the WARNING.
    CHURN_WARNING_AFTER = 5
    #: What the middleware recognised of the server (for the churn WARNING).
    server = "this server"

    def _init_state(self) -> None:
        super()._init_state()
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection, and the slot (weakly: it must die with its thread) holding it.
        self._all: dict[PooledConnection, weakref.ref[_ThreadSlot]] = {}
        self._one_request_threads = 0
        self._churn_warned = False

    def checkout(self) -> PooledConnection:
        try:
            slot: _ThreadSlot = self._local.slot
        except AttributeError:
            slot = self._local.slot = _ThreadSlot(self)
        rec = slot.rec
        if rec is not None:
            if (  # Registry._ready, inlined: the common case
                not rec.in_use
                and rec.pid == _getpid()
                and rec.generation >= self._generation
                and not self._thorough
                and self._status(rec.conn) == IDLE
                and not rec.poller.poll(0)
                and not rec.conn.closed
            ):
                rec.in_use = True
                rec.uses += 1
                return rec
            if rec.in_use:
                # An earlier response on this thread was never closed; collecting it
                # rolls it back and releases the connection (transaction.Body.__del__).
                gc.collect()
                if rec.in_use:
                    raise RuntimeError(
                        "this thread's connection is still held by an earlier request whose "
                        "response was never closed: a WSGI server must call close() on every "
                        "response; with Flask's or werkzeug's test client, read streamed "
                        "responses whole with buffered=True (client.get(url, buffered=True)) "
                        "or close them ('with client.get(url) as response:'). Or a request is "
                        "nested in another one on the same thread"
                    )
            reason = self._unusable(rec)
            if reason is None:
                rec.in_use = True
                rec.uses += 1
                return rec
            slot.rec = None
            with self._lock:
                self._all.pop(rec, None)
            self._discard(rec, reason)
        rec = self._open()
        rec.in_use = True
        slot.rec = rec
        with self._lock:
            self._all[rec] = weakref.ref(slot)
        return rec

    def checkin(self, rec: PooledConnection, used: bool) -> None:
        reason = self._reset(rec, used)
        rec.in_use = False
        if reason is not None:
            slot: _ThreadSlot | None = getattr(self._local, "slot", None)
            if slot is not None and slot.rec is rec:
                slot.rec = None
            with self._lock:
                self._all.pop(rec, None)
            self._discard(rec, reason)

    def _thread_ended(self, rec: PooledConnection) -> None:
        if rec.pid != os.getpid():
            # A forked child dropping the parent's threads: no lock may be taken
            # (its holder is gone) and the connection must stay open.
            _inherited.append(rec.conn)
            return
        with self._lock:
            if self._all.pop(rec, None) is None:
                return
            warn = False
            if rec.uses == 0:  # the thread served one request
                self._one_request_threads += 1
                if (
                    self._one_request_threads >= self.CHURN_WARNING_AFTER
                    and not self._churn_warned
                ):
                    self._churn_warned = warn = True
            else:
                self._one_request_threads = 0
        logger.debug("thread ended: closing connection to backend pid %s", rec.backend_pid)
        self.stats_counter.discard(None, rec)
        self._close_quietly(rec)
        if warn:
            logger.warning(
                "WSGI_PGCONN_SCOPE=thread: %d threads in a row ended after one request each, "
                "so every request opens a new connection: %s starts a thread per request "
                "(as werkzeug's development server, flask run and Django's runserver do). "
                "Set WSGI_PGCONN_SCOPE=pool to keep connections between requests",
                self._one_request_threads,
                self.server,
            )

    def _records(self) -> list[PooledConnection]:
        with self._lock:
            return list(self._all)

    def _held(self) -> list[PooledConnection]:
        return list(self._all)

    def _forget(self) -> None:
        with self._lock:
            self._all.clear()
        self._local = threading.local()

    def _take_idle(self) -> list[PooledConnection]:
        taken = []
        with self._lock:
            for rec, slot_ref in list(self._all.items()):
                if rec.in_use:
                    continue
                slot = slot_ref()
                if slot is not None and slot.rec is rec:
                    slot.rec = None
                del self._all[rec]
                taken.append(rec)
        return taken


class _ThreadSlot:
    """Lives in a thread-local; when the thread ends it goes, and closes the connection."""

    __slots__ = ("__weakref__", "rec", "registry")

    def __init__(self, registry: ThreadRegistry) -> None:
        self.registry = weakref.ref(registry)
        self.rec: PooledConnection | None = None

    def __del__(self) -> None:
        rec, registry = self.rec, self.registry()
        if rec is not None and registry is not None:
            with contextlib.suppress(Exception):  # nothing to be done in a dying thread
                registry._thread_ended(rec)
