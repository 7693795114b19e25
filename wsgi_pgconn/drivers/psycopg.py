"""psycopg (version 3) behind the driver seam.

A managed connection is in psycopg's autocommit mode, so psycopg never sends
BEGIN on its own; :meth:`ManagedConnection._start_query` (the method psycopg
calls before every statement, from every kind of cursor) sends the request's
BEGIN instead. When the first statement is a cursor's ``execute()``, it runs
in pipeline mode: BEGIN (with the isolation level, and the transaction-pooler
prelude) and the statement go out in one network write and come back in one
round trip. ``executemany()`` already uses a pipeline and takes BEGIN into
it. Server-side cursors, ``copy()`` and ``stream()`` send BEGIN as its own
round trip first (psycopg does not pipeline them).

While a request holds the connection, ``conn.transaction()`` blocks are
savepoints of the request's transaction, and ``commit()``, ``rollback()``,
``close()``, ``with conn:`` and the session characteristics are refused.

This module uses some of psycopg's internals (``Connection._start_query``,
``_exec_command``, the ``_pipeline`` attribute, ``Pipeline._enter_gen``,
``_sync_gen`` and ``_exit``), present from psycopg 3.1 to 3.3; the test suite
fails if they change.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg
from psycopg import pq

from .. import errors
from ..connection import begin_statements
from . import ACTIVE, IDLE, ManagedState, refusing, refusing_setter, track_cursor

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["ManagedConnection", "managed_class"]

name = "psycopg"
Error = psycopg.Error
OperationalError = psycopg.OperationalError


class PoolTimeout(errors.PoolTimeout, psycopg.OperationalError):
    __doc__ = errors.PoolTimeout.__doc__


class ConnectBackoff(errors.ConnectBackoff, psycopg.OperationalError):
    __doc__ = errors.ConnectBackoff.__doc__


class TransactionManaged(errors.TransactionManaged, psycopg.ProgrammingError):
    __doc__ = errors.TransactionManaged.__doc__


_BAD = pq.ConnStatus.BAD
_Base: Any = psycopg.Connection


def version() -> str:
    lib = pq.version()
    return (
        f"psycopg {psycopg.__version__} ({pq.__impl__} implementation, "
        f"libpq {lib // 10000}.{lib % 10000})"
    )


# -- beginning the request's transaction --------------------------------------------------


def _run_on_begin(conn: ManagedConnection) -> None:
    """Run the request's ``on_begin`` hook, once, before its transaction's first statement."""
    on_begin = conn._wsgi_pgconn_on_begin
    if on_begin is not None:
        conn._wsgi_pgconn_on_begin = None  # its own statements must not re-enter
        on_begin()


def _begin_now(conn: ManagedConnection) -> None:
    """Begin the request's transaction now, if no transaction is open (BEGIN alone)."""
    if conn._wsgi_pgconn_begin is not None and conn.pgconn.transaction_status == IDLE:
        _run_on_begin(conn)
        if conn.pgconn.transaction_status == IDLE:
            with conn.lock:
                conn.wait(conn._start_query())


