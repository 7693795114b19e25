"""Connection registries: which live connection a request gets (the scope).

* :class:`ThreadRegistry` keeps one connection per thread.
* :class:`ProcessRegistry` keeps one connection per process (one thread only).
* :class:`PoolRegistry` shares at most ``pool_size`` connections between threads.

They share :class:`Registry`, which opens connections, decides at checkout
whether a kept connection is still usable without talking to the server,
resets it at checkin, forgets connections inherited through ``fork()``, and
keeps :class:`Stats`.

A connection is checked at checkout in this order, cheapest first; the first
failing test discards it (the reason is counted and logged):

``forked``
    opened by another process (we are a forked child): never used, never closed.
``dead``
    closed, or its socket is readable while idle (a terminated backend or a
    restarted server sends a message and closes; a healthy idle connection
    receives nothing), or a round-trip check failed.
``too_old`` / ``idle_too_long``
    past ``max_age`` (minus up to 10% jitter) or idle longer than ``max_idle``.
``broken``
    left in a transaction or an unknown state.
``retired``
    opened before a request found the server read-only (SQLSTATE 25006, a
    failover): every such connection is replaced, not just re-checked.

A connection that breaks during a request makes the others suspect: the
registry's generation moves on, and a connection opened in an earlier
generation gets one round-trip check at its next checkout.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import random
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions as ext

from . import connection as _connection
from .config import Settings
from .connection import ManagedConnection
from .errors import ConfigurationError, PoolTimeout, first_line

__all__ = ["PoolRegistry", "PooledConnection", "ProcessRegistry", "Registry", "ThreadRegistry"]

logger = logging.getLogger("wsgi_pgconn")

_IDLE = ext.TRANSACTION_STATUS_IDLE
_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_INERROR = ext.TRANSACTION_STATUS_INERROR

DISCARD_REASONS = ("dead", "too_old", "idle_too_long", "forked", "broken", "retired")

# Bumped in a forked child. A connection remembers the epoch (and pid) it was
# opened in; one from an earlier epoch belongs to the parent.
_fork_epoch = 0
# Connections inherited by a forked child. Closing one would send Terminate on
# the socket the parent still uses, and so would garbage collection: keep them.
_inherited: list[object] = []
_registries: weakref.WeakSet[Registry] = weakref.WeakSet()


class PooledConnection:
    """A live connection and what the registry knows about it."""

    __slots__ = (
        "backend_pid",
        "conn",
        "epoch",
        "expires_at",
        "generation",
        "in_use",
        "last_used",
        "opened_at",
        "pid",
        "poller",
        "uses",
    )

    def __init__(self, conn: ManagedConnection, generation: int, max_age: float | None) -> None:
        now = time.monotonic()
        self.conn = conn
        self.pid = os.getpid()
        self.epoch = _fork_epoch
        self.generation = generation
        self.opened_at = now
        self.last_used = now
        # Up to 10% earlier, so a process's connections don't all reconnect at once.
        self.expires_at = None if max_age is None else now + max_age * (1 - 0.1 * random.random())  # noqa: S311
        self.in_use = False
        self.uses = 0  # checkouts after the first, counted by whoever holds it
        self.backend_pid: int = conn.info.backend_pid
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)


class Stats:
    """Counters shared by a registry and its middleware (see :meth:`Registry.stats`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, float] = dict.fromkeys(
            (
                "opened",
                "reused",  # by connections no longer held; live ones add their own
                "connect_errors",
                "commits",
                "rollbacks",
                "vetoes",
                "commit_errors",
                "retries",
                "pool_waits",
                "pool_wait_seconds",
                "pool_timeouts",
            ),
            0,
        )
        self.discarded: dict[str, int] = dict.fromkeys(DISCARD_REASONS, 0)

    def incr(self, key: str, amount: float = 1) -> None:
        with self._lock:
            self.counts[key] += amount

    def discard(self, reason: str | None, uses: int) -> None:
        """A connection left the registry (``reason`` None: closed at thread end or exit)."""
        with self._lock:
            if reason is not None:
                self.discarded[reason] += 1
            self.counts["reused"] += uses


