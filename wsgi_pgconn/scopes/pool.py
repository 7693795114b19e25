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

    A request that cannot open a new connection (the server refuses one more,
    or the connect back-off is on) waits the same way for one of the
    connections other requests hold, as psycopg_pool's clients do; it fails at
    once only when the pool holds none (the driver's OperationalError, or
    :class:`~wsgi_pgconn.errors.ConnectBackoff`).

    The lock guarding the pool is never held while anything waits or does
    I/O, and a waiting request waits on the primitive of its event loop
    under greenlets (:func:`wsgi_pgconn.green.make_waiter_factory`), so the
    pool cooperates with gevent whether or not it monkey-patched ``threading``.
    """

    scope = "pool"

    def _init_state(self) -> None:
        super()._init_state()
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
                waiting = self._enqueue()
            elif self._idle:
                rec = self._idle.pop()
                self._busy.add(rec)
                rec.in_use = True
            elif self._may_grow():
                self._opening += 1  # the right to open one
            else:
                waiting = self._enqueue()
        if rec is not None and self._ready(rec):
            rec.uses += 1
            return rec
        return self._checkout_slow(rec, waiting)

    def _checkout_slow(
        self, unready: PooledConnection | None, waiting: _Waiting | None
    ) -> PooledConnection:
        """Wait for a turn, check a connection that needs it (``unready``), or open one."""
        started: float | None = None
        rec = unready
        try:
            while True:
                if waiting is not None:
                    if started is None:
                        started = time.monotonic()
                        self.stats_counter.incr("pool_waits")
                    self._wait_turn(waiting, started + self.settings.pool_timeout)
                    rec = waiting.rec  # None: the right to open one
                    waiting = None
                    if rec is not None and self._ready(rec):
                        rec.uses += 1
                        return rec
                if rec is not None:
                    reason = self._unusable(rec)
                    if reason is None:
                        rec.uses += 1
                        return rec
                    self._discard(rec, reason)
                    with self._lock:
                        self._busy.discard(rec)
                        self._opening += 1
                    rec = None
                try:
                    opened = self._open()
                except self.driver.OperationalError:
                    with self._lock:
                        self._opening -= 1
                        if self._idle:  # given back meanwhile: take it as a waiter would
                            waiting = _Waiting(self._new_waiter())
                            waiting.rec = self._idle.pop()
                            waiting.granted = True
                            waiting.waiter.wake()
                            self._busy.add(waiting.rec)
                            waiting.rec.in_use = True
                        elif self._busy or self._opening:
                            # Connections other requests hold: wait for one of them
                            # (up to pool_timeout) rather than fail this request.
                            waiting = self._enqueue()
                        else:
                            self._grant_slot()
                    if waiting is None:
                        raise
                    continue
                except BaseException:
                    with self._lock:
                        self._opening -= 1
                        self._grant_slot()
                    raise
                opened.in_use = True
                with self._lock:
                    self._opening -= 1
                    self._busy.add(opened)
                return opened
        finally:
            if started is not None:
                self.stats_counter.incr("pool_wait_seconds", time.monotonic() - started)

    def _enqueue(self) -> _Waiting:
        """A place at the end of the queue (with the lock held)."""
        waiting = _Waiting(self._new_waiter())
        self._waiting.append(waiting)
        return waiting

    def _may_grow(self) -> bool:
        """Whether a checkout may open a connection now (with the lock held).

        While connects back off, not while other connections may be waited
        for; with none held, yes (the attempt raises ConnectBackoff at once).
        """
        if len(self._busy) + self._opening >= self.settings.pool_size:
            return False
        return not self._connect_failures or self._backoff_left() <= 0 or not (
            self._busy or self._opening
        )

    def _wait_turn(self, waiting: _Waiting, deadline: float) -> None:
        """Wait until ``waiting`` is handed a connection (or the right to open one).

        Raises PoolTimeout when nothing was handed over by ``deadline``
        (``time.monotonic()`` seconds). During a connect back-off the wait
        wakes when the back-off ends, to open a connection if one may be.
        """
        while True:
            remaining = deadline - time.monotonic()
            backoff = self._backoff_left()
            try:
                woken = remaining > 0 and waiting.waiter.wait(
                    min(remaining, max(backoff, 0.01)) if backoff else remaining
                )
            except BaseException:
                # Interrupted (a greenlet killed, gevent.Timeout): give back what was handed over.
                self._abandon(waiting)
                raise
            if woken:
                return
            with self._lock:
                if not waiting.granted and self._waiting and self._waiting[0] is waiting:
                    self._grant_slot()  # the back-off may have ended
                if waiting.granted:
                    return  # handed over as the wait timed out: take it
                if deadline - time.monotonic() > 0:
                    continue
                self._waiting.remove(waiting)
            self.stats_counter.incr("pool_timeouts")
            raise self.driver.PoolTimeout(self._timeout_message())

    def _timeout_message(self) -> str:
        settings = self.settings
        message = (
            f"no connection became free within {settings.pool_timeout:g}s: all "
            f"{len(self._busy)} in use"
        )
        if self._connect_failures and len(self._busy) < settings.pool_size:
            return (
                f"{message}, and no new one could be opened ({self._connect_log.last}); "
                "raise max_connections or the role's CONNECTION LIMIT, or lower "
                "WSGI_PGCONN_POOL_SIZE"
            )
        return (
            f"{message} (raise WSGI_PGCONN_POOL_SIZE or WSGI_PGCONN_POOL_TIMEOUT, or find "
            "the slow requests)"
        )

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
        """A connection slot may be free (with the lock held): the next waiter may open one."""
        if self._waiting and self._may_grow():
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
