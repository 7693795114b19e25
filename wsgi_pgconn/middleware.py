"""The WSGI middleware: a connection and one transaction around every request.

Example, in ``wsgi.py``::

    from wsgi_pgconn import PgConnMiddleware

    application = PgConnMiddleware(application)  # configured from DATABASE_URL etc.

and in a view::

    conn = wsgi_pgconn.get_connection(environ)
    with conn.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (%s)", (1,))
    # no commit: the middleware commits when the response succeeds

The commit-or-rollback decision is :func:`should_commit`. COMMIT runs before
the status line is handed to the server, so a COMMIT that fails becomes a 500
response rather than a 200 over lost data. Work done while a streamed body is
iterated is committed when the server closes the response.
"""

from __future__ import annotations

import contextvars
import io
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psycopg2
import psycopg2.extensions as ext

from . import config as _config
from . import connection as _connection
from .connection import ManagedConnection
from .errors import ConfigurationError, MiddlewareNotInstalled, PoolTimeout, first_line
from .registry import REGISTRIES, PooledConnection, Registry

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "CONNECTION_KEY",
    "TRANSACTION_KEY",
    "PgConnMiddleware",
    "RequestTransaction",
    "current_transaction",
    "default_commit_veto",
    "get_connection",
    "should_commit",
]

logger = logging.getLogger("wsgi_pgconn")

#: environ key of the request's psycopg2 connection.
CONNECTION_KEY = "wsgi_pgconn.connection"
#: environ key of the request's :class:`RequestTransaction`.
TRANSACTION_KEY = "wsgi_pgconn.transaction"
#: environ key set to True on requests to an exempt path (no connection).
EXEMPT_KEY = "wsgi_pgconn.exempt"

_IDLE = ext.TRANSACTION_STATUS_IDLE
_INTRANS = ext.TRANSACTION_STATUS_INTRANS
_INERROR = ext.TRANSACTION_STATUS_INERROR
_commit = ext.connection.commit
#: SQLSTATEs after which a request may be run again (serialization failure, deadlock).
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
#: SQLSTATE of a write on a read-only server.
READ_ONLY = "25006"
_rollback = ext.connection.rollback

CommitVeto = Callable[[dict[str, Any], str, list[tuple[str, str]]], bool]

# Weak: a response the server never closes must stay collectable, so that
# RequestTransaction.__del__ can roll it back and release its connection.
_current: contextvars.ContextVar[weakref.ref[RequestTransaction] | None] = contextvars.ContextVar(
    "wsgi_pgconn_transaction", default=None
)


def get_connection(environ: WSGIEnvironment) -> ManagedConnection:
    """The psycopg2 connection that belongs to this request."""
    try:
        conn: ManagedConnection = environ[CONNECTION_KEY]
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
    return conn


def current_transaction() -> RequestTransaction | None:
    """The transaction of the request running in this context, or None outside requests."""
    ref = _current.get()
    return None if ref is None else ref()


def default_commit_veto(
    environ: dict[str, Any], status: str, headers: list[tuple[str, str]]
) -> bool:
    """Veto the commit of a 5xx response; everything else commits.

    A 4xx response commits: the request was handled, and its writes can be
    intended (a failed-login counter, an audit row for a refused request).
    """
    return status[:1] == "5"


def should_commit(
    failed: bool, exc_info: OptExcInfo | None, vetoed: Callable[[], bool]
) -> bool:
    """The commit-or-abort decision, top to bottom.

    Roll back if the application raised (or its body iteration did), if it
    passed ``exc_info`` to ``start_response``, or if the veto says so (by
    default: a 5xx status). Otherwise commit.
    """
    if failed:
        return False
    if exc_info is not None:
        return False
    return not vetoed()


