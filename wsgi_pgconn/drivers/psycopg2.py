"""psycopg2 behind the driver seam.

A managed connection runs in psycopg2's autocommit mode, so psycopg2 never
sends BEGIN on its own. The cursor classes of this module begin the request's
transaction instead: when a request's first statement finds no transaction
open, BEGIN (with the isolation level, and the transaction-pooler prelude) is
put in front of it, ``BEGIN; <prelude>; <statement>``, and the whole travels in
one message and one round trip (psycopg2 uses the simple-query protocol, which
takes several statements). psycopg2 reports the results of the last statement:
the application sees its own statement's rows, ``rowcount``, ``statusmessage``
and errors. COMMIT and ROLLBACK are sent as SQL by the middleware.

What cannot ride along takes the old path, BEGIN as its own round trip first:
``executemany()``, ``callproc()``, ``copy_*()``, named cursors ``WITH HOLD``,
cursor factories that are not classes, and ``pipeline_begin=False``. A named
(server-side) cursor without HOLD is declared by this module
(``DECLARE ... CURSOR WITHOUT HOLD FOR ...``, with BEGIN in front when it is
the first statement), because psycopg2 refuses named cursors in autocommit
mode; closing it costs psycopg2's usual existence check plus ``CLOSE``.

Differences the application can see: ``cursor.query`` omits the BEGIN (it is
stripped), but the text of a syntax error's ``LINE 1:`` context and
``diag.statement_position`` include it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql

from .. import errors
from ..connection import begin_statements
from . import IDLE, ManagedState, refusing, refusing_setter, track_cursor

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["Cursor", "ManagedConnection", "NamedCursor"]

logger = logging.getLogger("wsgi_pgconn")

name = "psycopg2"
Error = psycopg2.Error
OperationalError = psycopg2.OperationalError


class PoolTimeout(errors.PoolTimeout, psycopg2.OperationalError):
    __doc__ = errors.PoolTimeout.__doc__


class ConnectBackoff(errors.ConnectBackoff, psycopg2.OperationalError):
    __doc__ = errors.ConnectBackoff.__doc__


class TransactionManaged(errors.TransactionManaged, psycopg2.ProgrammingError):
    __doc__ = errors.TransactionManaged.__doc__


_base: Any = ext.connection
_new_cursor = ext.connection.cursor
_execute = ext.cursor.execute
_executemany = ext.cursor.executemany
_status = ext.connection.get_transaction_status
_query_of = ext.cursor.query.__get__
_autocommit: Any = ext.connection.autocommit
_factory: Any = ext.connection.cursor_factory


def version() -> str:
    lib = ext.libpq_version()
    own = getattr(psycopg2, "__version__", "?").split()[0]
    return f"psycopg2 {own} (libpq {lib // 10000}.{lib % 10000})"


# -- beginning the request's transaction ---------------------------------------------


def _begin(conn: ManagedConnection, cur: Any = None, query: Any = None, vars: Any = None) -> Any:
    """Begin the request's transaction, with ``query`` on ``cur`` if given; its result."""
    on_begin = conn._wsgi_pgconn_on_begin
    if on_begin is not None:
        conn._wsgi_pgconn_on_begin = None  # its own statements must not re-enter
        on_begin()
        if _status(conn) != IDLE:  # the hook's statements began it
            return None if cur is None else _execute(cur, query, vars)
    conn._wsgi_pgconn_began += 1
    if cur is not None and conn._wsgi_pgconn_pipeline:
        if isinstance(query, sql.Composable):
            query = query.as_string(conn)
        prefixed: str | bytes | None = None
        if isinstance(query, str) and query.strip():
            prefixed = conn._wsgi_pgconn_prefix + query
        elif isinstance(query, bytes) and query.strip():
            prefixed = conn._wsgi_pgconn_bprefix + query
        if prefixed is not None:
            try:
                return _execute(cur, prefixed, vars)
            except psycopg2.Error:
                if conn.closed or _status(conn) != IDLE:
                    raise
                # PostgreSQL refused the whole message before BEGIN ran (a syntax
                # error): begin on its own, and let the statement fail again inside
                # the transaction, which is then failed, as without the fast path.
    _execute(conn._wsgi_pgconn_internal, conn._wsgi_pgconn_bprefix)
    return None if cur is None else _execute(cur, query, vars)


