"""The WSGI middleware: a connection and one transaction around every request.

Example, in ``wsgi.py``::

    from wsgi_pgconn import PgConnMiddleware

    application = PgConnMiddleware(application)  # configured from DATABASE_URL etc.

and in a view::

    conn = wsgi_pgconn.get_connection(environ)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (%s)", (1,))
    # no commit: the middleware commits when the response succeeds

The commit-or-rollback decision and the end of the transaction are in
:mod:`wsgi_pgconn.transaction`; which connection a request gets is decided by
the scope (:mod:`wsgi_pgconn.scopes`); the driver is reached only through
:mod:`wsgi_pgconn.drivers`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from . import config as _config
from . import drivers, green
from . import transaction as _transaction
from .drivers import IDLE
from .errors import ConfigurationError, ConnectBackoff, MiddlewareNotInstalled, PoolTimeout
from .scopes import REGISTRIES, PooledConnection, Registry, ThreadRegistry, watch_sigterm
from .transaction import (
    _NO_ENVIRON,
    Body,
    CommitVeto,
    RequestTransaction,
    _current,
    default_commit_veto,
)

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "CONNECTION_KEY",
    "EXEMPT_KEY",
    "TRANSACTION_KEY",
    "PgConnMiddleware",
    "get_connection",
]

logger = logging.getLogger("wsgi_pgconn")

#: environ key of the request's connection (psycopg2 or psycopg 3).
CONNECTION_KEY = "wsgi_pgconn.connection"
#: environ key of the request's :class:`~wsgi_pgconn.transaction.RequestTransaction`.
TRANSACTION_KEY = "wsgi_pgconn.transaction"
#: environ key set to True on requests to an exempt path (no connection).
EXEMPT_KEY = "wsgi_pgconn.exempt"

#: SQLSTATEs after which a request may be run again (serialization failure, deadlock).
RETRY_SQLSTATES = frozenset({"40001", "40P01"})

#: SQLSTATEs of a failed COMMIT that say the server ended the session before it read
#: the COMMIT (idle_in_transaction_session_timeout): nothing was saved, certainly.
ENDED_BEFORE_COMMIT = frozenset({"25P03"})

_SIMPLE_BODY = (list, tuple)


def get_connection(environ: WSGIEnvironment) -> Any:
    """The connection (psycopg2 or psycopg 3) that belongs to this request.

    Raises :class:`~wsgi_pgconn.errors.MiddlewareNotInstalled` when the
    request did not go through :class:`PgConnMiddleware` (or its path is exempt).
    """
    try:
        return environ[CONNECTION_KEY]
    except KeyError:
        if environ.get(EXEMPT_KEY):
            raise MiddlewareNotInstalled(
                f"{environ.get('PATH_INFO')!r} is an exempt path (WSGI_PGCONN_EXEMPT_PATHS): "
                "requests to it get no database connection"
            ) from None
        raise MiddlewareNotInstalled(
            "this request has no wsgi_pgconn connection: wrap the WSGI application in "
            "PgConnMiddleware (in wsgi.py: application = PgConnMiddleware(application))"
        ) from None


def _simple_response(
    start_response: StartResponse, status: str, text: str, extra: list[tuple[str, str]]
) -> list[bytes]:
    body = text.encode("utf-8")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        *extra,
    ]
    start_response(status, headers)
    return [body]


class PgConnMiddleware:
    """Give every request a live PostgreSQL connection and one transaction.

    Every setting is a keyword-only argument; each has an environment alias
    (``dsn`` is ``DATABASE_URL``, ``scope`` is ``WSGI_PGCONN_SCOPE``, and so
    on: see :data:`wsgi_pgconn.config.SETTINGS`). An explicit argument wins
    over the environment. Values found in the first request's environ (mod_wsgi
    ``SetEnv``) are honoured too; the configuration is then fixed.

    ``commit_veto(environ, status, headers) -> bool`` replaces the rule that
    a 5xx status rolls back. ``configure(conn)`` runs once per new connection.
    ``on_begin(conn, environ)`` runs at the start of each transaction of a
    request, before its first statement (for ``SET LOCAL`` and
    ``set_config(..., true)``); its own first statement carries the BEGIN. A
    request that never queries never runs it.

    The scope left unset is ``thread``, except where that would open a
    connection per request: under greenlets (gevent, eventlet, uWSGI's gevent
    loop) and under servers that start a thread per request (werkzeug's and
    Django's development servers), recognised at the first request, it is
    ``pool`` (see docs/servers.md).

    Raises :class:`~wsgi_pgconn.errors.ConfigurationError` for a bad setting
    (among them ``scope="thread"`` under greenlets, unless
    ``greenlets="off"``), :class:`~wsgi_pgconn.errors.DriverNotFound` when the
    driver is missing.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        dsn: str | None = None,
        scope: str | None = None,
        pool_size: int | None = None,
        pool_timeout: float | str | timedelta | None = None,
        max_age: float | str | timedelta | None = None,
        max_idle: float | str | timedelta | None = None,
        isolation_level: str | None = None,
        statement_timeout: int | str | timedelta | None = None,
        idle_in_transaction_timeout: int | str | timedelta | None = None,
        connect_timeout: float | str | timedelta | None = None,
        reset: str | None = None,
        check: str | None = None,
        exempt_paths: Iterable[str] | str | None = None,
        pooler: str | None = None,
        retries: int | None = None,
        retry_max_body: int | None = None,
        driver: str | None = None,
        pipeline_begin: bool | None = None,
        prepare_threshold: int | None = None,
        greenlets: str | None = None,
        strict: bool | None = None,
        commit_veto: CommitVeto | None = None,
        configure: Callable[[Any], object] | None = None,
        on_begin: Callable[[Any, dict[str, Any]], object] | None = None,
    ) -> None:
        self.app = app
        self._overrides: dict[str, object] = {
            name: value
            for name, value in {
                "dsn": dsn,
                "scope": scope,
                "pool_size": pool_size,
                "pool_timeout": pool_timeout,
                "max_age": max_age,
                "max_idle": max_idle,
                "isolation_level": isolation_level,
                "statement_timeout": statement_timeout,
                "idle_in_transaction_timeout": idle_in_transaction_timeout,
                "connect_timeout": connect_timeout,
                "reset": reset,
                "check": check,
                "exempt_paths": exempt_paths,
                "pooler": pooler,
                "retries": retries,
                "retry_max_body": retry_max_body,
                "driver": driver,
                "pipeline_begin": pipeline_begin,
                "prepare_threshold": prepare_threshold,
                "greenlets": greenlets,
                "strict": strict,
            }.items()
            if value is not None
        }
        # Validate now, so a bad value (or a missing driver) fails at import of wsgi.py.
        self.settings = _config.parse(os.environ, **self._overrides)
        _config.warn_unknown(os.environ)
        self._set_exempt()
        self.driver: drivers.Driver = drivers.load(self.settings.driver)
        # Refused now where the greenlets show already (the rest at the first request).
        self._greenlets(os.environ)
        # Before any server thread exists: signal handlers need the main thread.
        watch_sigterm()
        self.commit_veto: CommitVeto = commit_veto or default_commit_veto
        self.configure = configure
        self.on_begin = on_begin
        self._registry: Registry | None = None
        # The class and message of the configuration error found at the first request.
        self._failure: tuple[type[ConfigurationError], str] | None = None
        self._lock = threading.Lock()
        self._status = self.driver.transaction_status
        self._begin: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<PgConnMiddleware {self.settings!r} app={self.app!r}>"

    # -- configuration fixed at the first request ------------------------------

    @property
    def registry(self) -> Registry:
        """The connection registry (created at the first request)."""
        registry = self._registry
        if registry is None:
            raise RuntimeError("no request has been served yet")
        return registry

    def _start(self, environ: WSGIEnvironment) -> Registry:
        with self._lock:
            failure = self._failure
            if failure is None and self._registry is not None:
                return self._registry
            if failure is None:
                registry = self._configure_registry(environ)
                if isinstance(registry, Registry):
                    return registry
                failure = registry
        # Every request, the first included, gets an error of its own with the
        # same message: re-raising one stored object would add this request's
        # frames to its traceback, and the server's log would grow with each one.
        raise failure[0](failure[1]) from None

    def _configure_registry(
        self, environ: WSGIEnvironment
    ) -> Registry | tuple[type[ConfigurationError], str]:
        """This process's registry, or (type, message) of why there is none (lock held)."""
        try:
            from_request = _config.settings_environ(environ)
            unknown = [name for name, _ in _config.unknown_variables(environ)]
            if from_request or unknown:
                given = {**os.environ, **from_request, **{k: environ[k] for k in unknown}}
                self.settings = _config.parse(given, **self._overrides)
                _config.warn_unknown(given, "the environment and the request's environ")
                self._set_exempt()
                self.driver = drivers.load(self.settings.driver)
                self._status = self.driver.transaction_status
            merged = {**os.environ, **from_request}
            greenlets = self._greenlets(merged)
            if greenlets is None and self.settings.scope == "process" and environ.get(
                "wsgi.multithread"
            ):
                raise ConfigurationError(
                    "WSGI_PGCONN_SCOPE=process needs a server with one thread per "
                    "process, but this server runs requests in several threads "
                    "(wsgi.multithread is true): set WSGI_PGCONN_SCOPE=thread (or pool)"
                )
        except ConfigurationError as exc:
            self._failure = (type(exc), str(exc))
            logger.error("wsgi_pgconn is misconfigured: %s", exc)
            return self._failure
        server = _thread_per_request_server(environ)
        if greenlets is not None:
            self._cooperate(greenlets)
        if self.settings.scope == "thread" and not _config.is_set(
            "scope", merged, **self._overrides
        ):
            why = (
                f"requests run in greenlets ({greenlets.how})"
                if greenlets is not None
                else f"{server} starts a thread per request"
                if server is not None
                else None
            )
            if why is not None:
                logger.info("WSGI_PGCONN_SCOPE unset and %s: using scope=pool", why)
                self.settings = dataclasses.replace(self.settings, scope="pool")
        settings = self.settings
        if settings.scope == "process" and greenlets is not None:
            # One connection per process, taken in turn by the greenlets.
            logger.info("WSGI_PGCONN_SCOPE=process under greenlets: a pool of one connection")
            settings = dataclasses.replace(settings, pool_size=1)
        registry = REGISTRIES["pool" if greenlets is not None else settings.scope](
            settings, self.driver, configure=self.configure, greenlets=greenlets
        )
        if isinstance(registry, ThreadRegistry) and server is not None:
            registry.server = server
        self._begin = registry.begin
        self._registry = registry
        logger.debug("configured (%s): %r", self.driver.version(), self.settings)
        return registry

    def _set_exempt(self) -> None:
        quick, exact, starts = _config.exempt_matcher(self.settings.exempt_paths)
        self._exempt_quick = quick
        self._exempt_exact = exact
        self._exempt_starts = starts

    def _greenlets(self, environ: Any) -> green.Greenlets | None:
        """The greenlets this process runs (None: none, or ``greenlets=off``); checks the scope."""
        if self.settings.greenlets == "off":
            return None
        found = green.detect()
        if found is not None and self.settings.scope == "thread" and _config.is_set(
            "scope", environ, **self._overrides
        ):
            raise ConfigurationError(
                f"WSGI_PGCONN_SCOPE=thread, but requests run in greenlets ({found.how}): a "
                "per-thread connection would be one connection per greenlet (one per client "
                "connection under gunicorn's gevent worker), or one connection shared by every "
                "greenlet without monkey-patching. Leave WSGI_PGCONN_SCOPE unset or set it to "
                "pool (a bounded pool the greenlets share); to insist on thread scope, set "
                "WSGI_PGCONN_GREENLETS=off"
            )
        return found

    def _cooperate(self, greenlets: green.Greenlets) -> None:
        """Have the driver wait through the greenlets' loop; warn once where it cannot."""
        global _blocking_warned
        problem = self.driver.cooperate(greenlets.library)
        if problem is not None and not _blocking_warned:
            _blocking_warned = True
            logger.warning("%s", problem)

    def stats(self) -> dict[str, Any]:
        """Counters of this process (keys documented in docs, "Stats"); {} before a request."""
        if self._registry is None:
            return {}
        return self._registry.stats()

    def _count(self, key: str) -> None:
        registry = self._registry
        if registry is not None:
            registry.stats_counter.incr(key)

    def close(self) -> None:
        """Close this process's connections (they reopen on the next request)."""
        if self._registry is not None:
            self._registry.close_all()

    # -- the request --------------------------------------------------------------

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if CONNECTION_KEY in environ:  # wrapped twice: the outer one owns the transaction
            return self.app(environ, start_response)
        registry = self._registry or self._start(environ)
        quick = self._exempt_quick
        if quick:
            path = environ.get("PATH_INFO", "")
            if path.startswith(quick) and (
                path in self._exempt_exact or path.startswith(self._exempt_starts)
            ):
                environ[EXEMPT_KEY] = True
                return self.app(environ, start_response)
        try:
            rec = registry.checkout()
        except PoolTimeout as exc:
            logger.warning("answering 503: %s", exc)
            return _unavailable(start_response, "all database connections are busy")
        except ConnectBackoff as exc:  # a connect failed moments ago: no new attempt yet
            self._count("connect_backoffs")
            logger.debug("answering 503: %s", exc)
            return _unavailable(start_response, "the database cannot be reached")
        except self.driver.OperationalError:  # the registry logged why
            return _unavailable(start_response, "the database cannot be reached")
        retries = self.settings.retries
        if not retries:
            return self._attempt(rec, environ, start_response, False)
        replay = _Replay(environ, self.settings.retry_max_body)
        attempt = 0
        while True:
            may_retry = replay.body is not None and attempt < retries
            response = self._attempt(rec, replay.environ(), start_response, may_retry)
            if response is not _RETRY:
                return response
            attempt += 1
            self._count("retries")
            delay = random.uniform(0, min(0.5, 0.005 * 2**attempt))  # noqa: S311
            logger.info("serialization failure or deadlock: retry %s in %.3fs", attempt, delay)
            time.sleep(delay)

    def _attempt(
        self,
        rec: PooledConnection,
        environ: WSGIEnvironment,
        start_response: StartResponse,
        may_retry: bool,
    ) -> Iterable[bytes]:
        """Run the application once on ``rec``; the response, or _RETRY."""
        conn = rec.conn
        conn._wsgi_pgconn_begin = self._begin
        txn = RequestTransaction(self, rec, environ)
        environ[CONNECTION_KEY] = conn
        environ[TRANSACTION_KEY] = txn
        if _transaction._publishing:
            txn._token = _current.set(weakref.ref(txn))
        result: Iterable[bytes] | None = None
        iterator: Iterator[bytes] | None = None
        first: list[bytes] = []
        deferred = False
        try:
            if self.on_begin is not None:
                txn.arm_on_begin()
            if may_retry:
                conn._wsgi_pgconn_sqlstate = None
            result = self.app(environ, txn.start_response)
            if txn.status is None:
                # start_response comes with the body: pull chunks until it is called.
                iterator = iter(result)
                while txn.status is None:
                    try:
                        first.append(next(iterator))
                    except StopIteration:
                        raise RuntimeError(
                            "the WSGI application returned without calling start_response"
                        ) from None
            if (
                self._status(conn) == IDLE
                and not conn._wsgi_pgconn_began
                and txn._after_commit is None
                and txn._after_rollback is None
            ):
                error = None  # nothing was begun: nothing to end
            elif conn._wsgi_pgconn_cursors is not None and drivers.cursor_open(conn):
                # A server-side cursor of the transaction is still open: the body may
                # read it. The transaction ends when the server closes the response.
                error = None
                deferred = True
            else:
                error = txn.finish(completed=True)
        except BaseException as exc:
            code = self.driver.sqlstate(exc) or _cause_sqlstate(self.driver, exc)
            if code is not None:
                txn.sqlstate = code
            retry = may_retry and code in RETRY_SQLSTATES and isinstance(exc, Exception)
            self._abort(txn, result, retry=retry)
            if retry:
                return _RETRY
            raise
        if may_retry and txn.outcome == "rollback" and (
            (txn.sqlstate or conn._wsgi_pgconn_sqlstate) in RETRY_SQLSTATES
        ):
            # Failed, possibly answered 500 by the framework, nothing committed or sent.
            self._abort(txn, result, retry=True)
            return _RETRY
        if error is not None:
            logger.error("not committed, answering 500 instead of %r: %s", txn.status, error)
            # In doubt only if COMMIT reached a live session and the answer was lost
            # (25P03: the idle-in-transaction timeout ended the session before it).
            in_doubt = (
                conn.closed
                and isinstance(error, self.driver.OperationalError)
                and txn.sqlstate not in ENDED_BEFORE_COMMIT
            )
            self._abort(txn, result)
            return _simple_response(
                start_response,
                "500 Internal Server Error",
                "Internal Server Error: the connection was lost during COMMIT; whether the "
                "work was saved is unknown.\n"
                if in_doubt
                else "Internal Server Error: the transaction could not be committed; "
                "nothing was saved.\n",
                [],
            )
        try:
            write = start_response(txn.status, txn.headers, txn.exc_info)
        except BaseException:
            self._abort(txn, result)
            raise
        if iterator is None and type(result) in _SIMPLE_BODY and not deferred:
            # The body is complete: nothing more can touch the database.
            if txn.used or txn._token is not None or self._registry.debug:  # type: ignore[union-attr]
                txn.release()
            else:  # RequestTransaction.release for a request that ran no transaction
                txn._rec = None
                txn.environ = _NO_ENVIRON
                conn._wsgi_pgconn_begin = None
                if self.on_begin is not None:
                    conn._wsgi_pgconn_on_begin = None
                self._registry.checkin(rec, False)  # type: ignore[union-attr]
            if txn.buffer:
                return [*txn.buffer, *result]
            return result
        txn.server_write = write
        txn.started = True
        return Body(txn, result, iterator, first)

    def _abort(
        self, txn: RequestTransaction, result: Iterable[bytes] | None, *, retry: bool = False
    ) -> None:
        """Before the response started: close the app's iterable, roll back, release.

        With ``retry`` the connection stays checked out for the next attempt.
        """
        try:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        finally:
            try:
                txn.finish(completed=False)
            finally:
                if retry:
                    txn.connection._wsgi_pgconn_cursors = None  # ended with the transaction
                    txn.detach()
                else:
                    txn.release()


