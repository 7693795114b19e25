"""What every scope shares: opening, checking, resetting and closing connections.

A connection is checked at checkout in this order, cheapest first; the first
failing test discards it (the reason is counted and logged):

``forked``
    opened by another process (we are a forked child): never used, never closed
    (logged at DEBUG: it is what a preforking server does), except one opened
    by the uWSGI master, which serves no requests: closed cleanly (see
    :func:`_uwsgi_post_fork`).
``retired``
    opened before a request found the server read-only (a failover): every
    such connection is replaced, not just re-checked.
``dead``
    closed, or its socket is readable while idle (a terminated backend or a
    restarted server sends a message and closes; a healthy idle connection
    receives nothing), or a round-trip check failed.
``too_old`` / ``idle_too_long``
    past ``max_age`` (minus up to 10% jitter) or idle longer than ``max_idle``.
``broken``
    left in a transaction or an unknown state.

A connection that breaks during a request makes the others suspect: the
registry's generation moves on, and a connection opened in an earlier
generation gets one round-trip check at its next checkout.

Observers (:func:`set_observer`, used by the Prometheus exporter) hear about
the rare events as they happen (a connection opened or discarded, a pool
wait, a failed COMMIT: every :class:`Stats` counter) and about each checkout
and checkin. Without an observer nothing of this runs: the registry's own
``checkout`` and ``checkin`` are called as they are; with one they are
replaced, on the instance, by versions that report.

A failed connect starts a **back-off**: for a short, growing, jittered delay
(:attr:`Registry.connect_backoff_first` doubled per failure, at most
:attr:`Registry.connect_backoff_max`) no connection is attempted and a request
that needs one gets :class:`~wsgi_pgconn.errors.ConnectBackoff` at once; after
it, one request at a time tries again until one succeeds. The first failure of
a run is logged (ERROR with the fix for a permanent one: a wrong password, a
missing database or role), the repeats only at DEBUG, with a reminder every
minute while it lasts.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import select
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .. import connection as _connection
from .. import green
from ..config import Settings
from ..drivers import ACTIVE, IDLE, INERROR, INTRANS, Driver
from ..errors import first_line
from . import _connect

__all__ = [
    "DISCARD_REASONS",
    "Observer",
    "PooledConnection",
    "Registry",
    "Stats",
    "set_observer",
]

logger = logging.getLogger("wsgi_pgconn")

DISCARD_REASONS = ("dead", "too_old", "idle_too_long", "forked", "broken", "retired")

# Bumped in a forked child. A connection remembers the epoch (and pid) it was
# opened in; one from an earlier epoch belongs to the parent.
_fork_epoch = 0
# Connections inherited by a forked child. Closing one would send Terminate on
# the socket the parent still uses, and so would garbage collection: keep them.
_inherited: list[object] = []
_registries: weakref.WeakSet[Registry] = weakref.WeakSet()
#: The observer of every registry of this process (see set_observer), or None.
_observer: Observer | None = None

_getpid = os.getpid


class PooledConnection:
    """A live connection and what the registry knows about it."""

    __slots__ = (
        "backend_pid",
        "commits",
        "conn",
        "epoch",
        "expires_at",
        "generation",
        "in_use",
        "last_used",
        "observed",
        "opened_at",
        "pid",
        "poller",
        "rollbacks",
        "uses",
    )

    def __init__(
        self, conn: Any, backend_pid: int, fileno: int, generation: int, max_age: float | None
    ) -> None:
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
        # Counted by whoever holds the connection (no lock); summed by stats().
        self.uses = 0  # checkouts after the first
        self.commits = 0
        self.rollbacks = 0
        self.backend_pid = backend_pid
        #: (checked out at, commits, rollbacks) while an observer watches, else None.
        self.observed: tuple[float, int, int] | None = None
        # The unpatched poll: a monkey-patched poll(0) yields to other greenlets.
        self.poller = green.unpatched_poll()()
        self.poller.register(fileno, select.POLLIN)


class Observer(Protocol):
    """What :func:`set_observer` takes: told about a registry's events as they happen.

    Each method may be called from any thread, and with the registry's locks
    held: it must be quick and must not call the registry except
    :meth:`Registry.occupancy`. An exception it raises is logged and ignored.
    """

    def attached(self, registry: Registry) -> None:
        """``registry`` reports to this observer from now on."""

    def count(self, registry: Registry, key: str, amount: float) -> None:
        """A counter of ``registry.stats()`` moved by ``amount`` (a rare event).

        ``opened``, ``connect_errors``, ``vetoes``, ``commit_errors``,
        ``retries``, ``pool_waits`` (a wait began), ``pool_wait_seconds`` (a
        wait ended, after ``amount`` seconds), ``pool_timeouts``, and
        ``commits``/``rollbacks`` of transactions ended after their request
        gave its connection back.
        """

    def discarded(self, registry: Registry, reason: str | None) -> None:
        """A connection left the registry: discarded for ``reason``, or closed (None)."""

    def checked_out(self, registry: Registry, reused: bool) -> None:
        """A request got a connection: a kept one (``reused``), or one just opened."""

    def checked_in(
        self, registry: Registry, held: float, commits: int, rollbacks: int
    ) -> None:
        """A request gave its connection back after ``held`` seconds.

        ``commits`` and ``rollbacks``: the transactions it ended each way (0 and 0
        for a request that ran none).
        """


def _notify(method: str, registry: Registry, *args: Any) -> None:
    """Call the observer's ``method``; an observer that fails must not fail the request."""
    observer = registry.observer
    if observer is None:
        return
    try:
        getattr(observer, method)(registry, *args)
    except Exception:
        logger.exception("wsgi_pgconn observer %r failed in %s()", observer, method)


