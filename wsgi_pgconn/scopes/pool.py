"""Pool scope: at most ``pool_size`` connections shared by a process's threads."""

from __future__ import annotations

import threading
import time
from typing import Any

from .base import PooledConnection, Registry

__all__ = ["PoolRegistry"]


class PoolRegistry(Registry):
    """At most ``pool_size`` connections shared by a process's threads.

    A request that finds none free waits up to ``pool_timeout`` seconds, then
    gets the driver's :class:`~wsgi_pgconn.errors.PoolTimeout`. The most
    recently returned connection is handed out first, so surplus ones age out.
    No threads of its own.
    """

    scope = "pool"

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[PooledConnection] = []
        self._busy: set[PooledConnection] = set()
        self._opening = 0
        #: Requests waiting for a connection now.
        self._waiting = 0

    def checkout(self) -> PooledConnection:
        settings = self.settings
        deadline: float | None = None
        waited_from: float | None = None
        with self._cond:
            while True:
                if self._idle:
                    rec = self._idle.pop()
                    self._busy.add(rec)
                    rec.in_use = True
                    fresh = False
                    break
                if len(self._busy) + self._opening < settings.pool_size:
                    self._opening += 1
                    fresh = True
                    break
                now = time.monotonic()
                if deadline is None:
                    deadline = now + settings.pool_timeout
                    waited_from = now
                    self._waiting += 1
                    self.stats_counter.incr("pool_waits")
                remaining = deadline - now
                if remaining <= 0:
                    self._waiting -= 1
                    self.stats_counter.incr("pool_timeouts")
                    self.stats_counter.incr("pool_wait_seconds", now - (waited_from or now))
                    raise self.driver.PoolTimeout(
                        f"no connection became free within {settings.pool_timeout:g}s: all "
                        f"{settings.pool_size} are in use (raise WSGI_PGCONN_POOL_SIZE or "
                        "WSGI_PGCONN_POOL_TIMEOUT, or find the slow requests)"
                    )
                try:
                    self._cond.wait(remaining)
                except BaseException:
                    self._waiting -= 1
                    raise
        if waited_from is not None:
            with self._cond:
                self._waiting -= 1
            self.stats_counter.incr("pool_wait_seconds", time.monotonic() - waited_from)
        if not fresh:
            if self._ready(rec):
                rec.uses += 1
                return rec
            reason = self._unusable(rec)
            if reason is None:
                rec.uses += 1
                return rec
            self._discard(rec, reason)
            with self._cond:
                self._busy.discard(rec)
                self._opening += 1
        try:
            rec = self._open()
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        rec.in_use = True
        with self._cond:
            self._opening -= 1
            self._busy.add(rec)
        return rec

    def checkin(self, rec: PooledConnection, used: bool) -> None:
        reason: str | None = "broken"
        try:
            reason = self._reset(rec, used)
        finally:
            rec.in_use = False
            with self._cond:
                self._busy.discard(rec)
                if reason is None:
                    self._idle.append(rec)
                self._cond.notify()
            if reason is not None:
                self._discard(rec, reason)

    def _records(self) -> list[PooledConnection]:
        with self._cond:
            return [*self._idle, *self._busy]

    def stats(self) -> dict[str, Any]:
        result = super().stats()
        result.update(pool_max=self.settings.pool_size, waiting=self._waiting)
        return result

    def occupancy(self) -> tuple[int, int, int]:
        # Without the lock (an observer may be called with it held): len() is atomic.
        return len(self._busy), len(self._idle), self._waiting

    def _forget(self) -> None:
        with self._cond:
            self._idle.clear()
            self._busy.clear()
