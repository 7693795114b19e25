"""Prometheus metrics of the middleware's connections (``pip install 'wsgi_pgconn[prometheus]'``).

::

    # wsgi.py
    from wsgi_pgconn import PgConnMiddleware, prometheus

    application = prometheus.mount(PgConnMiddleware(app), "/metrics")

:func:`mount` puts the metrics at a path of your choice *outside* the
middleware (a scrape never waits for, nor holds, a database connection) and
calls :func:`install`, which has every registry of the process report its
events to the metrics below. Built on prometheus_client; without it, or
without :func:`install`, nothing of this runs.

Several processes (gunicorn workers, mod_wsgi daemon processes, uWSGI
workers): set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory, writable by
the workers, in the environment the server starts with (wiped before each
start), and prometheus_client's multiprocess mode does the rest: every
process writes its metrics to files there, and a scrape, whichever process
answers it, adds up all of them. Its rules, which this module follows: the
metrics are plain Counter, Histogram and Gauge objects updated when events
happen (no custom collector, no ``set_function``); the gauges say how to add
up processes (``livesum``: the processes alive now), and a process that ends
removes its gauge files (``mark_process_dead``, done here at exit; with
gunicorn also put :func:`gunicorn_child_exit` in its configuration file, for
workers that are killed).

Metrics (counters also have prometheus_client's ``_created`` samples):

- ``wsgi_pgconn_connections_opened_total``: connections opened
- ``wsgi_pgconn_connections_reused_total``: checkouts served by a kept connection
- ``wsgi_pgconn_connections_discarded_total{reason}``: connections discarded
- ``wsgi_pgconn_connect_errors_total``: failed connection attempts
- ``wsgi_pgconn_connect_backoffs_total``: requests answered 503 during a connect back-off
- ``wsgi_pgconn_commits_total``, ``wsgi_pgconn_rollbacks_total``: transactions ended each way
- ``wsgi_pgconn_commit_vetoes_total``: commits vetoed by ``commit_veto`` (by default: 5xx)
- ``wsgi_pgconn_commit_errors_total``: COMMITs that failed (answered 500)
- ``wsgi_pgconn_retries_total``: requests run again (serialization failure, deadlock)
- ``wsgi_pgconn_pool_timeouts_total``: pool waits that ended in 503
- ``wsgi_pgconn_pool_wait_seconds``: histogram of the waits for a pooled connection
- ``wsgi_pgconn_transaction_seconds``: histogram of how long a request that ran a
  transaction held its connection (checkout to checkin)
- ``wsgi_pgconn_connections_in_use``, ``wsgi_pgconn_connections_idle``: gauges, now
- ``wsgi_pgconn_requests_waiting``: gauge, requests waiting for a pooled connection now
- ``wsgi_pgconn_pool_max``: gauge, the pools' capacity (pool scope)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client import make_wsgi_app as _make_wsgi_app
from prometheus_client import values as _values

from .scopes import base

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .scopes import Registry

__all__ = [
    "PrometheusObserver",
    "gunicorn_child_exit",
    "install",
    "metrics_app",
    "mount",
    "multiprocess_mode",
    "uninstall",
]

#: Buckets (seconds) of the pool-wait histogram: waits end within pool_timeout (5 s by default).
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Buckets (seconds) of the transaction histogram: from a fraction of a millisecond up.
TRANSACTION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)

_lock = threading.Lock()
_installed: PrometheusObserver | None = None


def multiprocess_mode() -> bool:
    """Whether prometheus_client runs in multiprocess mode.

    It decides once, when it is imported: ``PROMETHEUS_MULTIPROC_DIR`` was set then.
    """
    return bool(getattr(_values.ValueClass, "_multiprocess", False))


class PrometheusObserver:
    """The metrics, and the observer (:class:`wsgi_pgconn.scopes.base.Observer`) that updates them.

    Built by :func:`install`; ``registry`` is where the metrics are registered
    (prometheus_client's default one unless given).
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter("wsgi_pgconn_" + name, doc, list(labels), registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge("wsgi_pgconn_" + name, doc, registry=registry, multiprocess_mode="livesum")

        self.opened = counter("connections_opened", "Connections opened.")
        self.reused = counter("connections_reused", "Checkouts served by a kept connection.")
        self.discards = counter(
            "connections_discarded", "Connections discarded, by reason.", ["reason"]
        )
        self.commits = counter("commits", "Transactions committed.")
        self.rollbacks = counter("rollbacks", "Transactions rolled back.")
        #: stats() counter -> metric, for the counters that move on rare events.
        self.counters: dict[str, Counter] = {
            "opened": self.opened,
            "connect_errors": counter("connect_errors", "Failed connection attempts."),
            "connect_backoffs": counter(
                "connect_backoffs", "Requests answered 503 during a connect back-off."
            ),
            "vetoes": counter("commit_vetoes", "Commits vetoed by commit_veto (by default: 5xx)."),
            "commit_errors": counter("commit_errors", "COMMITs that failed (answered 500)."),
            "retries": counter(
                "retries", "Requests run again after a serialization failure or deadlock."
            ),
            "pool_timeouts": counter("pool_timeouts", "Pool waits that ended in 503."),
            "commits": self.commits,
            "rollbacks": self.rollbacks,
        }
        self.pool_wait = Histogram(
            "wsgi_pgconn_pool_wait_seconds",
            "How long requests waited for a pooled connection (waits only).",
            registry=registry,
            buckets=WAIT_BUCKETS,
        )
        self.transaction = Histogram(
            "wsgi_pgconn_transaction_seconds",
            "How long a request that ran a transaction held its connection (checkout to checkin).",
            registry=registry,
            buckets=TRANSACTION_BUCKETS,
        )
        self.in_use = gauge("connections_in_use", "Connections held by requests now.")
        self.idle = gauge("connections_idle", "Connections kept open, idle.")
        self.waiting = gauge("requests_waiting", "Requests waiting for a pooled connection now.")
        self.pool_max = gauge("pool_max", "The pools' capacity (pool scope).")
        for reason in base.DISCARD_REASONS:
            self.discards.labels(reason)  # every reason shows, at 0
        self._registries: weakref.WeakSet[Registry] = weakref.WeakSet()
        self._gauge_lock = threading.Lock()
        #: This process's totals, as last written to the gauges.
        self._totals = [0, 0, 0]
        self._stale = False
        #: Each registry's part of them: id(registry) -> (in use, idle, waiting).
        self._parts: dict[int, tuple[int, int, int]] = {}
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """In a forked child: its registries start empty, and so do its gauges."""
        self._gauge_lock = threading.Lock()
        self._parts = {}
        self._stale = True  # the next update recounts and writes every gauge

    def _gauges(self, registry: Registry) -> None:
        """Bring the gauges up to date with ``registry``'s occupancy now.

        Under one lock (the last writer is right), and writing only the gauges
        that changed: in multiprocess mode each write goes to a memory-mapped file.
        """
        gauges = (self.in_use, self.idle, self.waiting)
        with self._gauge_lock:
            now = registry.occupancy()
            before = self._parts.get(id(registry), (0, 0, 0))
            if now == before and not self._stale:
                return
            self._parts[id(registry)] = now
            totals = self._totals
            if self._stale:  # after a fork
                self._stale = False
                totals[:] = [sum(part[i] for part in self._parts.values()) for i in range(3)]
                for gauge, total in zip(gauges, totals, strict=True):
                    gauge.set(total)
                return
            for i, gauge in enumerate(gauges):
                if now[i] != before[i]:
                    totals[i] += now[i] - before[i]
                    gauge.set(totals[i])

    # -- the Observer protocol --------------------------------------------------------

    def attached(self, registry: Registry) -> None:
        self._registries.add(registry)
        weakref.finalize(registry, self._detached, id(registry))
        with self._gauge_lock:
            self.pool_max.set(
                sum(r.settings.pool_size for r in list(self._registries) if r.scope == "pool")
            )
        self._gauges(registry)

    def _detached(self, key: int) -> None:
        """A registry was collected: its connections are gone from the totals."""
        with self._gauge_lock:
            part = self._parts.pop(key, None)
            if part is not None and not self._stale:
                for i, gauge in enumerate((self.in_use, self.idle, self.waiting)):
                    if part[i]:
                        self._totals[i] -= part[i]
                        gauge.set(self._totals[i])

    def count(self, registry: Registry, key: str, amount: float) -> None:
        metric = self.counters.get(key)
        if metric is not None:
            metric.inc(amount)
        elif key == "pool_wait_seconds":  # a wait ended
            self.pool_wait.observe(amount)
            self._gauges(registry)
        elif key == "pool_waits":  # a wait began
            self._gauges(registry)

    def discarded(self, registry: Registry, reason: str | None) -> None:
        if reason is not None:
            self.discards.labels(reason).inc()
        self._gauges(registry)

    def checked_out(self, registry: Registry, reused: bool) -> None:
        if reused:
            self.reused.inc()
        self._gauges(registry)

    def checked_in(self, registry: Registry, held: float, commits: int, rollbacks: int) -> None:
        if commits:
            self.commits.inc(commits)
        if rollbacks:
            self.rollbacks.inc(rollbacks)
        if commits or rollbacks:
            self.transaction.observe(held)
        self._gauges(registry)


def install(registry: CollectorRegistry | None = REGISTRY) -> PrometheusObserver:
    """Create the metrics (once per process) and have every registry report to them.

    ``registry``: where the metrics are registered (prometheus_client's default
    one). Returns the observer; a second call returns the same one.
    """
    global _installed
    with _lock:
        if _installed is None:
            _installed = PrometheusObserver(registry)
            if multiprocess_mode():
                _at_exit(_mark_this_process_dead)
        observer = _installed
    base.set_observer(observer)
    return observer


def uninstall() -> None:
    """Stop reporting (the registries' own checkout and checkin again); the metrics stay."""
    base.set_observer(None)


def metrics_app(registry: CollectorRegistry | None = None) -> WSGIApplication:
    """A WSGI application that answers the metrics (any path, GET), in text format.

    In multiprocess mode, those of every process (a fresh registry with
    prometheus_client's MultiProcessCollector: the only way its rules allow);
    otherwise ``registry`` (prometheus_client's default one).
    """
    if registry is None:
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = REGISTRY
    app: WSGIApplication = _make_wsgi_app(registry)
    return app


def mount(
    application: WSGIApplication, path: str = "/metrics", metrics: WSGIApplication | None = None
) -> WSGIApplication:
    """``application`` with the metrics answered at ``path`` (exactly), before it.

    Wrap the middleware (``mount(PgConnMiddleware(app))``): requests to ``path``
    then never reach it, so a scrape neither waits for nor holds a database
    connection. Calls :func:`install` and serves :func:`metrics_app`, unless
    ``metrics`` (a WSGI application of your own) is given.
    """
    if not path.startswith("/"):
        raise ValueError(f"the metrics path must start with '/', not {path!r}")
    if metrics is None:
        install()
        metrics = metrics_app()
    serve = metrics

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == path:
            return serve(environ, start_response)
        return application(environ, start_response)

    dispatch.metrics = serve  # type: ignore[attr-defined]
    dispatch.application = application  # type: ignore[attr-defined]
    return dispatch


def gunicorn_child_exit(server: Any, worker: Any) -> None:
    """gunicorn's ``child_exit`` hook: remove a dead worker's gauges from the sum.

    In ``gunicorn.conf.py``: ``from wsgi_pgconn.prometheus import gunicorn_child_exit
    as child_exit``. Needed for workers that are killed; one that exits
    cleanly removes its own.
    """
    if multiprocess_mode():
        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def _mark_this_process_dead() -> None:
    with contextlib.suppress(OSError):
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _at_exit(callback: Callable[[], None]) -> None:
    """Run ``callback`` when this process exits (atexit; mod_wsgi's shutdown event)."""
    atexit.register(callback)
    try:
        import mod_wsgi  # type: ignore[import-not-found]  # only inside mod_wsgi
    except ImportError:
        return
    subscribe = getattr(mod_wsgi, "subscribe_shutdown", None)
    if subscribe is not None:
        subscribe(lambda *args, **kwargs: callback())
