"""One request's transaction: the commit-or-abort decision and the end of the transaction.

:func:`should_commit` is the decision, top to bottom. :class:`RequestTransaction`
carries what it needs (the status the application gave, whether it raised) and
ends the transaction: COMMIT before the status line is handed to the server
(a COMMIT that fails becomes a 500 rather than a 200 over lost data), or
ROLLBACK. :class:`Body` is the response iterable for bodies that may still
touch the database while they are sent: their work is committed when the
server closes the response.
"""

from __future__ import annotations

import contextvars
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .drivers import ACTIVE, IDLE, INTRANS
from .errors import PgConnError, first_line

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import WSGIEnvironment

    from .middleware import PgConnMiddleware
    from .scopes import PooledConnection

__all__ = [
    "Body",
    "RequestTransaction",
    "TransactionFailed",
    "current_transaction",
    "default_commit_veto",
    "publish_context",
    "should_commit",
]

logger = logging.getLogger("wsgi_pgconn")

#: SQLSTATE of a write on a read-only server.
READ_ONLY = "25006"

CommitVeto = Callable[[dict[str, Any], str, list[tuple[str, str]]], bool]

# Weak: a response the server never closes must stay collectable, so that
# Body.__del__ can roll it back and release its connection.
_current: contextvars.ContextVar[weakref.ref[RequestTransaction] | None] = contextvars.ContextVar(
    "wsgi_pgconn_transaction", default=None
)
#: Whether requests publish their transaction in :data:`_current` (see publish_context).
_publishing = False
_NO_ENVIRON: dict[str, Any] = {}


class TransactionFailed(PgConnError):
    """The request's transaction had failed although the application answered success."""


def publish_context() -> None:
    """Have every request make its transaction known to :func:`current_transaction`.

    Costs a context variable set and reset per request, so it is off until
    something needs it: the Django, SQLAlchemy and Flask adapters call this
    when they are imported. Call it at start-up (before requests run) to use
    :func:`current_transaction` from your own code.
    """
    global _publishing
    _publishing = True


def current_transaction() -> RequestTransaction | None:
    """The transaction of the request running in this context, or None outside requests.

    Raises RuntimeError unless :func:`publish_context` was called (an adapter
    was imported): without it, requests do not publish their transaction.
    """
    if not _publishing:
        raise RuntimeError(
            "current_transaction() needs wsgi_pgconn.transaction.publish_context() to be "
            "called at start-up (importing the Django, SQLAlchemy or Flask adapter does it); "
            "inside a request, environ['wsgi_pgconn.transaction'] is the same object"
        )
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


def should_commit(txn: RequestTransaction) -> bool:
    """The commit-or-abort decision, top to bottom.

    Roll back if the application raised (or its body iteration did), if it
    passed ``exc_info`` to ``start_response``, or if the veto says so (by
    default: a 5xx status; a vetoed commit is counted). Otherwise commit.
    """
    if txn.failed:
        return False
    if txn.exc_info is not None:
        return False
    veto = txn._mw.commit_veto
    if veto is default_commit_veto:
        vetoed = txn.status[:1] == "5"  # type: ignore[index]
    else:
        vetoed = bool(veto(txn.environ, txn.status, txn.headers))  # type: ignore[arg-type]
    if vetoed:
        txn._mw._count("vetoes")
        return False
    return True


