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
    connection per request, not a leak.
    """

    scope = "thread"

    def _init_state(self) -> None:
        super()._init_state()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[PooledConnection] = set()

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
                # rolls it back and releases the connection (RequestTransaction.__del__).
                gc.collect()
                if rec.in_use:
                    raise RuntimeError(
                        "this thread's connection is still held by an earlier request whose "
                        "response was never closed (the WSGI server must call close() on it), "
                        "or by an enclosing request on the same thread"
                    )
            reason = self._unusable(rec)
            if reason is None:
                rec.in_use = True
                rec.uses += 1
                return rec
            slot.rec = None
            with self._lock:
                self._all.discard(rec)
            self._discard(rec, reason)
        rec = self._open()
        rec.in_use = True
        slot.rec = rec
        with self._lock:
            self._all.add(rec)
        return rec

    def checkin(self, rec: PooledConnection, used: bool) -> None:
        reason = self._reset(rec, used)
        rec.in_use = False
        if reason is not None:
            slot: _ThreadSlot | None = getattr(self._local, "slot", None)
            if slot is not None and slot.rec is rec:
                slot.rec = None
            with self._lock:
                self._all.discard(rec)
            self._discard(rec, reason)

    def _thread_ended(self, rec: PooledConnection) -> None:
        if rec.pid != os.getpid():
            # A forked child dropping the parent's threads: no lock may be taken
            # (its holder is gone) and the connection must stay open.
            _inherited.append(rec.conn)
            return
        with self._lock:
            if rec not in self._all:
                return
            self._all.discard(rec)
        logger.debug("thread ended: closing connection to backend pid %s", rec.backend_pid)
        self.stats_counter.discard(None, rec)
        self._close_quietly(rec)

    def _records(self) -> list[PooledConnection]:
        with self._lock:
            return list(self._all)

    def _forget(self) -> None:
        with self._lock:
            self._all.clear()
        self._local = threading.local()


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