class Registry:
    """Opens, checks, resets and closes connections; subclasses decide who gets which."""

    scope = ""

    def __init__(
        self,
        settings: Settings,
        *,
        configure: Callable[[ManagedConnection], object] | None = None,
    ) -> None:
        self.settings = settings
        self._configure = configure
        self._dsn = _connection.connect_params(settings, os.environ)
        self._generation = 0
        self._retire_below = 0
        self._idle_check = settings.check == "socket"
        self.stats_counter = Stats()
        self._init_state()
        _registries.add(self)
        _subscribe_shutdown()

    # -- what subclasses provide ---------------------------------------------

    def _init_state(self) -> None:
        """(Re)create per-process state: called at construction and in a forked child."""
        raise NotImplementedError

    def checkout(self) -> PooledConnection:
        """A usable connection, reserved for the caller until :meth:`checkin`."""
        raise NotImplementedError

    def checkin(self, rec: PooledConnection, *, used: bool) -> None:
        """Give back a connection; ``used`` says whether the request ran a transaction."""
        raise NotImplementedError

    def _records(self) -> list[PooledConnection]:
        """Every connection this registry holds (for stats and close_all)."""
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop every record without closing (used after fork and by close_all)."""
        raise NotImplementedError

    # -- shared mechanics ------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters; the keys are documented in README.md."""
        counter = self.stats_counter
        records = self._records()
        with counter._lock:
            result: dict[str, Any] = dict(counter.counts)
            result["discarded"] = dict(counter.discarded)
        result["reused"] += sum(rec.uses for rec in records)
        in_use = sum(1 for rec in records if rec.in_use)
        result.update(
            scope=self.scope,
            generation=self._generation,
            in_use=in_use,
            idle=len(records) - in_use,
        )
        return result

    def suspect_all(self) -> None:
        """A connection broke: re-check every connection opened before now."""
        self._generation += 1

    def retire_all(self) -> None:
        """The server turned read-only (failover): replace every connection opened before now."""
        self._generation += 1
        self._retire_below = self._generation

    def _open(self) -> PooledConnection:
        try:
            conn = _connection.open_connection(self._dsn, self.settings, self._configure)
        except psycopg2.OperationalError as exc:
            self.stats_counter.incr("connect_errors")
            logger.warning("cannot connect to PostgreSQL: %s", first_line(exc))
            raise
        rec = PooledConnection(conn, self._generation, self.settings.max_age)
        self.stats_counter.incr("opened")
        logger.debug("opened connection, backend pid %s", rec.backend_pid)
        return rec

    def _unusable(self, rec: PooledConnection) -> str | None:
        """Why ``rec`` must not serve a request, or None. No round trip unless suspect."""
        if rec.epoch != _fork_epoch or rec.pid != os.getpid():
            # The pid too: uWSGI forks in C without running os.register_at_fork hooks.
            return "forked"
        if rec.generation < self._retire_below:
            return "retired"
        conn = rec.conn
        if conn.closed:
            return "dead"
        now = time.monotonic()
        if rec.expires_at is not None and now >= rec.expires_at:
            return "too_old"
        max_idle = self.settings.max_idle
        if max_idle is not None and now - rec.last_used > max_idle:
            return "idle_too_long"
        if conn.get_transaction_status() != _IDLE:
            return "broken"
        if rec.poller.poll(0) and not _drain(rec):
            return "dead"
        if rec.generation < self._generation or not self._idle_check:
            try:
                _connection.ping(conn)
            except psycopg2.Error:
                return "dead"
            rec.generation = self._generation
        return None

    def _discard(self, rec: PooledConnection, reason: str) -> None:
        self.stats_counter.discard(reason, rec.uses)
        level = logging.DEBUG if reason in ("too_old", "idle_too_long") else logging.WARNING
        logger.log(level, "discarding connection to backend pid %s: %s", rec.backend_pid, reason)
        _close_quietly(rec)

    def _reset(self, rec: PooledConnection, used: bool) -> str | None:
        """Make ``rec`` ready for the next request; the reason to discard it instead, or None."""
        conn = rec.conn
        if conn.closed:
            self.suspect_all()
            return "broken"
        if rec.generation < self._retire_below:
            return "retired"
        _base = ext.connection
        try:
            status = conn.get_transaction_status()
            if status == _IDLE:
                _connection.resync(conn)  # psycopg2 may still believe a transaction is open
            elif status in (_INTRANS, _INERROR):
                logger.warning(
                    "rolling back a transaction left open on backend pid %s", rec.backend_pid
                )
                _base.rollback(conn)
            elif status != _IDLE:
                return "broken"
            if _base.autocommit.__get__(conn):  # type: ignore[attr-defined]
                _base.autocommit.__set__(conn, False)  # type: ignore[attr-defined]
            if used and self.settings.reset == "discard":
                _connection.execute_autocommit(conn, [("DISCARD ALL", None)])
                _connection.setup(conn, self.settings, self._configure)
        except psycopg2.Error as exc:
            logger.warning(
                "resetting connection to backend pid %s failed: %s",
                rec.backend_pid,
                first_line(exc),
            )
            if conn.closed:
                self.suspect_all()
            return "broken"
        rec.last_used = time.monotonic()
        return None

    def close_all(self) -> None:
        """Close every connection this process opened (at exit); inherited ones are kept."""
        records = self._records()
        self._forget()
        for rec in records:
            self.stats_counter.discard(None, rec.uses)
            _close_quietly(rec)