def _begun(cur: Any) -> ManagedConnection:
    """``cur``'s connection, with the request's transaction begun if it was not."""
    conn: ManagedConnection = cur.connection
    if conn._wsgi_pgconn_begin is not None and _status(conn) == IDLE:
        _begin(conn)
    return conn


class Cursor(ext.cursor):
    """The cursor of a managed connection: its first statement in a request begins the transaction.

    Other cursor classes (``cursor_factory=RealDictCursor`` and the like) are
    combined with this one, below them, so that their ``execute`` reaches it.
    """

    __slots__ = ()
    #: The user's cursor class this one was made for (None: none).
    _wsgi_pgconn_factory: Any = None

    def execute(self, query: Any, vars: Any = None) -> None:
        conn: Any = self.connection
        if _status(conn) == IDLE and conn._wsgi_pgconn_begin is not None:
            return _begin(conn, self, query, vars)  # type: ignore[no-any-return]
        return _execute(self, query, vars)

    def executemany(self, query: Any, vars_list: Any) -> None:
        _begun(self)
        return _executemany(self, query, vars_list)

    def callproc(self, procname: Any, parameters: Any = None) -> Any:
        _begun(self)
        return ext.cursor.callproc(self, procname, parameters)

    def copy_expert(self, sql: Any, file: Any, size: int = 8192) -> None:
        _begun(self)
        return ext.cursor.copy_expert(self, sql, file, size)

    def copy_from(self, *args: Any, **kwargs: Any) -> None:
        _begun(self)
        return ext.cursor.copy_from(self, *args, **kwargs)

    def copy_to(self, *args: Any, **kwargs: Any) -> None:
        _begun(self)
        return ext.cursor.copy_to(self, *args, **kwargs)

    @property
    def query(self) -> bytes | None:
        """The last query sent, without the BEGIN this module put in front of it."""
        text: bytes | None = _query_of(self)
        prefix = self.connection._wsgi_pgconn_bprefix  # type: ignore[attr-defined]
        if text is not None and prefix and text.startswith(prefix):
            return text[len(prefix) :]
        return text


class NamedCursor(Cursor):
    """A named (server-side) cursor of a managed connection.

    psycopg2 refuses to declare one in autocommit mode; during a request this
    class declares it itself, in the request's transaction, and psycopg2's
    own fetch and close then work on it as usual.
    """

    __slots__ = ("_wsgi_pgconn_declared",)

    def execute(self, query: Any, vars: Any = None) -> None:
        conn: Any = self.connection
        if conn._wsgi_pgconn_begin is None or self.withhold:
            # Outside requests, or WITH HOLD (which psycopg2 allows in autocommit).
            _begun(self)
            return _execute(self, query, vars)
        if self.closed:
            raise psycopg2.InterfaceError("cursor already closed")
        if getattr(self, "_wsgi_pgconn_declared", None) is not None or _query_of(self):
            raise psycopg2.ProgrammingError("can't call .execute() on named cursors more than once")
        scroll = {None: b"", True: b"SCROLL ", False: b"NO SCROLL "}[self.scrollable]
        declare = b"".join(
            (
                b"DECLARE ",
                ext.quote_ident(str(self.name), conn).encode(),
                b" ",
                scroll,
                b"CURSOR WITHOUT HOLD FOR ",
                self.mogrify(query, vars),
            )
        )
        internal = conn._wsgi_pgconn_internal
        if _status(conn) == IDLE:
            _begin(conn, internal, declare)
        else:
            _execute(internal, declare)
        self._wsgi_pgconn_declared = declare
        track_cursor(conn, self)  # the request's COMMIT waits while it is open
        return None

    @property
    def query(self) -> bytes | None:
        declared: bytes | None = getattr(self, "_wsgi_pgconn_declared", None)
        if declared is not None:
            return declared
        text: bytes | None = _query_of(self)
        return text


class _Recording:
    """Remembers the SQLSTATE of a failed statement on the connection (retries only)."""

    __slots__ = ()

    def execute(self, query: Any, vars: Any = None) -> None:
        try:
            return super().execute(query, vars)  # type: ignore[misc, no-any-return]
        except psycopg2.Error as exc:
            self.connection._wsgi_pgconn_sqlstate = exc.pgcode or type(exc).__name__  # type: ignore[attr-defined]
            raise

    def executemany(self, query: Any, vars_list: Any) -> None:
        try:
            return super().executemany(query, vars_list)  # type: ignore[misc, no-any-return]
        except psycopg2.Error as exc:
            self.connection._wsgi_pgconn_sqlstate = exc.pgcode or type(exc).__name__  # type: ignore[attr-defined]
            raise