def _pipelined(conn: ManagedConnection, run: Callable[[], object]) -> None:
    """Run ``run()`` (one statement) in a pipeline, after the BEGIN it queues: one round trip.

    Unlike psycopg's own ``pipeline()`` block, the pipeline ends with a Sync
    alone: psycopg follows it with a Flush, after which PostgreSQL leaves
    ``idle_in_transaction_session_timeout`` disarmed until the next statement,
    and a request stuck after its first statement would never be ended by it.
    """
    pipeline = psycopg.Pipeline(conn)
    with conn.lock:
        conn._pipeline = pipeline
        conn.wait(pipeline._enter_gen())
    conn._wsgi_pgconn_own_pipeline = True
    error: BaseException | None = None
    try:
        run()
    except BaseException as exc:
        error = exc
        raise
    finally:
        conn._wsgi_pgconn_own_pipeline = False
        try:
            if error is None or isinstance(error, Exception):
                with conn.lock:
                    try:
                        conn.wait(pipeline._sync_gen())
                    except psycopg.Error:
                        # Not after an exception raised into the wait (a request
                        # timeout): the statement is still running.
                        if pipeline.result_queue:
                            _read_to_sync(conn, pipeline)
                        raise
        except BaseException as exc:
            if error is None:
                error = exc
                raise
        finally:
            if isinstance(error, Exception) and conn.pgconn.status == pq.ConnStatus.BAD:
                # A fatal error (the session was terminated) left results that will
                # never come: the connection is over.
                conn._pipeline = None
                _Base.close(conn)
            elif error is None or isinstance(error, Exception) or (
                conn.pgconn.transaction_status != ACTIVE
            ):
                pipeline._exit(error)
                conn._pipeline = None
            else:
                # An exception raised into the wait (a request timeout) left the
                # statement running, its result pending: the pipeline cannot be
                # left. The registry cancels the statement and discards the connection.
                conn._pipeline = None


def _read_to_sync(conn: ManagedConnection, pipeline: psycopg.Pipeline) -> None:
    """Read the results the Sync left unread (with the lock held); errors are ignored.

    When a statement's error is read before the answer to the Sync, psycopg
    may stop at the end of that statement's results and leave the Sync's
    unread: the connection would look busy and be discarded. The first error
    is raised already; what follows it is the aborted rest and the Sync.
    """
    for _ in range(4):  # one result set per call; the queue holds at most BEGIN, statement, Sync
        if not pipeline.result_queue or conn.pgconn.status == pq.ConnStatus.BAD:
            return
        with suppress(psycopg.Error):
            conn.wait(pipeline._fetch_gen(flush=False))


def _several_statements(conn: ManagedConnection, query: Any) -> bool:
    """Whether ``query`` (without parameters) may hold several statements.

    psycopg sends a query without parameters with the simple-query protocol,
    which takes several statements; in a pipeline it would use the extended
    protocol, which refuses them. Such a query takes BEGIN as its own round trip.
    """
    if isinstance(query, psycopg.sql.Composable):
        query = query.as_bytes(conn)
    if isinstance(query, str):
        return ";" in query
    if isinstance(query, (bytes, bytearray, memoryview)):
        return b";" in bytes(query)
    return True