class ThreadRegistry(Registry):
    """One connection per thread, reused by every request on that thread."""

    scope = "thread"

    def _init_state(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: set[PooledConnection] = set()

    def checkout(self) -> PooledConnection:
        slot: _ThreadSlot | None = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _ThreadSlot(self)
        rec = slot.rec
        if rec is not None and rec.in_use:
            # An earlier response on this thread was never closed; collecting it
            # rolls it back and releases the connection (RequestTransaction.__del__).
            gc.collect()
        if rec is not None:
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

    def checkin(self, rec: PooledConnection, *, used: bool) -> None:
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
        self.stats_counter.discard(None, rec.uses)
        _close_quietly(rec)

    def _records(self) -> list[PooledConnection]:
        with self._lock:
            return list(self._all)

    def _forget(self) -> None:
        with self._lock:
            self._all.clear()
        self._local = threading.local()


class _ThreadSlot:
    """Lives in a thread-local; when the thread ends it goes, and closes the connection.

    Servers that start a thread per request (werkzeug's and Django's
    development servers) thus get one connection per request, not a leak.
    """

    __slots__ = ("__weakref__", "rec", "registry")

    def __init__(self, registry: ThreadRegistry) -> None:
        self.registry = weakref.ref(registry)
        self.rec: PooledConnection | None = None

    def __del__(self) -> None:
        rec, registry = self.rec, self.registry()
        if rec is not None and registry is not None:
            with contextlib.suppress(Exception):  # nothing to be done in a dying thread
                registry._thread_ended(rec)


class ProcessRegistry(Registry):
    """One connection per process, for servers that run one request at a time."""

    scope = "process"

    def _init_state(self) -> None:
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

    def checkin(self, rec: PooledConnection, *, used: bool) -> None:
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

    def _forget(self) -> None:
        self._rec = None


class PoolRegistry(Registry):
    """At most ``pool_size`` connections shared by a process's threads.

    A request that finds none free waits up to ``pool_timeout`` seconds, then
    gets :class:`~wsgi_pgconn.errors.PoolTimeout`. The most recently returned
    connection is handed out first, so surplus ones age out. No threads of its own.
    """

    scope = "pool"

    def _init_state(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._idle: list[PooledConnection] = []
        self._busy: set[PooledConnection] = set()
        self._opening = 0

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
                    self.stats_counter.incr("pool_waits")
                remaining = deadline - now
                if remaining <= 0:
                    self.stats_counter.incr("pool_timeouts")
                    self.stats_counter.incr("pool_wait_seconds", now - (waited_from or now))
                    raise PoolTimeout(
                        f"no connection became free within {settings.pool_timeout:g}s: all "
                        f"{settings.pool_size} are in use (raise WSGI_PGCONN_POOL_SIZE or "
                        "WSGI_PGCONN_POOL_TIMEOUT, or find the slow requests)"
                    )
                self._cond.wait(remaining)
        if waited_from is not None:
            self.stats_counter.incr("pool_wait_seconds", time.monotonic() - waited_from)
        if not fresh:
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

    def checkin(self, rec: PooledConnection, *, used: bool) -> None:
        try:
            reason = self._reset(rec, used)
        except BaseException:
            reason = "broken"
            raise
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


REGISTRIES: dict[str, type[Registry]] = {
    cls.scope: cls for cls in (ThreadRegistry, ProcessRegistry, PoolRegistry)
}


def _drain(rec: PooledConnection) -> bool:
    """Read what arrived on an idle connection; True if it is still alive.

    A NOTIFY for a LISTEN left by an earlier request is harmless. A terminated
    backend sends an error (FATAL, which libpq files as a notice on an idle
    connection) and then closes; the close may not have arrived yet, so any
    new notice means dead.
    """
    conn = rec.conn
    notices = conn.notices
    count, last = len(notices), notices[-1] if notices else None
    try:
        conn.poll()
    except psycopg2.Error:
        return False
    # Notifications for a LISTEN left by an earlier request have no reader.
    del conn.notifies[:-100]
    if len(notices) != count or (notices and notices[-1] is not last):
        return False
    return not conn.closed and not rec.poller.poll(0)


def _close_quietly(rec: PooledConnection) -> None:
    if rec.pid != os.getpid():
        # Inherited through fork(): closing would send Terminate on the
        # parent's socket, and so would garbage collection. Keep it.
        _inherited.append(rec.conn)
        return
    try:
        ext.connection.close(rec.conn)
    except Exception as exc:  # a dead socket must not stop the caller's cleanup
        logger.debug("closing backend pid %s failed: %s", rec.backend_pid, exc)


def _after_fork_in_child() -> None:
    global _fork_epoch
    _fork_epoch += 1
    for registry in list(_registries):
        # Keep the parent's records referenced (without taking locks, which a
        # thread that no longer exists may hold), then start afresh.
        _inherited.append(dict(vars(registry)))
        registry._init_state()
        registry.stats_counter = Stats()


def _close_all_registries(*_args: object, **_kwargs: object) -> None:
    for registry in list(_registries):
        registry.close_all()


_shutdown_subscribed = False


def _subscribe_shutdown() -> None:
    """Close connections cleanly when the process exits (atexit; mod_wsgi's shutdown event)."""
    global _shutdown_subscribed
    if _shutdown_subscribed:
        return
    _shutdown_subscribed = True
    atexit.register(_close_all_registries)
    try:
        import mod_wsgi  # type: ignore[import-not-found]  # only inside mod_wsgi
    except ImportError:
        return
    subscribe = getattr(mod_wsgi, "subscribe_shutdown", None)
    if subscribe is not None:
        subscribe(_close_all_registries)


os.register_at_fork(after_in_child=_after_fork_in_child)
