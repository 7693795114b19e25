"""The driver seam: what the core needs from a PostgreSQL driver, and which driver to use.

wsgi_pgconn runs on psycopg2 or on psycopg (version 3). Each has one module in
this package, :mod:`wsgi_pgconn.drivers.psycopg2` and
:mod:`wsgi_pgconn.drivers.psycopg`, and each module implements
:class:`Driver`; no other module of the library imports a driver. The rest of
the core (registries, middleware, adapters) talks to connections only through
a :class:`Driver` and through the attributes of :class:`ManagedState`, which
the managed connection classes of both drivers carry.

Choosing (setting ``driver``, environment ``WSGI_PGCONN_DRIVER``):

``psycopg2`` / ``psycopg``
    that driver; :class:`~wsgi_pgconn.errors.DriverNotFound` if it cannot be
    imported.
``auto`` (the default)
    psycopg 3 if it can be imported, else psycopg2: the rule of Django's own
    postgresql backend, so a process never mixes the two. The Django adapter
    always uses the driver Django's backend uses.

>>> resolve("psycopg2")
'psycopg2'
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import DriverNotFound

if TYPE_CHECKING:
    from ..config import Settings
    from ..errors import ConnectBackoff, PoolTimeout, TransactionManaged

__all__ = [
    "ACTIVE",
    "DRIVER_NAMES",
    "IDLE",
    "INERROR",
    "INTRANS",
    "Driver",
    "ManagedState",
    "cursor_open",
    "installed",
    "load",
    "parse_conninfo",
    "refusing",
    "refusing_setter",
    "resolve",
    "track_cursor",
]

#: The drivers wsgi_pgconn supports (module names), in the order ``auto`` prefers them.
DRIVER_NAMES = ("psycopg", "psycopg2")
#: What the ``driver`` setting accepts.
CHOICES = ("auto", "psycopg2", "psycopg")

#: libpq's transaction status (PQtransactionStatus), the same numbers on both drivers.
IDLE = 0
ACTIVE = 1
INTRANS = 2
INERROR = 3
UNKNOWN = 4

_INSTALL = {
    "psycopg2": (
        "pip install 'wsgi_pgconn[psycopg2]' (psycopg2-binary), or psycopg2 built from source"
    ),
    "psycopg": "pip install 'wsgi_pgconn[psycopg]' (psycopg[binary])",
}


class ManagedState:
    """The attributes through which the core drives a managed connection.

    Both drivers' connection classes inherit these defaults; the middleware
    sets them on the instance while a request holds the connection and puts
    the defaults back when it is released.
    """

    #: The statements that begin a request's transaction (BEGIN with the
    #: isolation level, then the transaction-pooler prelude), sent with the
    #: transaction's first statement; None while no request holds the connection.
    _wsgi_pgconn_begin: tuple[str, ...] | None = None
    #: Whether BEGIN travels with the first statement (else: its own round trip).
    _wsgi_pgconn_pipeline: bool = True
    #: The request's ``on_begin`` hook, run once before the transaction's first statement.
    _wsgi_pgconn_on_begin: Callable[[], object] | None = None
    #: How many transactions the cursors have begun while a request held the connection.
    _wsgi_pgconn_began: int = 0
    #: SQLSTATE of the last failed statement (recorded only when retries are on).
    _wsgi_pgconn_sqlstate: str | None = None
    #: Weak references to the server-side cursors (without HOLD) declared while a
    #: request held the connection (see :func:`track_cursor`); None: none.
    _wsgi_pgconn_cursors: list[weakref.ref[Any]] | None = None


def refusing(base: type[Any], method: str) -> Any:
    """``base.method`` for a managed connection class: refused while a request holds it.

    The connection's ``_wsgi_pgconn_refuse(what)`` raises the driver's
    TransactionManaged; between requests the base method runs as usual.
    """
    original = getattr(base, method)

    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._wsgi_pgconn_begin is not None:
            self._wsgi_pgconn_refuse(f"{method}()")
        return original(self, *args, **kwargs)

    guarded.__name__ = method
    guarded.__doc__ = original.__doc__
    return guarded


def refusing_setter(base: type[Any], attribute: str) -> Any:
    """The property ``base.attribute``, its setting refused while a request holds the connection."""
    original = getattr(base, attribute)

    def set_value(self: Any, value: Any) -> None:
        if self._wsgi_pgconn_begin is not None:
            self._wsgi_pgconn_refuse(f"setting {attribute}")
        original.__set__(self, value)

    return property(original.__get__, set_value, doc=original.__doc__)


def track_cursor(conn: Any, cursor: Any) -> None:
    """Remember ``cursor``, a server-side cursor without HOLD, of the request's transaction.

    The drivers' cursor classes call it when they declare one, and the Django
    adapter for the cursors Django makes from its own class. The request's
    COMMIT, which closes such a cursor, then waits while one is still open (a
    streamed body may read it). Only for cursors: rare, so not on the path of
    ordinary statements.
    """
    cursors = conn._wsgi_pgconn_cursors
    if cursors is None:
        conn._wsgi_pgconn_cursors = [weakref.ref(cursor)]
    elif cursors[-1]() is not cursor:
        cursors.append(weakref.ref(cursor))


def cursor_open(conn: Any) -> bool:
    """Whether a cursor remembered by :func:`track_cursor` on ``conn`` is still open.

    Open: not closed and not garbage-collected (both drivers' cursors have ``closed``).
    """
    for ref in conn._wsgi_pgconn_cursors or ():
        cursor = ref()
        if cursor is not None and not cursor.closed:
            return True
    return False


class Driver(Protocol):
    """What a driver module provides (both modules are checked against this by mypy)."""

    @property
    def name(self) -> str: ...
    @property
    def Error(self) -> type[Exception]: ...
    @property
    def OperationalError(self) -> type[Exception]: ...
    @property
    def PoolTimeout(self) -> type[PoolTimeout]: ...
    @property
    def ConnectBackoff(self) -> type[ConnectBackoff]: ...
    @property
    def TransactionManaged(self) -> type[TransactionManaged]: ...
    @property
    def ManagedConnection(self) -> type[Any]:
        """The class of the connections :meth:`connect` returns."""

    def version(self) -> str:
        """The driver's version, and the libpq it was built with."""

    def parse_conninfo(self, conninfo: str) -> dict[str, str]:
        """A ``postgresql://`` URL or ``key=value`` string as a dict (libpq's parser).

        Raises the driver's ProgrammingError (psycopg2) or ProgrammingError
        (psycopg) for a string libpq cannot parse.
        """

    def make_conninfo(self, conninfo: str = "", **params: str) -> str:
        """``conninfo`` with ``params`` added or replacing its own, as ``key=value`` text."""

    def connect(
        self, conninfo: str, settings: Settings, configure: Callable[[Any], object] | None
    ) -> Any:
        """Open a managed connection, set it up, and return it idle (no transaction open)."""

    def setup(
        self, conn: Any, settings: Settings, configure: Callable[[Any], object] | None
    ) -> None:
        """The per-connection setup again (after ``DISCARD ALL``)."""

    def transaction_status(self, conn: Any) -> int:
        """libpq's transaction status: :data:`IDLE`, :data:`INTRANS`, :data:`INERROR`, ..."""

    def is_closed(self, conn: Any) -> bool: ...
    def backend_pid(self, conn: Any) -> int: ...
    def fileno(self, conn: Any) -> int: ...
    def parameter_status(self, conn: Any, name: str) -> str | None:
        """A server parameter as last reported by the server (no round trip)."""

    def drain(self, conn: Any) -> bool:
        """Read what arrived on an idle connection; False if it says the backend is gone."""

    def last_notice(self, conn: Any) -> str | None:
        """The last notice or asynchronous error the server sent on ``conn``, one line, or None.

        For a session the server ended, its FATAL message (read by :meth:`drain`).
        """

    def begin(self, conn: Any) -> None:
        """Begin the request's transaction now, if a request holds ``conn`` and none is open.

        Runs the request's ``on_begin`` hook first. For code that makes cursors
        without the connection (Django's server-side cursors on psycopg 3).
        """

    def pipelined(self, conn: Any, run: Callable[[], object]) -> None:
        """Run ``run()`` (statements on ``conn``) so that they share one round trip.

        psycopg 3: one pipeline, ended by a Sync alone (psycopg's own
        ``pipeline()`` block adds a Flush, after which PostgreSQL leaves
        idle_in_transaction_session_timeout disarmed). psycopg2 cannot
        pipeline: ``run()`` runs as it is (put statements in one string instead).
        """

    def use_adapters(self, conn: Any, adapters: Any) -> None:
        """psycopg 3: have ``conn`` use a copy of ``adapters`` (an AdaptersMap), as
        ``connect(context=...)`` would. psycopg2: not supported (TypeError)."""

    def jsonb_as_text(self, conn: Any) -> None:
        """Have jsonb values arrive as text, as Django's backend does (JSONField decodes them)."""

    def commit(self, conn: Any) -> None:
        """COMMIT the open transaction (whatever the guards say); raises the driver's Error."""

    def rollback(self, conn: Any) -> None:
        """ROLLBACK the open transaction (whatever the guards say)."""

    def execute_outside_transaction(
        self, conn: Any, statements: Iterable[tuple[str, Any]]
    ) -> None:
        """Run ``(sql, params)`` statements on an idle connection, each in autocommit.

        One round trip each; no BEGIN, no prelude, no ``on_begin`` hook.
        """

    def execute_in_transaction(self, conn: Any, statements: Iterable[tuple[str, Any]]) -> None:
        """Run ``(sql, params)`` statements in the open transaction, without the hooks."""

    def clear_notices(self, conn: Any) -> None: ...
    def cancel(self, conn: Any) -> None:
        """Ask the server to cancel the statement running on ``conn`` (a separate connection).

        Raises the driver's Error when the request cannot be sent (psycopg 3:
        within 5 seconds).
        """

    def close(self, conn: Any) -> None:
        """Close the connection (whatever the guards say); never raises."""

    def sqlstate(self, exc: BaseException) -> str | None:
        """The SQLSTATE of a driver error, or None."""

    def cooperate(self, library: str) -> str | None:
        """Have the driver wait for the server through the greenlet ``library``'s loop.

        ``library`` is ``"gevent"`` or ``"eventlet"``. Done where the driver
        can do it without changing what the user chose; otherwise the
        message (the problem and its fix) to log once. None: it cooperates.
        """


def installed() -> list[str]:
    """The supported drivers that can be imported here, in :data:`DRIVER_NAMES` order."""
    return [name for name in DRIVER_NAMES if importlib.util.find_spec(name) is not None]


def resolve(choice: str = "auto") -> str:
    """The driver module name for a ``driver`` setting; raises DriverNotFound."""
    if choice == "auto":
        found = installed()
        if not found:
            raise DriverNotFound(
                "wsgi_pgconn needs a PostgreSQL driver and neither psycopg (3) nor psycopg2 "
                f"is installed: {_INSTALL['psycopg']}, or {_INSTALL['psycopg2']}"
            )
        return found[0]
    if choice not in _INSTALL:
        raise DriverNotFound(
            f"WSGI_PGCONN_DRIVER={choice!r} is not valid: expected one of "
            + ", ".join(repr(c) for c in CHOICES)
        )
    if importlib.util.find_spec(choice) is None:
        raise DriverNotFound(
            f"WSGI_PGCONN_DRIVER={choice!r}, but {choice} is not installed: {_INSTALL[choice]}"
        )
    return choice


def load(choice: str = "auto") -> Driver:
    """The driver module for a ``driver`` setting (imported now); raises DriverNotFound."""
    name = resolve(choice)
    module: Driver = importlib.import_module(f"{__name__}.{name}")
    return module


def parse_conninfo(conninfo: str, choice: str = "auto") -> dict[str, str]:
    """libpq's parse of ``conninfo`` through the chosen (or any installed) driver."""
    return load(choice).parse_conninfo(conninfo)


def mask_password(params: Mapping[str, str]) -> dict[str, str]:
    """``params`` with the values of password-like keys replaced by ``********``."""
    return {
        key: "********" if key in ("password", "sslpassword") else value
        for key, value in params.items()
    }