class _Replay:
    """The request body, buffered so the application can be run again (``retries``)."""

    __slots__ = ("body", "original")

    def __init__(self, environ: WSGIEnvironment, limit: int) -> None:
        self.original = dict(environ)
        self.body: bytes | None = None
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked or length > limit:
            logger.debug("request body not replayable (%s bytes): no retries", length)
            return
        self.body = environ["wsgi.input"].read(length) if length > 0 else b""

    def environ(self) -> WSGIEnvironment:
        """A fresh copy of the request's environ with the body rewound."""
        env = dict(self.original)
        if self.body is not None:
            env["wsgi.input"] = io.BytesIO(self.body)
        return env


_RETRY: list[bytes] = []
_blocking_warned = False

#: The name socketserver.ThreadingMixIn gives the thread it starts for each request.
_PER_REQUEST_THREAD = "(process_request_thread)"


def _thread_per_request_server(environ: WSGIEnvironment) -> str | None:
    """What server this is, if it starts a thread per request (checked on a request's thread).

    Recognised: socketserver's ThreadingMixIn, on which werkzeug's threaded
    development server (``flask run``, ``run_simple(threaded=True)``),
    Django's ``runserver`` and wsgiref-with-threads are built.
    """
    if not threading.current_thread().name.endswith(_PER_REQUEST_THREAD):
        return None
    software = str(environ.get("SERVER_SOFTWARE", ""))
    if software.startswith("Werkzeug"):
        return "werkzeug's development server (flask run, run_simple(threaded=True))"
    if "django.core.servers.basehttp" in sys.modules:
        return "Django's runserver"
    return "this socketserver.ThreadingMixIn server"


def _cause_sqlstate(driver: drivers.Driver, exc: BaseException) -> str | None:
    """The SQLSTATE of a database error wrapped by a framework (Django's ``__cause__``)."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 5:
        code = driver.sqlstate(cause)
        if code is not None:
            return code
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return None


def _unavailable(start_response: StartResponse, why: str) -> list[bytes]:
    return _simple_response(
        start_response,
        "503 Service Unavailable",
        f"Service Unavailable: {why}; try again shortly.\n",
        [("Retry-After", "1")],
    )