class RequestTransaction:
    """One request's connection, its response status, and the commit at the end.

    Reachable as ``environ["wsgi_pgconn.transaction"]`` and from
    :func:`current_transaction` (used by the Django adapter). Callbacks given
    to :meth:`on_commit` run after a COMMIT succeeds; :meth:`on_rollback`
    callbacks run after a rollback. A callback that raises is logged and
    changes nothing.
    """

    __slots__ = (
        "__weakref__",
        "_after_commit",
        "_after_rollback",
        "_mw",
        "_rec",
        "_token",
        "buffer",
        "connection",
        "environ",
        "exc_info",
        "failed",
        "headers",
        "outcome",
        "server_write",
        "started",
        "status",
        "used",
    )

    def __init__(
        self, mw: PgConnMiddleware, rec: PooledConnection, environ: WSGIEnvironment
    ) -> None:
        self._mw = mw
        self._rec: PooledConnection | None = rec
        self.connection = rec.conn
        self.environ = environ
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.exc_info: OptExcInfo | None = None
        self.failed = False
        self.started = False
        self.used = False
        #: "commit" or "rollback" once the request's transaction has ended that way.
        self.outcome: str | None = None
        self.buffer: list[bytes] = []
        self.server_write: Callable[[bytes], object] | None = None
        self._after_commit: list[Callable[[], object]] = []
        self._after_rollback: list[Callable[[], object]] = []
        self._token: contextvars.Token[weakref.ref[RequestTransaction] | None] | None = None

    def on_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after the request's work is committed (not if it rolls back)."""
        self._after_commit.append(callback)

    def on_rollback(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after the request's work is rolled back."""
        self._after_rollback.append(callback)

    def arm_on_begin(self) -> None:
        """Have the middleware's ``on_begin`` run when this request next begins a transaction."""
        on_begin = self._mw.on_begin
        if on_begin is not None:
            # Weakly: the connection outlives the request, which must stay collectable.
            ref = weakref.ref(self)

            def begin() -> None:
                txn = ref()
                if txn is not None:
                    on_begin(txn.connection, txn.environ)

            self.connection._wsgi_pgconn_on_begin = begin

    def set_rollback_only(self) -> None:
        """Roll back at the end of the request whatever the response says."""
        self.failed = True

    # -- the start_response and write() the application sees -------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and exc_info[1] is not None:
            self.failed = True
            if self.started:  # too late to change the status: PEP 3333 says re-raise
                try:
                    raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
        elif self.started:
            raise AssertionError("start_response called twice without exc_info")
        self.status, self.headers, self.exc_info = status, headers, exc_info
        return self.write

    def write(self, data: bytes) -> None:
        if self.server_write is not None:
            self.server_write(data)
        else:
            self.buffer.append(data)

    # -- ending the transaction -----------------------------------------------

    def _vetoed(self) -> bool:
        assert self.status is not None
        vetoed = self._mw.commit_veto(self.environ, self.status, self.headers)
        if vetoed:
            self._mw._count("vetoes")
        return bool(vetoed)

    def finish(self, completed: bool) -> BaseException | None:
        """End what the request opened: commit if it ``completed`` and :func:`should_commit`.

        An idle connection (nothing queried since the last end) costs nothing.
        Returns the error when the work could not be committed.
        """
        conn = self.connection
        status = conn.get_transaction_status()
        if conn.closed and self.outcome == "rollback":
            return None  # a lost connection, already ended once
        if status == _IDLE:
            if _connection.resync(conn):  # the app ended its transaction with SQL
                self.used = True
                logger.warning(
                    "the application ended its transaction with SQL COMMIT/ROLLBACK on "
                    "backend pid %s; use savepoints instead", conn.info.backend_pid,
                )
            elif self._after_commit or self._after_rollback:
                # Nothing to COMMIT, but callbacks wait for the request's outcome
                # (Django's on_commit() in a view that ran no query).
                self._settle(
                    completed and should_commit(self.failed, self.exc_info, self._vetoed)
                )
            return None
        self.used = True
        commit = completed and should_commit(self.failed, self.exc_info, self._vetoed)
        if commit and status == _INTRANS:
            try:
                _commit(conn)
            except psycopg2.Error as exc:
                self._mw._count("commit_errors")
                conn._wsgi_pgconn_error = exc.pgcode or type(exc).__name__
                if self._mw.settings.pooler != "none":
                    _end_failed_commit(conn)
                self._rollback_after_failure()
                return exc
            self._mw._count("commits")
            self.outcome = "commit"
            self.arm_on_begin()  # a streamed body may begin another transaction
            self._settle(committed=True)
            return None
        self._rollback_after_failure()
        if commit and self.status is not None and self.status[:1] in "123":
            # The application caught a database error (or lost its connection)
            # and answered success anyway: its work is lost; the response must say so.
            lost = "lost its connection" if conn.closed else "caught a database error"
            return psycopg2.InternalError(
                f"the transaction had failed (the application {lost} and still answered "
                f"{self.status!r}); it was rolled back"
            )
        return None

    def _rollback_after_failure(self) -> None:
        conn = self.connection
        if not conn.closed:
            try:
                _rollback(conn)
            except psycopg2.Error as exc:
                logger.warning(
                    "rollback failed on backend pid %s: %s",
                    conn.info.backend_pid if not conn.closed else "?",
                    first_line(exc),
                )
        self._mw._count("rollbacks")
        self.outcome = "rollback"
        self.arm_on_begin()
        self._settle(committed=False)

    def _settle(self, committed: bool) -> None:
        """Run the callbacks waiting for this outcome and drop the others."""
        if committed:
            self._after_rollback.clear()
            callbacks, kind = self._after_commit, "on_commit"
        else:
            self._after_commit.clear()
            callbacks, kind = self._after_rollback, "on_rollback"
        while callbacks:
            callback = callbacks.pop(0)
            try:
                callback()
            except Exception:
                logger.exception("%s callback %r failed", kind, callback)

    def detach(self) -> PooledConnection | None:
        """Leave the request context; the connection stays checked out (for a retry)."""
        rec, self._rec = self._rec, None
        self.environ = {}  # no cycle through environ[TRANSACTION_KEY]
        token, self._token = self._token, None
        if token is not None:
            try:
                _current.reset(token)
            except ValueError:  # closed from another context
                _current.set(None)
        return rec

    def release(self) -> None:
        """Give the connection back to its registry (once)."""
        if self._rec is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %s: %s on backend pid %s",
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
                self.status,
                self.outcome or "no transaction",
                self._rec.backend_pid,
            )
        rec = self.detach()
        if rec is None:
            return
        conn = rec.conn
        conn._wsgi_pgconn_managed = False
        conn._wsgi_pgconn_on_begin = None
        registry = self._mw.registry
        if conn._wsgi_pgconn_error == READ_ONLY and _server_read_only(conn):
            # A read-only server where a writable one was: a failover happened.
            logger.warning(
                "backend pid %s is read-only (failover?): replacing this process's connections",
                rec.backend_pid,
            )
            registry.retire_all()
        registry.checkin(rec, used=self.used)

    def __del__(self) -> None:
        if self._rec is not None:
            logger.warning(
                "a response was never closed (the WSGI server must call close()); "
                "rolling back and releasing its connection"
            )
            try:
                self.finish(completed=False)
            finally:
                self.release()