_classes: dict[tuple[Any, bool, bool], type[Any]] = {}
_classes_lock = threading.Lock()


def managed_class(factory: Any, *, named: bool, recording: bool) -> Any:
    """The cursor class for a managed connection: ours below ``factory`` (None: ours alone).

    Returns ``factory`` itself when it is not a cursor class (a function): such
    cursors get the transaction begun when they are created instead.
    """
    factory = getattr(factory, "_wsgi_pgconn_factory", factory)
    if factory is not None and not (
        isinstance(factory, type) and issubclass(factory, ext.cursor)
    ):
        return factory
    key = (factory, named, recording)
    cls = _classes.get(key)
    if cls is None:
        bases: tuple[type[Any], ...] = (NamedCursor if named else Cursor,)
        if factory is not None and factory is not ext.cursor:
            bases = (factory, *bases)
        if recording:
            bases = (_Recording, *bases)
        if len(bases) == 1:
            cls = bases[0]
        else:
            cls = type(
                "Managed" + (factory or bases[-1]).__name__,
                bases,
                {"__slots__": (), "_wsgi_pgconn_factory": factory, "__module__": __name__},
            )
        with _classes_lock:
            cls = _classes.setdefault(key, cls)
    return cls


# -- the connection --------------------------------------------------------------------


class ManagedConnection(ManagedState, ext.connection):
    """A psycopg2 connection whose transaction belongs to the middleware during a request.

    Between requests (and in ``configure`` hooks) it is an ordinary connection
    in autocommit mode. While a request holds it, its cursors begin the
    request's transaction, ``autocommit`` reads False, and ending or
    reconfiguring the transaction raises
    :class:`~wsgi_pgconn.errors.TransactionManaged`.
    """

    #: BEGIN and the prelude, as text to put in front of a statement ("BEGIN; ").
    _wsgi_pgconn_prefix = ""
    _wsgi_pgconn_bprefix = b""
    _wsgi_pgconn_recording = False
    _wsgi_pgconn_internal: Any = None

    def _wsgi_pgconn_refuse(self, what: str) -> NoReturn:
        raise TransactionManaged(
            f"{what} is not allowed on a connection managed by wsgi_pgconn: the request's "
            "transaction is committed when the response succeeds and rolled back when it "
            "fails. Use a savepoint to undo part of the work, or a connection of your own."
        )

    def cursor(  # type: ignore[override]
        self,
        name: str | None = None,
        cursor_factory: Any = None,
        withhold: bool = False,
        scrollable: bool | None = None,
    ) -> Any:
        if name is None and cursor_factory is None:
            return _new_cursor(self)  # the connection's cursor_factory: ours

        factory = managed_class(
            cursor_factory if cursor_factory is not None else _factory.__get__(self),
            named=name is not None,
            recording=self._wsgi_pgconn_recording,
        )
        if (
            not isinstance(factory, type)
            and self._wsgi_pgconn_begin is not None
            and _status(self) == IDLE
        ):
            _begin(self)  # a factory function: its cursor cannot begin it
        return _new_cursor(
            self, name, cursor_factory=factory, withhold=withhold, scrollable=scrollable
        )

    @property
    def cursor_factory(self) -> Any:
        """The default cursor class (combined with this module's, see :func:`managed_class`)."""
        return _factory.__get__(self)

    @cursor_factory.setter
    def cursor_factory(self, value: Any) -> None:
        _factory.__set__(
            self, managed_class(value, named=False, recording=self._wsgi_pgconn_recording)
        )

    @property
    def autocommit(self) -> bool:
        """False while a request holds the connection (its transaction is the middleware's)."""
        if self._wsgi_pgconn_begin is not None:
            return False
        return bool(_autocommit.__get__(self))

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if self._wsgi_pgconn_begin is not None:
            self._wsgi_pgconn_refuse("setting autocommit")
        _autocommit.__set__(self, value)

    def __enter__(self) -> Any:
        if self._wsgi_pgconn_begin is not None:
            self._wsgi_pgconn_refuse("'with connection:'")
        return _base.__enter__(self)

    # Ending or reconfiguring the transaction: refused while a request holds it.
    commit = refusing(_base, "commit")
    rollback = refusing(_base, "rollback")
    close = refusing(_base, "close")
    reset = refusing(_base, "reset")
    set_session = refusing(_base, "set_session")
    set_isolation_level = refusing(_base, "set_isolation_level")
    set_client_encoding = refusing(_base, "set_client_encoding")
    tpc_begin = refusing(_base, "tpc_begin")
    isolation_level = refusing_setter(_base, "isolation_level")
    readonly = refusing_setter(_base, "readonly")
    deferrable = refusing_setter(_base, "deferrable")


