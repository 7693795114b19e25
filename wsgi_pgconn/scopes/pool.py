"""Pool scope: at most ``pool_size`` connections shared by a process's threads (or greenlets)."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from .. import green
from .base import PooledConnection, Registry

__all__ = ["PoolRegistry"]


class _Waiting:
    """A checkout waiting its turn: handed a connection (``rec``) or the right to open one."""

    __slots__ = ("granted", "rec", "waiter")

    def __init__(self, waiter: green.Waiter) -> None:
        self.waiter = waiter
        self.granted = False
        self.rec: PooledConnection | None = None  # None with granted: open a new one


class PoolRegistry(Registry):
    """At most ``pool_size`` connections shared by a process's threads (or greenlets).

    A request that finds none free waits up to ``pool_timeout`` seconds, then
    gets the driver's :class:`~wsgi_pgconn.errors.PoolTimeout`. Waiting
    requests are served first come, first served: a connection given back
    while requests wait is handed to the one that has waited longest, and a
    newcomer never takes it first. The most recently returned connection is
    handed out first, so surplus ones age out. No threads of its own.

    The lock guarding the pool is never held while anything waits or does
    I/O, and a waiting request waits on the primitive of its event loop
    under greenlets (:func:`wsgi_pgconn.green.make_waiter_factory`), so the
    pool cooperates with gevent whether or not it monkey-patched ``threading``.
    """

    scope = "pool"

    def _init_state(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[PooledConnection] = []
        self._busy: set[PooledConnection] = set()
        self._opening = 0
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._new_waiter = green.make_waiter_factory(self.greenlets)

    def checkout(self) -> PooledConnection:
        rec: PooledConnection | None = None
        waiting: _Waiting | None = None
        with self._lock:
            if self._waiting:
                waiting = _Waiting(self._new_waiter())
                self._waiting.append(waiting)
            elif self._idle:
                rec = self._idle.pop()
                self._busy.add(rec)
                rec.in_use = True
            elif len(self._busy) + self._opening < self.settings.pool_size:
                self._opening += 1  # the right to open one
            else:
                waiting = _Waiting(self._new_waiter())
                self._waiting.append(waiting)
        if waiting is not None:
            self._wait_turn(waiting)
            rec = waiting.rec  # None: the right to open one
        if rec is not None:
            if self._ready(rec):
                rec.uses += 1
                return rec
            reason = self._unusable(rec)
            if reason is None:
                rec.uses += 1
                return rec
            self._discard(rec, reason)
            with self._lock:
                self._busy.discard(rec)
                self._opening += 1
        try:
            rec = self._open()
        except BaseException:
            with self._lock:
                self._opening -= 1
                self._grant_slot()
            raise
        rec.in_use = True
        with self._lock:
            self._opening -= 1
            self._busy.add(rec)
        return rec

    def _wait_turn(self, waiting: _Waiting) -> None:
        """Wait until ``waiting`` is handed a connection (or the right to open one).

        Raises PoolTimeout when nothing was handed over within ``pool_timeout``.
        """
        settings = self.settings
        counter = self.stats_counter
        counter.incr("pool_waits")
        started = time.monotonic()
        try:
            woken = waiting.waiter.wait(settings.pool_timeout)
        except BaseException:
            # Interrupted (a greenlet killed, gevent.Timeout): give back what was handed over.
            self._abandon(waiting)
            raise
        waited = time.monotonic() - started
        if not woken:
            with self._lock:
                if not waiting.granted:
                    self._waiting.remove(waiting)
            if not waiting.granted:
                counter.incr("pool_timeouts")
                counter.incr("pool_wait_seconds", waited)
                raise self.driver.PoolTimeout(
                    f"no connection became free within {settings.pool_timeout:g}s: all "
                    f"{settings.pool_size} are in use (raise WSGI_PGCONN_POOL_SIZE or "
                    "WSGI_PGCONN_POOL_TIMEOUT, or find the slow requests)"
                )
            # Handed over just as the wait timed out: take it.
        counter.incr("pool_wait_seconds", waited)

    def _abandon(self, waiting: _Waiting) -> None:
        with self._lock:
            if not waiting.granted:
                self._waiting.remove(waiting)
                return
            rec = waiting.rec
            if rec is None:  # the right to open one: pass it on
                self._opening -= 1
                self._grant_slot()
                return
        rec.in_use = True
        self.checkin(rec, False)

    def _grant_slot(self) -> None:
        """A connection slot became free (with the lock held): the next waiter may open one."""
        if self._waiting and len(self._busy) + self._opening < self.settings.pool_size:
            waiting = self._waiting.popleft()
            self._opening += 1
            waiting.granted = True
            waiting.waiter.wake()

    def checkin(self, rec: PooledConnection, used: bool) -> None:
        reason: str | None = "broken"
        try:
            reason = self._reset(rec, used)
        finally:
            rec.in_use = False
            with self._lock:
                if reason is None and self._waiting:
                    # Straight to the request that has waited longest: it stays busy.
                    waiting = self._waiting.popleft()
                    rec.in_use = True
                    waiting.rec = rec
                    waiting.granted = True
                    waiting.waiter.wake()
                else:
                    self._busy.discard(rec)
                    if reason is None:
                        self._idle.append(rec)
                    else:
                        self._grant_slot()
            if reason is not None:
                self._discard(rec, reason)

    def _records(self) -> list[PooledConnection]:
        with self._lock:
            return [*self._idle, *self._busy]

    def stats(self) -> dict[str, Any]:
        result = super().stats()
        result.update(pool_max=self.settings.pool_size, waiting=len(self._waiting))
        return result

    def occupancy(self) -> tuple[int, int, int]:
        # Without the lock (an observer may be called with it held): len() is atomic.
        return len(self._busy), len(self._idle), len(self._waiting)

    def _held(self) -> list[PooledConnection]:
        return [*self._idle, *self._busy]

    def _forget(self) -> None:
        with self._lock:
            self._idle.clear()
            self._busy.clear()

    def _take_idle(self) -> list[PooledConnection]:
        with self._lock:
            idle, self._idle = self._idle, []
        return idle