class Stats:
    """Counters of rare events, shared by a registry and its middleware (see Registry.stats).

    The per-request counts (reused, commits, rollbacks) are kept on each
    :class:`PooledConnection` by its holder, without a lock, and added here
    when it leaves the registry.
    """

    #: The registry whose observer hears about every change (set while one watches).
    registry: Registry | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, float] = dict.fromkeys(
            (
                "opened",
                "reused",
                "connect_errors",
                "commits",
                "rollbacks",
                "vetoes",
                "commit_errors",
                "retries",
                "connect_backoffs",
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
        if self.registry is not None:
            _notify("count", self.registry, key, amount)

    def discard(self, reason: str | None, rec: PooledConnection) -> None:
        """``rec`` left the registry (``reason`` None: closed at thread end or exit)."""
        with self._lock:
            if reason is not None:
                self.discarded[reason] += 1
            counts = self.counts
            counts["reused"] += rec.uses
            counts["commits"] += rec.commits
            counts["rollbacks"] += rec.rollbacks
        if self.registry is not None:
            _notify("discarded", self.registry, reason)


class Registry:
    """Opens, checks, resets and closes connections; subclasses decide who gets which."""

    scope = ""
    #: Told about this registry's events (see set_observer); None: nobody listens.
    observer: Observer | None = None
    #: Seconds of back-off after the first failed connect of a run (doubled per failure).
    connect_backoff_first = 0.1
    #: The longest back-off, in seconds. Each delay is drawn between half and all of its value.
    connect_backoff_max = 0.5

    def __init__(
        self,
        settings: Settings,
        driver: Driver,
        *,
        configure: Callable[[Any], object] | None = None,
        greenlets: green.Greenlets | None = None,
    ) -> None:
        self.settings = settings
        self.driver = driver
        self._configure = configure
        #: The greenlet library this registry cooperates with (None: threads).
        self.greenlets = greenlets
        self._conninfo = _connection.connect_params(settings, os.environ, driver)
        self._conninfo_pid = os.getpid()
        #: The statements that begin a request's transaction (see drivers.ManagedState).
        self.begin = _connection.begin_statements(settings)
        self._generation = 0
        self._retire_below = 0
        self._idle_check = settings.check == "socket"
        self._status = driver.transaction_status
        self._timed = settings.max_age is not None or settings.max_idle is not None
        self._discard_used = settings.reset == "discard"
        #: Whether a checkout needs more than the socket, status and pid checks.
        self._thorough = self._timed or not self._idle_check
        #: Whether to log a DEBUG line per request (decided when the registry starts).
        self.debug = logger.isEnabledFor(logging.DEBUG)
        self.stats_counter = Stats()
        self._init_state()
        _registries.add(self)
        _subscribe_shutdown()
        if _observer is not None:
            self._observe(_observer)

    # -- what subclasses provide ---------------------------------------------

    def _init_state(self) -> None:
        """(Re)create per-process state: called at construction and in a forked child.

        Subclasses extend it (and call this first).
        """
        #: The connect back-off: consecutive failed connects, no attempt before
        #: ``_retry_at`` (time.monotonic()), and whether one request is trying now.
        self._connect_lock = threading.Lock()
        self._connect_failures = 0
        self._retry_at = 0.0
        self._probing = False
        self._recovered_at = 0.0  # time.monotonic() when the last back-off ended
        self._connect_log = _connect.FailureLog()

    def checkout(self) -> PooledConnection:
        """A usable connection, reserved for the caller until :meth:`checkin`."""
        raise NotImplementedError

    def checkin(self, rec: PooledConnection, used: bool) -> None:
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
        for rec in records:
            result["reused"] += rec.uses
            result["commits"] += rec.commits
            result["rollbacks"] += rec.rollbacks
        in_use = sum(1 for rec in records if rec.in_use)
        result.update(
            scope=self.scope,
            driver=self.driver.name,
            generation=self._generation,
            in_use=in_use,
            idle=len(records) - in_use,
            pool_max=None,
            waiting=0,
        )
        return result

    def occupancy(self) -> tuple[int, int, int]:
        """``(in use, idle, waiting)`` now: connections held by requests, kept idle, and
        requests waiting for a connection (pool scope). Cheap enough for an observer."""
        records = self._records()
        in_use = sum(1 for rec in records if rec.in_use)
        return in_use, len(records) - in_use, 0

    # -- observers (see set_observer) -------------------------------------------------

    def _observe(self, observer: Observer | None) -> None:
        """Report this registry's events to ``observer`` from now on (None: stop)."""
        self.observer = observer
        self.stats_counter.registry = None if observer is None else self
        if observer is None:
            # The class's own checkout and checkin again: nothing is added per request.
            self.__dict__.pop("checkout", None)
            self.__dict__.pop("checkin", None)
            return
        cls = type(self)
        clock = time.monotonic

        def observed_checkout() -> PooledConnection:
            rec = cls.checkout(self)
            rec.observed = (clock(), rec.commits, rec.rollbacks)
            _notify("checked_out", self, rec.uses > 0)  # uses: checkouts after the first
            return rec

        def observed_checkin(rec: PooledConnection, used: bool) -> None:
            seen, rec.observed = rec.observed, None
            try:
                cls.checkin(self, rec, used)
            finally:
                if seen is not None:
                    since, commits, rollbacks = seen
                    _notify(
                        "checked_in",
                        self,
                        clock() - since,
                        rec.commits - commits,
                        rec.rollbacks - rollbacks,
                    )

        self.checkout = observed_checkout  # type: ignore[method-assign]
        self.checkin = observed_checkin  # type: ignore[method-assign]
        _notify("attached", self)

    def suspect_all(self) -> None:
        """A connection broke: re-check every connection opened before now."""
        self._generation += 1

    def retire_all(self) -> None:
        """The server turned read-only (failover): replace every connection opened before now."""
        self._generation += 1
        self._retire_below = self._generation

    def _open(self) -> PooledConnection:
        """A new connection; raises the driver's OperationalError or ConnectBackoff."""
        driver = self.driver
        if self._conninfo_pid != os.getpid():  # application_name carries the opener's pid
            self._conninfo = _connection.connect_params(self.settings, os.environ, driver)
            self._conninfo_pid = os.getpid()
        probing = self._may_connect() if self._connect_failures else False
        started = time.monotonic()
        try:
            conn = driver.connect(self._conninfo, self.settings, self._configure)
        except driver.OperationalError as exc:
            self.stats_counter.incr("connect_errors")
            self._connect_failed(exc, probing, started)
            raise
        except BaseException:
            if probing:
                with self._connect_lock:
                    self._probing = False
            raise
        rec = PooledConnection(
            conn,
            driver.backend_pid(conn),
            driver.fileno(conn),
            self._generation,
            self.settings.max_age,
        )
        self.stats_counter.incr("opened")
        if probing:  # not an attempt that began before the failures: those prove little
            self._connected()
        logger.debug("opened connection, backend pid %s", rec.backend_pid)
        return rec

    # -- the connect back-off (rare paths: only after a failed connect) ------------

    def _backoff_left(self) -> float:
        """Seconds until a connect may be tried (0: now); an estimate, without the lock."""
        if not self._connect_failures:
            return 0.0
        left = self._retry_at - time.monotonic()
        if left <= 0 and self._probing:
            return self.connect_backoff_first / 2  # one request is trying: look again soon
        return max(left, 0.0)

    def _may_connect(self) -> bool:
        """After failed connects: let this request try (True), or raise ConnectBackoff."""
        with self._connect_lock:
            failures = self._connect_failures
            if not failures:
                return False
            left = self._retry_at - time.monotonic()
            if left <= 0 and not self._probing:
                self._probing = True
                return True
            self._connect_log.backed_off()
            why = (
                "another request is trying to connect now"
                if left <= 0
                else f"the next attempt is in {left:.2f}s"
            )
        raise self.driver.ConnectBackoff(
            f"not connecting to PostgreSQL: {failures} attempt(s) in a row failed, the last "
            f"with: {self._connect_log.last}; {why}"
        )

    def _connect_failed(self, exc: BaseException, probing: bool, started: float) -> None:
        """A connect that began at ``started`` (time.monotonic()) failed: back off.

        Not when a back-off ended after it began (a connect tried after the
        back-off succeeded: a failover or a restart is over, and this attempt
        went to the old server); backing off again would answer 503 after the
        switch. Attempts that fail together with others that succeed (a full
        server) do count.
        """
        with self._connect_lock:
            if probing:
                self._probing = False
            if started >= self._recovered_at:
                self._connect_failures += 1
                failures = self._connect_failures
                step = self.connect_backoff_first * 2 ** min(failures - 1, 16)
                delay = min(self.connect_backoff_max, step) * (0.5 + 0.5 * random.random())  # noqa: S311
                self._retry_at = time.monotonic() + delay
            record = self._connect_log.failed(exc, self.settings, os.environ)
        logger.log(record[0], "%s", record[1])

    def _connected(self) -> None:
        with self._connect_lock:
            failures, self._connect_failures = self._connect_failures, 0
            self._probing = False
            self._recovered_at = time.monotonic()
            record = self._connect_log.recovered(failures)
        logger.log(record[0], "%s", record[1])

    def _ready(self, rec: PooledConnection) -> bool:
        """The checks of :meth:`_unusable` that pass for a healthy connection, inlined.

        (The scopes repeat this expression in their checkout, where a call costs.)
        """
        return (
            rec.pid == _getpid()
            and rec.generation >= self._generation
            and not self._thorough
            and self._status(rec.conn) == IDLE
            and not rec.poller.poll(0)
            and not rec.conn.closed
        )

    def _unusable(self, rec: PooledConnection) -> str | None:
        """Why ``rec`` must not serve a request, or None. No round trip unless suspect."""
        if rec.epoch != _fork_epoch or rec.pid != _getpid():
            # The pid too: uWSGI forks in C without running os.register_at_fork hooks.
            return "forked"
        if rec.generation < self._retire_below:
            return "retired"
        conn = rec.conn
        if conn.closed:
            return "dead"
        if self._timed:
            now = time.monotonic()
            if rec.expires_at is not None and now >= rec.expires_at:
                return "too_old"
            max_idle = self.settings.max_idle
            if max_idle is not None and now - rec.last_used > max_idle:
                return "idle_too_long"
        if self._status(conn) != IDLE:
            return "broken"
        if rec.poller.poll(0) and not (self.driver.drain(conn) and not rec.poller.poll(0)):
            return "dead"
        if rec.generation < self._generation or not self._idle_check:
            try:
                self.driver.execute_outside_transaction(conn, [("SELECT 1", None)])
            except self.driver.Error:
                return "dead"
            rec.generation = self._generation
        return None

    def _discard(self, rec: PooledConnection, reason: str) -> None:
        self.stats_counter.discard(reason, rec)
        quiet = reason in ("too_old", "idle_too_long", "forked")  # routine, not anomalies
        level = logging.DEBUG if quiet else logging.WARNING
        logger.log(level, "discarding connection to backend pid %s: %s", rec.backend_pid, reason)
        self._close_quietly(rec)

    def _reset(self, rec: PooledConnection, used: bool) -> str | None:
        """Make ``rec`` ready for the next request; the reason to discard it instead, or None."""
        conn = rec.conn
        if (
            self._status(conn) == IDLE
            and not (used and self._discard_used)
            and rec.generation >= self._retire_below
            and not conn.closed
        ):
            if self._timed:
                rec.last_used = time.monotonic()
            return None  # the common case: nothing to do
        if conn.closed:
            self.suspect_all()
            return "broken"
        if rec.generation < self._retire_below:
            return "retired"
        driver = self.driver
        status = self._status(conn)
        try:
            if status != IDLE:
                if status == ACTIVE:
                    self._cancel_abandoned(rec)
                if status not in (INTRANS, INERROR):
                    return "broken"
                logger.warning(
                    "rolling back a transaction left open on backend pid %s", rec.backend_pid
                )
                driver.rollback(conn)
            if used and self._discard_used:
                driver.execute_outside_transaction(conn, [("DISCARD ALL", None)])
                driver.setup(conn, self.settings, self._configure)
        except driver.Error as exc:
            logger.warning(
                "resetting connection to backend pid %s failed: %s",
                rec.backend_pid,
                first_line(exc),
            )
            if conn.closed:
                self.suspect_all()
            return "broken"
        if self._timed:
            rec.last_used = time.monotonic()
        return None

    def _cancel_abandoned(self, rec: PooledConnection) -> None:
        """A statement still runs on ``rec``, whose request gave up on it: cancel it.

        An exception raised into the wait for its result (a gevent.Timeout, a
        server's request timeout) left the connection busy; closing it alone
        would leave the statement running on the server, holding its locks,
        until it ends. The cancel request goes over a connection of its own.
        """
        logger.warning(
            "a request gave up on backend pid %s while a statement was running: cancelling it",
            rec.backend_pid,
        )
        try:
            self.driver.cancel(rec.conn)
        except Exception as exc:  # the connection is discarded anyway
            logger.warning(
                "cancelling the statement on backend pid %s failed: %s",
                rec.backend_pid,
                first_line(exc),
            )

    def _close_quietly(self, rec: PooledConnection) -> None:
        if rec.pid != os.getpid() and not _opened_by_uwsgi_master(rec):
            # Inherited through fork(): closing would send Terminate on the
            # parent's socket, and so would garbage collection. Keep it.
            _inherited.append(rec.conn)
            return
        try:
            self.driver.close(rec.conn)
        except Exception as exc:  # a dead socket must not stop the caller's cleanup
            logger.debug("closing backend pid %s failed: %s", rec.backend_pid, exc)

    def _take_idle(self) -> list[PooledConnection]:
        """Remove and return the connections no request holds (for close_all)."""
        raise NotImplementedError

    def _held(self) -> list[PooledConnection]:
        """Every connection, read without taking a lock (in a signal handler, a forked child)."""
        raise NotImplementedError

    def close_all(self) -> None:
        """Close the connections of this process that no request holds, now.

        A connection in use by a request on another thread (or greenlet) is
        left to that request, never waited for: closing it would wait until
        its statement ends. It goes back to the registry when the request
        ends. Connections inherited through ``fork()`` are kept (not closed).
        """
        records = self._records()
        if not any(rec.in_use for rec in records):
            self._forget()
            closing = records
        else:
            closing = self._take_idle()
            logger.debug(
                "closing %d idle connection(s); %d in use left to their requests",
                len(closing),
                len(records) - len(closing),
            )
        for rec in closing:
            self.stats_counter.discard(None, rec)
            self._close_quietly(rec)


def _after_fork_in_child() -> None:
    """In a forked child: forget the parent's connections (never used, never closed here).

    Runs from ``os.register_at_fork``, and from uWSGI's post-fork hook (uWSGI
    forks in C, without the at-fork hooks unless ``--py-call-uwsgi-fork-hooks``);
    once per process. A connection the uWSGI master opened is closed cleanly
    instead (see :func:`_opened_by_uwsgi_master`).
    """
    global _fork_epoch, _reset_pid
    if _reset_pid == os.getpid():
        return  # done already in this process (both hooks ran)
    _reset_pid = os.getpid()
    master_opened: list[tuple[Registry, PooledConnection]] = [
        (registry, rec)
        for registry in list(_registries)
        for rec in registry._held()
        if _opened_by_uwsgi_master(rec)
    ]
    _fork_epoch += 1
    for registry in list(_registries):
        # Keep the parent's records referenced (without taking locks, which a
        # thread that no longer exists may hold), then start afresh.
        _inherited.append(dict(vars(registry)))
        registry._init_state()
        registry.stats_counter = Stats()
        registry.stats_counter.registry = registry if registry.observer is not None else None
    for registry, rec in master_opened:
        logger.debug(
            "closing the uWSGI master's connection to backend pid %s in worker %s",
            rec.backend_pid,
            os.getpid(),
        )
        try:
            registry.driver.close(rec.conn)
        except Exception as exc:
            logger.debug("closing backend pid %s failed: %s", rec.backend_pid, exc)


_reset_pid = os.getpid()


def set_observer(observer: Observer | None) -> None:
    """Have every registry of this process, and every one created later, report to
    ``observer`` (see :class:`Observer`); None stops the reports.

    One observer per process (the Prometheus exporter is one). Without one, the
    per-request path is exactly the registries' own ``checkout`` and ``checkin``.
    """
    global _observer
    _observer = observer
    for registry in list(_registries):
        registry._observe(observer)


def close_all_registries(*_args: object, **_kwargs: object) -> None:
    """Close the idle connections of every registry of this process (at exit).

    Connections in use by requests still running on other threads are left to
    them (see :meth:`Registry.close_all`): the exit is never held up.
    """
    for registry in list(_registries):
        registry.close_all()


_shutdown_subscribed = False


def _subscribe_shutdown() -> None:
    """Close connections cleanly when the process exits.

    Python's ``atexit``; mod_wsgi's shutdown event; in uWSGI, ``uwsgi.atexit``
    (its gevent loop and its master run no ``atexit``) and the post-fork hook
    that closes a connection the master opened (:func:`_uwsgi_post_fork`);
    and SIGTERM where nothing handles it (:func:`watch_sigterm`).
    """
    global _shutdown_subscribed
    if _shutdown_subscribed:
        return
    _shutdown_subscribed = True
    atexit.register(close_all_registries)
    watch_sigterm()
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is not None:
        _chain_uwsgi_hooks(uwsgi)
    try:
        import mod_wsgi  # type: ignore[import-not-found]  # only inside mod_wsgi
    except ImportError:
        return
    subscribe = getattr(mod_wsgi, "subscribe_shutdown", None)
    if subscribe is not None:
        subscribe(close_all_registries)


# -- uWSGI ------------------------------------------------------------------------


def _chain_uwsgi_hooks(uwsgi: Any) -> None:
    """Add our uWSGI exit and post-fork hooks in front of any already set."""
    previous_exit = getattr(uwsgi, "atexit", None)
    previous_fork = getattr(uwsgi, "post_fork_hook", None)

    def at_exit() -> None:
        try:
            close_all_registries()
        finally:
            if callable(previous_exit):
                previous_exit()

    def post_fork() -> None:
        try:
            _uwsgi_post_fork()
        finally:
            if callable(previous_fork):
                previous_fork()

    uwsgi.atexit = at_exit
    uwsgi.post_fork_hook = post_fork


def _opened_by_uwsgi_master(rec: PooledConnection) -> bool:
    """Whether ``rec`` was opened by the uWSGI master of this worker.

    The master loads the application when ``--lazy-apps`` is off and may
    query at import (a warm-up, a cache fill); it serves no requests after
    forking its workers and runs no exit hook, so its connections would be
    dropped uncleanly when it exits. A worker may thus close them (send
    Terminate on the shared socket): nobody uses them again.
    """
    uwsgi = sys.modules.get("uwsgi")
    if uwsgi is None:
        return False
    try:
        master = int(uwsgi.masterpid())
    except Exception:  # an emulation without masterpid
        return False
    return master != 0 and rec.pid == master != os.getpid()


def _uwsgi_post_fork() -> None:
    """In a uWSGI worker: what ``os.register_at_fork`` hooks would do (uWSGI forks in C).

    A connection the master opened is closed cleanly (it is the master's last
    use of it); any other inherited one is kept, as after any fork.
    """
    _after_fork_in_child()


# -- SIGTERM ------------------------------------------------------------------------


_sigterm_watched = False


def watch_sigterm() -> bool:
    """Close idle connections on SIGTERM where nothing else handles it; True if installed.

    waitress-serve, werkzeug's development server and Django's ``runserver
    --noreload`` leave SIGTERM (what docker and systemd send) at its default:
    the process dies without running ``atexit``. Installed only from the main
    thread, only while SIGTERM has its default disposition, and not under
    servers that own signals in C (uWSGI, mod_wsgi) or greenlets: a handler a
    server or application installs later replaces this one, as it should.
    On SIGTERM the handler closes the connections no request holds (lock
    free), then restores the default and sends SIGTERM again: the process
    dies as it would have, with the same status.
    """
    global _sigterm_watched
    if _sigterm_watched:
        return False
    if any(name in sys.modules for name in ("uwsgi", "mod_wsgi")) or green.detect() is not None:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return False
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main interpreter, or signals not allowed
        return False
    _sigterm_watched = True
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    try:
        pid = os.getpid()
        for registry in list(_registries):
            for rec in registry._held():
                if not rec.in_use and rec.pid == pid:
                    with contextlib.suppress(Exception):  # dying anyway; the default follows
                        registry.driver.close(rec.conn)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


os.register_at_fork(after_in_child=_after_fork_in_child)