# -- the seam ---------------------------------------------------------------------------


def parse_conninfo(conninfo: str) -> dict[str, str]:
    params: dict[str, str] = ext.parse_dsn(conninfo)
    return params


def make_conninfo(conninfo: str = "", **params: str) -> str:
    made: str = ext.make_dsn(conninfo or None, **params)
    return made


def _cancelling(wait: Callable[[Any], object]) -> Callable[[Any], object]:
    """``wait``, the process's wait callback, sending a cancel request when it is interrupted.

    psycopg2 runs a query through the wait callback (psycogreen's under gevent,
    ``psycopg2.extras.wait_select``) when one is set. An exception raised into
    it (a gevent.Timeout, a server's request timeout) makes psycopg2 close the
    connection at once, which leaves the statement running on the server until
    it ends. Before that, while the connection can still say which backend to
    cancel, this sends the cancel request.
    """

    def wait_or_cancel(conn: Any) -> object:
        try:
            return wait(conn)
        except BaseException:
            if not conn.closed and _status(conn) == ext.TRANSACTION_STATUS_ACTIVE:
                _cancel_interrupted(conn)
            raise

    wait_or_cancel._wsgi_pgconn_cancels = True  # type: ignore[attr-defined]
    wait_or_cancel.__wrapped__ = wait  # type: ignore[attr-defined]
    return wait_or_cancel


def _cancel_interrupted(conn: Any) -> None:
    pid = conn.info.backend_pid
    logger.warning(
        "the wait for a statement on backend pid %s was interrupted: cancelling it", pid
    )
    try:
        conn.cancel()
    except psycopg2.Error as exc:
        logger.warning(
            "cancelling the statement on backend pid %s failed: %s", pid, errors.first_line(exc)
        )


def _cancel_when_interrupted() -> None:
    """Wrap the process's wait callback, if one is set, in :func:`_cancelling` (once)."""
    wait = ext.get_wait_callback()
    if wait is not None and not getattr(wait, "_wsgi_pgconn_cancels", False):
        ext.set_wait_callback(_cancelling(wait))


def connect(
    conninfo: str, settings: Settings, configure: Callable[[Any], object] | None
) -> ManagedConnection:
    _cancel_when_interrupted()  # a wait callback may have been set since the last connect
    conn = psycopg2.connect(conninfo, connection_factory=ManagedConnection)
    try:
        _autocommit.__set__(conn, True)
        conn._wsgi_pgconn_internal = ext.cursor(conn)
        text = "; ".join(begin_statements(settings)) + "; "
        conn._wsgi_pgconn_prefix = text
        conn._wsgi_pgconn_bprefix = text.encode()
        conn._wsgi_pgconn_pipeline = settings.pipeline_begin
        conn._wsgi_pgconn_recording = settings.retries > 0
        _factory.__set__(conn, managed_class(None, named=False, recording=settings.retries > 0))
        setup(conn, settings, configure)
    except BaseException:
        _base.close(conn)
        raise
    return conn


def setup(
    conn: ManagedConnection, settings: Settings, configure: Callable[[Any], object] | None
) -> None:
    if configure is not None:
        configure(conn)
        # Whatever the hook left open is committed: its session settings persist.
        if _status(conn) != IDLE:
            _execute(conn._wsgi_pgconn_internal, b"COMMIT")
        if not _autocommit.__get__(conn):
            _autocommit.__set__(conn, True)


transaction_status = ext.connection.get_transaction_status


def is_closed(conn: Any) -> bool:
    return bool(conn.closed)


def backend_pid(conn: Any) -> int:
    pid: int = conn.info.backend_pid
    return pid


def fileno(conn: Any) -> int:
    fd: int = conn.fileno()
    return fd


def parameter_status(conn: Any, name: str) -> str | None:
    value: str | None = conn.info.parameter_status(name)
    return value