class _Body:
    """The response iterable handed to the server.

    It yields what the application wrote or yielded before its status was
    known, then the rest of its body. ``close()`` closes the application's
    iterable, then commits or rolls back the work done while streaming, then
    releases the connection; each step runs even if the one before it failed.
    """

    __slots__ = ("_app_iter", "_done", "_first", "_iterator", "_txn")

    def __init__(
        self,
        txn: RequestTransaction,
        app_iter: Iterable[bytes],
        iterator: Iterator[bytes] | None,
        first: list[bytes],
    ) -> None:
        self._txn = txn
        self._app_iter = app_iter
        self._iterator = iterator
        self._first = first
        self._done = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        txn = self._txn
        if txn.buffer:
            return txn.buffer.pop(0)
        if self._first:
            return self._first.pop(0)
        if self._iterator is None:
            self._iterator = iter(self._app_iter)
        try:
            return next(self._iterator)
        except StopIteration:
            self._done = True
            raise
        except BaseException:
            txn.failed = True
            raise

    def close(self) -> None:
        txn = self._txn
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                try:
                    close()
                except BaseException:
                    txn.failed = True
                    raise
        finally:
            try:
                # A body not iterated to its end: the client went away.
                error = txn.finish(completed=self._done)
                if error is not None:
                    logger.error(
                        "COMMIT after streaming failed; the response was already sent: %s",
                        error,
                    )
            finally:
                txn.release()


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
    request, when its first cursor is created (for ``SET LOCAL`` and
    ``set_config(..., true)``); a request that never queries never runs it.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        dsn: str | None = None,
        scope: str | None = None,
        pool_size: int | None = None,
        pool_timeout: float | None = None,
        max_age: float | None = None,
        max_idle: float | None = None,
        isolation_level: str | None = None,
        statement_timeout: str | int | None = None,
        idle_in_transaction_timeout: str | int | None = None,
        connect_timeout: int | None = None,
        reset: str | None = None,
        check: str | None = None,
        exempt_paths: Iterable[str] | str | None = None,
        pooler: str | None = None,
        retries: int | None = None,
        retry_max_body: int | None = None,
        commit_veto: CommitVeto | None = None,
        configure: Callable[[ManagedConnection], object] | None = None,
        on_begin: Callable[[ManagedConnection, dict[str, Any]], object] | None = None,
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
            }.items()
            if value is not None
        }
        # Validate now, so a bad value fails at import of wsgi.py.
        self.settings = _config.parse(os.environ, **self._overrides)
        self.commit_veto: CommitVeto = commit_veto or default_commit_veto
        self.configure = configure
        self.on_begin = on_begin
        self._registry: Registry | None = None
        self._failure: ConfigurationError | None = None
        self._lock = threading.Lock()

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
            if self._failure is not None:
                raise self._failure
            if self._registry is not None:
                return self._registry
            try:
                from_request = _config.settings_environ(environ)
                if from_request:
                    self.settings = _config.parse(
                        {**os.environ, **from_request}, **self._overrides
                    )
                if self.settings.scope == "process" and environ.get("wsgi.multithread"):
                    raise ConfigurationError(
                        "WSGI_PGCONN_SCOPE=process needs a server with one thread per "
                        "process, but this server runs requests in several threads "
                        "(wsgi.multithread is true): set WSGI_PGCONN_SCOPE=thread (or pool)"
                    )
            except ConfigurationError as exc:
                self._failure = exc
                logger.error("wsgi_pgconn is misconfigured: %s", exc)
                raise
            registry = REGISTRIES[self.settings.scope](self.settings, configure=self.configure)
            self._registry = registry
            logger.debug("configured: %r", self.settings)
            return registry

    def stats(self) -> dict[str, Any]:
        """Counters of this process (keys documented in README.md, "Stats")."""
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
        exempt = self.settings.exempt_paths
        if exempt and environ.get("PATH_INFO", "").startswith(exempt):
            environ[EXEMPT_KEY] = True
            return self.app(environ, start_response)
        try:
            rec = registry.checkout()
        except PoolTimeout as exc:
            logger.warning("answering 503: %s", exc)
            return _unavailable(start_response, "all database connections are busy")
        except psycopg2.OperationalError:  # the registry logged why
            return _unavailable(start_response, "the database cannot be reached")
        rec.conn._wsgi_pgconn_managed = True
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
        conn._wsgi_pgconn_error = None
        txn = RequestTransaction(self, rec, environ)
        environ[CONNECTION_KEY] = conn
        environ[TRANSACTION_KEY] = txn
        txn._token = _current.set(weakref.ref(txn))
        result: Iterable[bytes] | None = None
        first: list[bytes] = []
        iterator: Iterator[bytes] | None = None
        try:
            if self.on_begin is not None:
                txn.arm_on_begin()
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
            error = txn.finish(completed=True)
        except BaseException as exc:
            code = getattr(exc, "pgcode", None) or _cause_sqlstate(exc)
            if code is not None and not conn.closed:
                conn._wsgi_pgconn_error = code
            retry = may_retry and code in RETRY_SQLSTATES and isinstance(exc, Exception)
            self._abort(txn, result, retry=retry)
            if retry:
                return _RETRY
            raise
        if may_retry and txn.outcome == "rollback" and conn._wsgi_pgconn_error in RETRY_SQLSTATES:
            # Failed, possibly answered 500 by the framework, nothing committed or sent.
            self._abort(txn, result, retry=True)
            return _RETRY
        if error is not None:
            logger.error("COMMIT failed, answering 500 instead of %r: %s", txn.status, error)
            in_doubt = conn.closed and isinstance(error, psycopg2.OperationalError)
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
        assert txn.status is not None
        try:
            txn.server_write = start_response(txn.status, txn.headers, txn.exc_info)
            txn.started = True
        except BaseException:
            self._abort(txn, result)
            raise
        if type(result) in (list, tuple) and iterator is None:
            # The body is complete: nothing more can touch the database.
            txn.release()
            if txn.buffer:
                return [*txn.buffer, *result]
            return result
        return _Body(txn, result, iterator, first)

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