class _Cursor:
    """Mixed in below every client-side cursor class of a managed connection."""

    __slots__ = ()
    #: The user's cursor class this one was made for.
    _wsgi_pgconn_factory: Any = None
    _conn: ManagedConnection

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        conn = self._conn
        if conn._wsgi_pgconn_begin is not None and conn.pgconn.transaction_status == IDLE:
            _run_on_begin(conn)
            if (
                conn.pgconn.transaction_status == IDLE
                and conn._wsgi_pgconn_pipeline
                and conn._pipeline is None
                and (params is not None or not _several_statements(conn, query))
            ):
                # BEGIN and the statement in one pipeline: one round trip.
                _pipelined(conn, lambda: super(_Cursor, self).execute(query, params, **kwargs))  # type: ignore[misc]
                return self
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if conn._wsgi_pgconn_begin is not None and conn.pgconn.transaction_status == IDLE:
            _run_on_begin(conn)
        return super().executemany(*args, **kwargs)  # type: ignore[misc]

    @contextmanager
    def copy(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        _begin_now(self._conn)
        with super().copy(*args, **kwargs) as copy:  # type: ignore[misc]
            yield copy

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        _begin_now(self._conn)
        return super().stream(*args, **kwargs)  # type: ignore[misc, no-any-return]


class _ServerCursor:
    """Mixed in below every server-side cursor class of a managed connection."""

    __slots__ = ()
    _wsgi_pgconn_factory: Any = None
    _conn: ManagedConnection

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if conn._wsgi_pgconn_begin is None:
            return super().execute(*args, **kwargs)  # type: ignore[misc]
        if conn.pgconn.transaction_status == IDLE:
            _run_on_begin(conn)
        result = super().execute(*args, **kwargs)  # type: ignore[misc]
        if not self.withhold:  # type: ignore[attr-defined]
            track_cursor(conn, self)  # the request's COMMIT waits while it is open
        return result


class _Recording:
    """Remembers the SQLSTATE of a failed statement on the connection (retries only)."""

    __slots__ = ()
    _conn: ManagedConnection

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute(*args, **kwargs)  # type: ignore[misc]
        except psycopg.Error as exc:
            self._conn._wsgi_pgconn_sqlstate = exc.sqlstate or type(exc).__name__
            raise

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().executemany(*args, **kwargs)  # type: ignore[misc]
        except psycopg.Error as exc:
            self._conn._wsgi_pgconn_sqlstate = exc.sqlstate or type(exc).__name__
            raise


_classes: dict[tuple[Any, bool], type[Any]] = {}
_classes_lock = threading.Lock()


def managed_class(factory: Any, *, recording: bool) -> Any:
    """``factory`` (a psycopg cursor class) with this module's mixins in front of it."""
    factory = getattr(factory, "_wsgi_pgconn_factory", factory)
    if not (isinstance(factory, type) and issubclass(factory, psycopg.Cursor)):
        return factory
    key = (factory, recording)
    cls = _classes.get(key)
    if cls is None:
        mixin = _ServerCursor if issubclass(factory, psycopg.ServerCursor) else _Cursor
        bases: tuple[type[Any], ...] = (mixin, factory)
        if recording:
            bases = (_Recording, *bases)
        cls = type(
            "Managed" + factory.__name__,
            bases,
            {"__slots__": (), "_wsgi_pgconn_factory": factory, "__module__": __name__},
        )
        with _classes_lock:
            cls = _classes.setdefault(key, cls)
    return cls


# -- the connection ------------------------------------------------------------------------


class ManagedConnection(ManagedState, psycopg.Connection[Any]):
    """A psycopg connection whose transaction belongs to the middleware during a request.

    Between requests (and in ``configure`` hooks) it is an ordinary
    connection in autocommit mode. While a request holds it, its statements
    run in the request's transaction, ``autocommit`` reads False,
    ``transaction()`` blocks are savepoints, and ending or reconfiguring the
    transaction raises :class:`~wsgi_pgconn.errors.TransactionManaged`.
    """

    _wsgi_pgconn_bbegin: tuple[bytes, ...] = ()
    _wsgi_pgconn_own_pipeline = False
    _wsgi_pgconn_recording = False
    _wsgi_pgconn_notices = 0
    _wsgi_pgconn_last_notice: str | None = None

    def _wsgi_pgconn_refuse(self, what: str) -> NoReturn:
        raise TransactionManaged(
            f"{what} is not allowed on a connection managed by wsgi_pgconn: the request's "
            "transaction is committed when the response succeeds and rolled back when it "
            "fails. Use conn.transaction() (a savepoint) to undo part of the work, or a "
            "connection of your own."
        )

    def _start_query(self) -> Any:  # psycopg's hook before every statement
        if self._wsgi_pgconn_begin is not None and self.pgconn.transaction_status == IDLE:
            self._wsgi_pgconn_began += 1
            for statement in self._wsgi_pgconn_bbegin:
                yield from self._exec_command(statement)
            pipeline = self._pipeline
            if pipeline is not None and not self._wsgi_pgconn_own_pipeline:
                # The application's pipeline: send them now (no waiting for
                # results), so that its next statement does not begin again.
                yield from pipeline._communicate_gen()
            return
        if not self._autocommit:  # (managed connections always are: nothing to do)
            yield from super()._start_query()

    # Cursor classes: the user's, with this module's mixins in front.
    @property
    def cursor_factory(self) -> Any:
        return self.__dict__["_wsgi_pgconn_cursor_factory"]

    @cursor_factory.setter
    def cursor_factory(self, value: Any) -> None:
        self.__dict__["_wsgi_pgconn_cursor_factory"] = managed_class(
            value, recording=self._wsgi_pgconn_recording
        )

    @property
    def server_cursor_factory(self) -> Any:
        return self.__dict__["_wsgi_pgconn_server_cursor_factory"]

    @server_cursor_factory.setter
    def server_cursor_factory(self, value: Any) -> None:
        self.__dict__["_wsgi_pgconn_server_cursor_factory"] = managed_class(
            value, recording=self._wsgi_pgconn_recording
        )

    @contextmanager
    def transaction(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """A savepoint of the request's transaction while a request holds the connection."""
        _begin_now(self)
        with super().transaction(*args, **kwargs) as tx:
            yield tx

    @property
    def autocommit(self) -> bool:
        """False while a request holds the connection (its transaction is the middleware's)."""
        if self._wsgi_pgconn_begin is not None:
            return False
        return bool(self._autocommit)

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self.set_autocommit(value)

    def __enter__(self) -> Any:
        if self._wsgi_pgconn_begin is not None:
            self._wsgi_pgconn_refuse("'with connection:'")
        return super().__enter__()

    commit = refusing(_Base, "commit")
    rollback = refusing(_Base, "rollback")
    close = refusing(_Base, "close")
    set_autocommit = refusing(_Base, "set_autocommit")
    set_isolation_level = refusing(_Base, "set_isolation_level")
    set_read_only = refusing(_Base, "set_read_only")
    set_deferrable = refusing(_Base, "set_deferrable")
    tpc_begin = refusing(_Base, "tpc_begin")
    isolation_level = refusing_setter(_Base, "isolation_level")
    read_only = refusing_setter(_Base, "read_only")
    deferrable = refusing_setter(_Base, "deferrable")


def _count_notice(ref: weakref.ref[ManagedConnection], diagnostic: Any) -> None:
    conn = ref()
    if conn is not None:
        conn._wsgi_pgconn_notices += 1
        # Read now: a Diagnostic reads its result, which is gone once the connection is.
        conn._wsgi_pgconn_last_notice = (
            f"{diagnostic.severity}: {diagnostic.message_primary} "
            f"(SQLSTATE {diagnostic.sqlstate})"
        )


# -- the seam ------------------------------------------------------------------------------


def parse_conninfo(conninfo: str) -> dict[str, str]:
    return {key: str(value) for key, value in psycopg.conninfo.conninfo_to_dict(conninfo).items()}


def make_conninfo(conninfo: str = "", **params: str) -> str:
    return psycopg.conninfo.make_conninfo(conninfo, **params)


def connect(
    conninfo: str, settings: Settings, configure: Callable[[Any], object] | None
) -> ManagedConnection:
    conn = ManagedConnection.connect(
        conninfo, autocommit=True, prepare_threshold=settings.prepare_threshold
    )
    try:
        conn._wsgi_pgconn_bbegin = tuple(s.encode() for s in begin_statements(settings))
        conn._wsgi_pgconn_pipeline = settings.pipeline_begin and psycopg.Pipeline.is_supported()
        conn._wsgi_pgconn_recording = settings.retries > 0
        conn.cursor_factory = conn.cursor_factory  # again, now that recording is known
        conn.server_cursor_factory = conn.server_cursor_factory
        conn.add_notice_handler(functools.partial(_count_notice, weakref.ref(conn)))
        setup(conn, settings, configure)
    except BaseException:
        _Base.close(conn)
        raise
    return conn


def setup(
    conn: ManagedConnection, settings: Settings, configure: Callable[[Any], object] | None
) -> None:
    if configure is not None:
        configure(conn)
        # Whatever the hook left open is committed: its session settings persist.
        if conn.pgconn.transaction_status != IDLE:
            _Base.commit(conn)
        if not conn._autocommit:
            _Base.set_autocommit(conn, True)


#: libpq's transaction status of a connection (C-implemented: called on every request).
transaction_status: Callable[[Any], int] = operator.attrgetter("pgconn.transaction_status")


def is_closed(conn: Any) -> bool:
    return bool(conn.closed)


def backend_pid(conn: Any) -> int:
    return conn.pgconn.backend_pid  # type: ignore[no-any-return]


def fileno(conn: Any) -> int:
    return conn.pgconn.socket  # type: ignore[no-any-return]


def parameter_status(conn: Any, name: str) -> str | None:
    value: str | None = conn.info.parameter_status(name)
    return value


def drain(conn: Any) -> bool:
    """Read what arrived on an idle connection; False if the backend is gone.

    A NOTIFY is harmless (psycopg keeps it for ``conn.notifies()``). A
    terminated backend sends an error (FATAL, which libpq files as a notice
    on an idle connection) and then closes: any new notice means dead.
    """
    pgconn = conn.pgconn
    seen = conn._wsgi_pgconn_notices
    try:
        pgconn.consume_input()
        pgconn.is_busy()  # parses what arrived: notices reach the handler
    except psycopg.Error:
        return False
    alive: bool = conn._wsgi_pgconn_notices == seen and pgconn.status != _BAD
    return alive


def last_notice(conn: Any) -> str | None:
    notice: str | None = getattr(conn, "_wsgi_pgconn_last_notice", None)
    return notice


begin = _begin_now
pipelined = _pipelined


def use_adapters(conn: Any, adapters: Any) -> None:
    # What psycopg.Connection.connect(context=...) does with a context's adapters.
    conn._adapters = psycopg.adapt.AdaptersMap(adapters)


def jsonb_as_text(conn: Any) -> None:
    from psycopg.types.string import TextLoader

    conn.adapters.register_loader("jsonb", TextLoader)


def commit(conn: Any) -> None:
    _Base.commit(conn)


def rollback(conn: Any) -> None:
    _Base.rollback(conn)


def _execute_plain(conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
    begin = conn.__dict__.pop("_wsgi_pgconn_begin", None)  # no BEGIN for these
    try:
        cur = psycopg.ClientCursor(conn)
        try:
            for statement, params in statements:
                cur.execute(statement, params)
        finally:
            cur.close()
    finally:
        if begin is not None:
            conn._wsgi_pgconn_begin = begin


def execute_outside_transaction(conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
    manual = not conn._autocommit
    if manual:  # a plain psycopg connection (the Django adapter's own)
        _Base.set_autocommit(conn, True)
    try:
        _execute_plain(conn, statements)
    finally:
        if manual and not conn.closed:
            _Base.set_autocommit(conn, False)


def execute_in_transaction(conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
    _execute_plain(conn, statements)


def clear_notices(conn: Any) -> None:
    pass  # psycopg hands notices to handlers; none are kept


def cancel(conn: Any) -> None:
    conn.cancel_safe(timeout=5.0)


def close(conn: Any) -> None:
    _Base.close(conn)


def sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "sqlstate", None)
    return code if isinstance(code, str) else None


# -- greenlets --------------------------------------------------------------------------


def cooperate(library: str) -> str | None:
    """psycopg waits through gevent's (or eventlet's) patched ``select``, where patched.

    psycopg picks its wait function when it is imported: a C function,
    unless gevent had patched ``select`` by then. Imported before the
    patching (gunicorn ``--preload``), it would block the process; the
    patched ``select`` is used instead.
    """
    import select

    from psycopg import waiting

    patched = getattr(select.select, "__module__", "").startswith(("gevent", "eventlet"))
    if not patched:
        return (
            f"psycopg waits for the server without yielding under {library} (select is not "
            "monkey-patched): every query blocks the whole process. Patch first: "
            "gevent.monkey.patch_all() at the top of wsgi.py, before anything else is "
            "imported, or uWSGI's --gevent-monkey-patch"
        )
    if waiting.wait is getattr(waiting, "wait_c", None):
        waiting.wait = waiting.wait_poll if hasattr(select, "poll") else waiting.wait_select
    return None
