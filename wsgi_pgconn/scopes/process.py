"""Process scope: one connection per process, for servers that run one request at a time."""

from __future__ import annotations

import threading

from ..errors import ConfigurationError
from .base import PooledConnection, Registry

__all__ = ["ProcessRegistry"]


class ProcessRegistry(Registry):
    """One connection per process, for servers with one thread per process.

    Two requests at once in one process raise
    :class:`~wsgi_pgconn.errors.ConfigurationError` (the second one).
    """

    scope = "process"

    def _init_state(self) -> None:
        super()._init_state()
        self._lock = threading.Lock()
        self._rec: PooledConnection | None = None

    def checkout(self) -> PooledConnection:
        if not self._lock.acquire(blocking=False):
            raise ConfigurationError(
                "WSGI_PGCONN_SCOPE=process: two requests ran at once in one process. This scope "
                "is for servers with one thread per process; choose WSGI_PGCONN_SCOPE=thread "
                "or pool for a multi-threaded server"
            )
        try:
            rec = self._rec
            if rec is not None:
                reason = self._unusable(rec)
                if reason is None:
                    rec.in_use = True
                    rec.uses += 1
                    return rec
                self._rec = None
                self._discard(rec, reason)
            rec = self._rec = self._open()
            rec.in_use = True
            return rec
        except BaseException:
            self._lock.release()
            raise

    def checkin(self, rec: PooledConnection, used: bool) -> None:
        try:
            reason = self._reset(rec, used)
            rec.in_use = False
            if reason is not None:
                if self._rec is rec:
                    self._rec = None
                self._discard(rec, reason)
        finally:
            self._lock.release()

    def _records(self) -> list[PooledConnection]:
        rec = self._rec
        return [] if rec is None else [rec]

    _held = _records

    def _take_idle(self) -> list[PooledConnection]:
        if not self._lock.acquire(blocking=False):
            return []  # a request holds it
        try:
            rec, self._rec = self._rec, None
        finally:
            self._lock.release()
        return [] if rec is None else [rec]

    def _forget(self) -> None:
        self._rec = None