class RequestTransaction:
    """One request's connection, its response status, and the commit at the end.

    Reachable as ``environ["wsgi_pgconn.transaction"]`` and from
    :func:`current_transaction` (used by the adapters). Callbacks given to
    :meth:`on_commit` run after a COMMIT succeeds; :meth:`on_rollback`
    callbacks run after a rollback. A callback that raises is logged and
    changes nothing.

    Attributes with a class default are set on the instance only when they
    change: most requests touch few of them.
    """

    #: The status line and headers the application gave (None: not yet).
    status: str | None = None
    headers: list[tuple[str, str]] = []  # noqa: RUF012 - replaced, never mutated
    exc_info: OptExcInfo | None = None
    #: True when the application raised, or asked for a rollback.
    failed = False
    #: True once the status line went to the server.
    started = False
    #: True when the request ran a transaction (for ``reset=discard``).
    used = False
    #: True when the transaction failed in the database (not just a 5xx answer).
    db_failed = False
    #: The SQLSTATE of the database error that ended the request, if one propagated.
    sqlstate: str | None = None
    #: "commit" or "rollback" once the request's transaction has ended that way.
    outcome: str | None = None
    #: What the application passed to ``write()`` before its status was sent.
    buffer: list[bytes] | None = None
    server_write: Callable[[bytes], object] | None = None
    _after_commit: list[Callable[[], object]] | None = None
    _after_rollback: list[Callable[[], object]] | None = None
    _token: contextvars.Token[weakref.ref[RequestTransaction] | None] | None = None

    __slots__ = ("__dict__", "__weakref__", "_mw", "_rec", "connection", "environ")

    def __init__(
        self, mw: PgConnMiddleware, rec: PooledConnection, environ: WSGIEnvironment
    ) -> None:
        self._mw = mw
        self._rec: PooledConnection | None = rec
        self.connection: Any = rec.conn
        self.environ = environ

    def on_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after the request's work is committed (not if it rolls back)."""
        if self._after_commit is None:
            self._after_commit = []
        self._after_commit.append(callback)

    def on_rollback(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` after the request's work is rolled back."""
        if self._after_rollback is None:
            self._after_rollback = []
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
            self.exc_info = exc_info
        elif self.started:
            raise AssertionError("start_response called twice without exc_info")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        if self.server_write is not None:
            self.server_write(data)
        elif self.buffer is None:
            self.buffer = [data]
        else:
            self.buffer.append(data)

    # -- ending the transaction -----------------------------------------------

    def finish(self, completed: bool) -> BaseException | None:
        """End what the request opened: commit if it ``completed`` and :func:`should_commit`.

        An idle connection (nothing queried since the last end) costs nothing.
        Returns the error when the work could not be committed.
        """
        conn = self.connection
        mw = self._mw
        status = mw._status(conn)
        began = conn._wsgi_pgconn_began
        if status == IDLE:
            if began:
                # Begun by a cursor, no longer open: ended by the application's SQL.
                conn._wsgi_pgconn_began = 0
                self.used = True
                _warn_ended_by_sql(conn, mw)
            elif self._after_commit or self._after_rollback:
                # Nothing to COMMIT, but callbacks wait for the request's outcome
                # (Django's on_commit() in a view that ran no query).
                self._settle(completed and should_commit(self))
            return None
        if conn.closed and self.outcome == "rollback":
            return None  # a lost connection, already ended once
        self.used = True
        if began > 1:
            _warn_ended_by_sql(conn, mw)
        conn._wsgi_pgconn_began = 0
        commit = completed and should_commit(self)
        if commit and status == INTRANS:
            driver = mw.driver
            rec = self._rec
            if rec is not None and rec.poller.poll(0) and not driver.drain(conn):
                # The server ended the session while the request held it (its
                # termination notice was already on the socket): nothing to COMMIT.
                return self._ended_before_commit(rec)
            try:
                driver.commit(conn)
            except driver.Error as exc:
                mw._count("commit_errors")
                self.db_failed = True
                self.sqlstate = driver.sqlstate(exc) or type(exc).__name__
                if mw.settings.pooler != "none":
                    _end_failed_commit(mw, conn)
                self._rollback_after_failure()
                return exc
            rec = self._rec
            if rec is not None:
                rec.commits += 1
            else:
                mw._count("commits")
            self.outcome = "commit"
            if mw.on_begin is not None:
                self.arm_on_begin()  # a streamed body may begin another transaction
            if self._after_commit or self._after_rollback:
                self._settle(committed=True)
            return None
        if status != INTRANS:
            self.db_failed = True  # failed statement, or a lost connection
        self._rollback_after_failure()
        if commit and self.status is not None and self.status[:1] in "123":
            # The application caught a database error (or lost its connection)
            # and answered success anyway: its work is lost; the response must say so.
            lost = "lost its connection" if conn.closed else "caught a database error"
            return TransactionFailed(
                f"the transaction had failed (the application {lost} and still answered "
                f"{self.status!r}); it was rolled back"
            )
        return None

    def _ended_before_commit(self, rec: PooledConnection) -> TransactionFailed:
        """The session was gone before COMMIT was sent: the server rolled the work back."""
        mw = self._mw
        driver = mw.driver
        conn = self.connection
        why = driver.last_notice(conn) or "the server closed the connection"
        mw._count("commit_errors")
        self.db_failed = True
        driver.close(conn)  # nothing more can be sent on it; the registry discards it
        self._rollback_after_failure()
        return TransactionFailed(
            f"the server had ended the session of backend pid {rec.backend_pid} before COMMIT "
            f"was sent ({why}); nothing was saved"
        )

    def _rollback_after_failure(self) -> None:
        conn = self.connection
        mw = self._mw
        # ACTIVE: a statement still runs (the request gave up on it); the registry
        # cancels it and discards the connection at checkin.
        if not conn.closed and mw._status(conn) != ACTIVE:
            try:
                mw.driver.rollback(conn)
            except mw.driver.Error as exc:
                logger.warning(
                    "rollback failed on backend pid %s: %s",
                    mw.driver.backend_pid(conn) if not conn.closed else "?",
                    first_line(exc),
                )
        rec = self._rec
        if rec is not None:
            rec.rollbacks += 1
        else:
            mw._count("rollbacks")
        self.outcome = "rollback"
        if mw.on_begin is not None:
            self.arm_on_begin()
        if self._after_commit or self._after_rollback:
            self._settle(committed=False)

    def _settle(self, committed: bool) -> None:
        """Run the callbacks waiting for this outcome and drop the others."""
        if committed:
            self._after_rollback = None
            callbacks, kind = self._after_commit, "on_commit"
        else:
            self._after_commit = None
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
        self.environ = _NO_ENVIRON  # no cycle through environ[TRANSACTION_KEY]
        token = self._token
        if token is not None:
            self._token = None
            try:
                _current.reset(token)
            except ValueError:  # closed from another context
                _current.set(None)
        return rec

    def release(self) -> None:
        """Give the connection back to its registry (once)."""
        rec = self._rec
        if rec is None:
            return
        mw = self._mw
        if mw._registry.debug:  # type: ignore[union-attr]
            logger.debug(
                "%s %s -> %s: %s on backend pid %s",
                self.environ.get("REQUEST_METHOD"),
                self.environ.get("PATH_INFO"),
                self.status,
                self.outcome or "no transaction",
                rec.backend_pid,
            )
        self._rec = None
        self.environ = _NO_ENVIRON  # no cycle through environ[TRANSACTION_KEY]
        if self._token is not None:
            self.detach()
        conn = rec.conn
        conn._wsgi_pgconn_begin = None
        if mw.on_begin is not None:
            conn._wsgi_pgconn_on_begin = None
        if conn._wsgi_pgconn_cursors is not None:  # their transaction has ended
            conn._wsgi_pgconn_cursors = None
        if (self.db_failed or self.sqlstate == READ_ONLY) and _server_read_only(
            mw, conn, self.sqlstate
        ):
            # A read-only server where a writable one was: a failover happened.
            logger.warning(
                "backend pid %s is read-only (failover?): replacing this process's connections",
                rec.backend_pid,
            )
            mw.registry.retire_all()
        mw.registry.checkin(rec, self.used)


class Body:
    """The response iterable handed to the server for a body that may still query.

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

    def __iter__(self) -> Body:
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

    def __del__(self) -> None:
        txn = self._txn
        if txn._rec is not None:
            logger.warning(
                "a response was never closed (the WSGI server must call close(); with a "
                "test client: read it whole, use buffered=True, or 'with client.get(...) "
                "as response:'); rolling back and releasing its connection"
            )
            try:
                txn.finish(completed=False)
            finally:
                txn.release()



def _warn_ended_by_sql(conn: Any, mw: PgConnMiddleware) -> None:
    logger.warning(
        "the application ended its transaction with SQL COMMIT/ROLLBACK on backend pid %s; "
        "use savepoints instead",
        mw.driver.backend_pid(conn) if not conn.closed else "?",
    )


def _server_read_only(mw: PgConnMiddleware, conn: Any, sqlstate: str | None) -> bool:
    """Whether the server itself is read-only (a standby, or fenced), not just this transaction.

    PostgreSQL 14+ reports both parameters to the client as they change, so
    this costs no round trip; with an older server, trust SQLSTATE 25006.
    """
    if conn.closed:
        return sqlstate == READ_ONLY
    driver = mw.driver
    standby = driver.parameter_status(conn, "in_hot_standby")
    fenced = driver.parameter_status(conn, "default_transaction_read_only")
    if standby is None and fenced is None:
        return sqlstate == READ_ONLY
    return "on" in (standby, fenced)


def _end_failed_commit(mw: PgConnMiddleware, conn: Any) -> None:
    """Send ROLLBACK after a COMMIT that failed, although the server has already ended it.

    PostgreSQL ends the transaction when COMMIT fails (a deferred constraint, a
    serialization failure) and the driver then sends nothing more; pgpool-II
    (4.3.2 and later) keeps its own "failed transaction" flag set and answers
    the next BEGIN itself with 25P02 "current transaction is aborted". An
    explicit ROLLBACK clears it; PostgreSQL answers it with a harmless warning.
    """
    driver = mw.driver
    if conn.closed or driver.transaction_status(conn) != IDLE:
        return
    try:
        driver.execute_outside_transaction(conn, [("ROLLBACK", None)])
    except driver.Error:
        pass  # the connection is broken: the registry finds out at checkin
    finally:
        driver.clear_notices(conn)