def drain(conn: Any) -> bool:
    """Read what arrived on an idle connection; False if the backend is gone.

    A NOTIFY for a LISTEN left by an earlier request is harmless. A terminated
    backend sends an error (FATAL, which libpq files as a notice on an idle
    connection) and then closes; the close may not have arrived yet, so any
    new notice means dead.
    """
    notices = conn.notices
    count, last = len(notices), notices[-1] if notices else None
    try:
        conn.poll()
    except psycopg2.Error:
        return False
    del conn.notifies[:-100]  # notifications for a LISTEN of an earlier request: no reader
    if len(notices) != count or (notices and notices[-1] is not last):
        return False
    return not conn.closed


def last_notice(conn: Any) -> str | None:
    notices = conn.notices
    return " ".join(notices[-1].split()) if notices else None


def begin(conn: Any) -> None:
    if conn._wsgi_pgconn_begin is not None and _status(conn) == IDLE:
        _begin(conn)


def pipelined(conn: Any, run: Callable[[], object]) -> None:
    run()


def use_adapters(conn: Any, adapters: Any) -> None:
    raise TypeError("adapter maps are psycopg 3's; psycopg2 has none")


def jsonb_as_text(conn: Any) -> None:
    import psycopg2.extras

    psycopg2.extras.register_default_jsonb(conn_or_curs=conn, loads=_identity)


def _identity(value: Any) -> Any:
    return value


def commit(conn: Any) -> None:
    if conn._wsgi_pgconn_internal is None:
        _base.commit(conn)
    else:
        _execute(conn._wsgi_pgconn_internal, b"COMMIT")


def rollback(conn: Any) -> None:
    if conn._wsgi_pgconn_internal is None:
        _base.rollback(conn)
    else:
        _execute(conn._wsgi_pgconn_internal, b"ROLLBACK")


def execute_outside_transaction(conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
    manual = not _autocommit.__get__(conn)
    if manual:  # a plain psycopg2 connection (the Django adapter's own)
        _autocommit.__set__(conn, True)
    try:
        with _new_cursor(conn, cursor_factory=ext.cursor) as cur:
            for statement, params in statements:
                _execute(cur, statement, params)
    finally:
        if manual and not conn.closed:
            _autocommit.__set__(conn, False)


def execute_in_transaction(conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
    with _new_cursor(conn, cursor_factory=ext.cursor) as cur:
        for statement, params in statements:
            _execute(cur, statement, params)


def clear_notices(conn: Any) -> None:
    del conn.notices[:]


def cancel(conn: Any) -> None:
    conn.cancel()


def close(conn: Any) -> None:
    _base.close(conn)


def sqlstate(exc: BaseException) -> str | None:
    code = getattr(exc, "pgcode", None)
    return code if isinstance(code, str) else None


# -- greenlets --------------------------------------------------------------------------


def cooperate(library: str) -> str | None:
    if ext.get_wait_callback() is not None:
        return None  # psycogreen's callback, ours, or the user's own
    fix = (
        "call wsgi_pgconn.green.patch_psycopg2() (or psycogreen.gevent.patch_psycopg()) "
        "at import of wsgi.py"
        if library == "gevent"
        else "call psycogreen.eventlet.patch_psycopg() at import of wsgi.py"
    )
    return (
        f"psycopg2 has no wait callback under {library}: every query blocks the whole "
        f"process (every greenlet) until the server answers; {fix}"
    )


def install_gevent_wait() -> None:
    """Set psycopg2's wait callback to :func:`gevent_wait` (process-wide)."""
    import gevent.socket  # type: ignore[import-untyped, import-not-found, unused-ignore]  # noqa: F401 - fail now if missing

    ext.set_wait_callback(gevent_wait)


def _gevent_poll(conn: Any) -> None:
    """Wait for ``conn`` through gevent's loop until psycopg2 says it is done."""
    from gevent.socket import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
        wait_read,
        wait_write,
    )

    while True:
        state = conn.poll()
        if state == ext.POLL_OK:
            return
        if state == ext.POLL_READ:
            wait_read(conn.fileno())
        elif state == ext.POLL_WRITE:
            wait_write(conn.fileno())
        else:
            raise psycopg2.OperationalError(f"bad result from poll: {state!r}")


#: psycopg2's wait callback under gevent; cancels the statement when the wait is abandoned.
#: An exception raised into the waiting greenlet (``gevent.Timeout``, ``GreenletExit`` from
#: ``kill()``) ends the wait; psycopg2 then closes the connection, which would leave the
#: statement running on the server. So the server is first asked to cancel it
#: (:func:`_cancelling`, the same wrapper any other wait callback gets).
gevent_wait = _cancelling(_gevent_poll)
