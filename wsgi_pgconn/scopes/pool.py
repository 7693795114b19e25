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
    gets the driver's :class:`~wsgi_pgconn.errors.PoolTimeout`. A request that
    cannot open a new connection (the server refuses one more, or the connect
    back-off is on) waits the same way for one of the connections other
    requests hold, as psycopg_pool's clients do; it fails at once only when the
    pool holds none (the driver's OperationalError, or
    :class:`~wsgi_pgconn.errors.ConnectBackoff`). The most recently returned
    connection is handed out first, so surplus ones age out. No threads of its own.
    """

    scope = "pool"

    def _init_state(self) -> None:
        super()._init_state()
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[PooledConnection] = []
        self._busy: set[PooledConnection] = set()
        self._opening = 0
        self._waiting = 0  # requests in cond.wait() now

    def checkout(self) -> PooledConnection:
        cond = self._cond
        with cond:
            idle = self._idle
            rec = idle.pop() if idle else None
            if rec is not None:
                self._busy.add(rec)
                rec.in_use = True
        if rec is None:
            return self._wait_or_open(False)
        if self._ready(rec):
            rec.uses += 1
            return rec
        reason = self._unusable(rec)
        if reason is None:
            rec.uses += 1
            return rec
        self._discard(rec, reason)
        with cond:
            self._busy.discard(rec)
            self._opening += 1  # its place is this request's to fill
        return self._wait_or_open(True)

    def _wait_or_open(self, reserved: bool) -> PooledConnection:
        """No idle connection: open one while the pool may grow, else wait for one.

        ``reserved``: this request already holds a place to open a connection in.
        """
        settings = self.settings
        cond = self._cond
        stats = self.stats_counter
        deadline = time.monotonic() + settings.pool_timeout
        waited_from: float | None = None
        try:
            while True:
                rec: PooledConnection | None = None
                if not reserved:
                    with cond:
                        while True:
                            if self._idle:
                                rec = self._idle.pop()
                                self._busy.add(rec)
                                rec.in_use = True
                                break
                            room = len(self._busy) + self._opening < settings.pool_size
                            backoff = self._backoff_left() if room else 0.0
                            if room and (backoff <= 0 or not (self._busy or self._opening)):
                                # Free to connect, or backing off with nothing to wait
                                # for (_open raises ConnectBackoff at once).
                                self._opening += 1
                                break
                            now = time.monotonic()
                            if waited_from is None:
                                waited_from = now
                                stats.incr("pool_waits")
                            remaining = deadline - now
                            if remaining <= 0:
                                stats.incr("pool_timeouts")
                                raise self.driver.PoolTimeout(self._timeout_message())
                            self._waiting += 1
                            try:
                                cond.wait(min(remaining, backoff) if room else remaining)
                            finally:
                                self._waiting -= 1
                    if rec is not None:
                        if self._ready(rec):
                            rec.uses += 1
                            return rec
                        reason = self._unusable(rec)
                        if reason is None:
                            rec.uses += 1
                            return rec
                        self._discard(rec, reason)
                        with cond:
                            self._busy.discard(rec)
                            self._opening += 1
                try:
                    rec = self._open()
                except self.driver.OperationalError:
                    with cond:
                        self._opening -= 1
                        cond.notify()
                        others = bool(self._busy or self._idle) or self._opening > 0
                    if others:
                        # The pool holds live connections (or is opening one): take
                        # one that is idle, or wait (up to pool_timeout) for one.
                        reserved = False
                        continue
                    raise
                except BaseException:
                    with cond:
                        self._opening -= 1
                        cond.notify()
                    raise
                rec.in_use = True
                with cond:
                    self._opening -= 1
                    self._busy.add(rec)
                return rec
        finally:
            if waited_from is not None:
                stats.incr("pool_wait_seconds", time.monotonic() - waited_from)

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

    def _forget(self) -> None:
        with self._cond:
            self._idle.clear()
            self._busy.clear()

    def stats(self) -> dict[str, Any]:
        result = super().stats()
        result["pool_max"] = self.settings.pool_size
        result["waiting"] = self._waiting
        return result