def _server_read_only(conn: ManagedConnection) -> bool:
    """Whether the server itself is read-only (a standby, or fenced), not just this transaction.

    PostgreSQL 14+ reports both parameters to the client as they change, so
    this costs no round trip; with an older server, assume it is.
    """
    if conn.closed:
        return True
    standby = conn.info.parameter_status("in_hot_standby")
    fenced = conn.info.parameter_status("default_transaction_read_only")
    if standby is None and fenced is None:
        return True
    return "on" in (standby, fenced)


def _end_failed_commit(conn: ManagedConnection) -> None:
    """Send ROLLBACK after a COMMIT that failed, although the server has already ended it.

    PostgreSQL ends the transaction when COMMIT fails (a deferred constraint, a
    serialization failure) and psycopg2 then sends nothing more; pgpool-II
    (4.3.2 and later) keeps its own "failed transaction" flag set and answers
    the next BEGIN itself with 25P02 "current transaction is aborted". An
    explicit ROLLBACK clears it; PostgreSQL answers it with a harmless warning.
    """
    if conn.closed or conn.get_transaction_status() != _IDLE:
        return
    try:
        _connection.execute_autocommit(conn, [("ROLLBACK", None)])
    except psycopg2.Error:
        pass  # the connection is broken: the registry finds out at checkin
    finally:
        del conn.notices[:]


def _cause_sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error wrapped by a framework (Django's ``__cause__``)."""
    seen = 0
    cause = exc.__cause__ or exc.__context__
    while cause is not None and seen < 5:
        code = getattr(cause, "pgcode", None)
        if isinstance(code, str):
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
