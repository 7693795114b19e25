"""The database backend ``wsgi_pgconn.django``: Django's postgresql backend, request-aware.

Outside a request it *is* Django's postgresql backend, on the driver Django
picks (psycopg 3 when it is installed, else psycopg2): same connections, same
autocommit, same transactions.

Inside a request served by wsgi_pgconn's middleware (on the thread that serves
it, for the alias the middleware is bound to, ``"default"`` unless
:data:`~wsgi_pgconn.django.session.ALIAS_KEY` says otherwise) the wrapper's
``connection`` is the request's connection (of the same driver), and Django's transaction
bookkeeping is a separate set that starts "inside an atomic block":

* ``atomic()`` makes a savepoint of the request's transaction;
  ``atomic(durable=True)``, ``commit()``, ``rollback()`` and
  ``set_autocommit()`` raise Django's usual errors;
* ``on_commit()`` callbacks wait for the middleware's real COMMIT and are
  dropped when the request rolls back;
* ``set_rollback(True)`` outside any ``atomic()`` rolls the request back;
* ``close()`` and ``close_if_unusable_or_obsolete()`` (``close_old_connections``)
  leave the request's connection alone.

Django's own connection pool (``OPTIONS["pool"]``, psycopg 3) is refused with
:class:`~django.core.exceptions.ImproperlyConfigured` when a connection is to
be opened (and reported by the system check ``wsgi_pgconn.E001`` before): the
middleware keeps the connections (``WSGI_PGCONN_SCOPE=pool`` is the equivalent).

Django's own bookkeeping (and its own connection, if one is open, for example
the test case's) is untouched and in use again as soon as the request ends.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.backends.postgresql import base as _postgresql
from django.db.transaction import TransactionManagementError

from ..drivers import INERROR, track_cursor
from ..middleware import CONNECTION_KEY
from ..transaction import RequestTransaction, _current, publish_context
from . import session
from .creation import DatabaseCreation

__all__ = ["DatabaseWrapper"]

logger = logging.getLogger("wsgi_pgconn.django")
django_logger = logging.getLogger("django.db.backends.base")

#: Django's OPTIONS["pool"] keys and the wsgi_pgconn settings that do their work.
POOL_EQUIVALENTS = {
    "max_size": "WSGI_PGCONN_POOL_SIZE",
    "timeout": "WSGI_PGCONN_POOL_TIMEOUT",
    "max_lifetime": "WSGI_PGCONN_MAX_AGE",
    "max_idle": "WSGI_PGCONN_MAX_IDLE",
}

#: True while on_commit callbacks of a committed request run: Django is then
#: outside the request (autocommit, its own connection), as after any COMMIT.
_outside_request: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "wsgi_pgconn_django_outside_request", default=False
)


#: What ``_Field`` compares the request's weakref with before a wrapper has
#: resolved its bookkeeping (never a value of the middleware's context variable).
_UNRESOLVED = object()

publish_context()  # the ORM finds the request through current_transaction's variable
_current_get = _current.get
_outside_get = _outside_request.get
_get_ident = threading.get_ident


class _State:
    """Django's own per-connection transaction bookkeeping (BaseDatabaseWrapper's attributes).

    Filled in by BaseDatabaseWrapper.__init__ and connect(), as without wsgi_pgconn.
    """

    __slots__ = (
        "atomic_blocks",
        "autocommit",
        "close_at",
        "closed_in_transaction",
        "commit_on_exit",
        "connection",
        "errors_occurred",
        "health_check_done",
        "health_check_enabled",
        "hooks_registered",
        "in_atomic_block",
        "needs_rollback",
        "rollback_exc",
        "run_commit_hooks_on_set_autocommit_on",
        "run_on_commit",
        "savepoint_ids",
        "savepoint_state",
    )

    atomic_blocks: list[Any]
    autocommit: bool
    close_at: float | None
    closed_in_transaction: bool
    commit_on_exit: bool
    connection: Any
    errors_occurred: bool
    health_check_done: bool
    health_check_enabled: bool
    hooks_registered: bool
    in_atomic_block: bool
    needs_rollback: bool
    rollback_exc: BaseException | None
    run_commit_hooks_on_set_autocommit_on: bool
    run_on_commit: list[tuple[set[str | None], Callable[[], Any], bool]]
    savepoint_ids: list[str | None]
    savepoint_state: int

    #: Whether this is a request's bookkeeping (else Django's own).
    bound = False
    txn: RequestTransaction | None = None

    def __init__(self) -> None:
        self.hooks_registered = False


class _RequestState:
    """A request's bookkeeping: "inside the request's atomic block".

    The values every request starts with are class attributes; an instance
    holds only what it changes, its mutable lists, and its connection.
    """

    bound = True
    autocommit = False
    in_atomic_block = True
    savepoint_state = 0
    commit_on_exit = True
    needs_rollback = False
    rollback_exc: BaseException | None = None
    close_at: float | None = None
    closed_in_transaction = False
    errors_occurred = False
    health_check_enabled = False
    health_check_done = True
    run_commit_hooks_on_set_autocommit_on = False
    hooks_registered = False

    def __init__(
        self, txn: RequestTransaction, ref: Callable[[], RequestTransaction | None]
    ) -> None:
        # Weak, as the middleware's own reference: a response the server never
        # closes must stay collectable (its __del__ rolls back and releases).
        self.txn_ref = ref
        self.connection: Any = txn.connection
        self.savepoint_ids: list[str | None] = []
        # Django's "durable" check looks at the innermost atomic block: the
        # request's transaction is one, and not a test case's.
        self.atomic_blocks: list[Any] = [_REQUEST_BLOCK]
        self.run_on_commit: list[tuple[set[str | None], Callable[[], Any], bool]] = []

    @property
    def txn(self) -> RequestTransaction | None:
        return self.txn_ref()


AnyState = _State | _RequestState

#: The atomic block that stands for the request's transaction (never entered).
_REQUEST_BLOCK = transaction.Atomic(DEFAULT_DB_ALIAS, False, False)


class _Field:
    """An attribute of Django's bookkeeping, read from the state in use.

    The fast path: the middleware's context variable still holds the request
    (weak) reference this wrapper resolved last, and no on_commit callback
    runs: the state resolved then is the one in use. Anything else (a new
    request, the end of one, a wrapper being built) goes to ``_resolve``.
    """

    __slots__ = ("name",)

    def __init__(self) -> None:
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: DatabaseWrapper | None, owner: type | None = None) -> Any:
        if wrapper is None:
            return self
        ref = _current_get()
        cache = wrapper._cache
        if ref is cache[0] and not _outside_get():
            return getattr(cache[1], self.name)
        return getattr(wrapper._resolve(ref), self.name)

    def __set__(self, wrapper: DatabaseWrapper, value: Any) -> None:
        ref = _current_get()
        cache = wrapper._cache
        if ref is cache[0] and not _outside_get():
            setattr(cache[1], self.name, value)
        else:
            setattr(wrapper._resolve(ref), self.name, value)


class _ConnectionField(_Field):
    __slots__ = ()

    def __set__(self, wrapper: DatabaseWrapper, value: Any) -> None:
        state = wrapper._state()
        if state.bound and value is not state.connection:
            raise TransactionManagementError(
                "the connection of a request belongs to wsgi_pgconn's middleware; "
                "Django cannot replace or drop it during the request"
            )
        state.connection = value


class _NeedsRollbackField(_Field):
    __slots__ = ()

    def __set__(self, wrapper: DatabaseWrapper, value: Any) -> None:
        state = wrapper._state()
        state.needs_rollback = value
        txn = state.txn
        # No atomic block of the view is left to roll back to: the request's
        # transaction itself must roll back (set_rollback(True), or a block
        # without savepoint that failed). After a failed statement the core's
        # own rule applies (a 2xx/3xx over a failed transaction becomes 500).
        if (
            value
            and txn is not None
            and not state.savepoint_ids
            and txn._mw.driver.transaction_status(txn.connection) != INERROR
        ):
            txn.set_rollback_only()


def pool_refusal(alias: str) -> tuple[str, str]:
    """Why ``OPTIONS["pool"]`` on ``alias`` is refused, and the settings to use instead.

    Raised by :meth:`DatabaseWrapper.get_connection_params` and reported by
    the system check wsgi_pgconn.E001.
    """
    problem = (
        f"DATABASES[{alias!r}]['OPTIONS']['pool'] turns on Django's own connection pool, "
        "which would fight wsgi_pgconn's: with ENGINE 'wsgi_pgconn.django' the middleware "
        "keeps the connections."
    )
    fix = (
        "Remove 'pool' and set WSGI_PGCONN_SCOPE=pool instead, with "
        + ", ".join(f"{var} for {key!r}" for key, var in POOL_EQUIVALENTS.items())
        + "."
    )
    return problem, fix


class DatabaseWrapper(_postgresql.DatabaseWrapper):  # type: ignore[misc]
    """Django's postgresql DatabaseWrapper that joins the request's connection and transaction."""

    creation_class = DatabaseCreation

    connection = _ConnectionField()
    autocommit = _Field()
    in_atomic_block = _Field()
    savepoint_state = _Field()
    savepoint_ids = _Field()
    atomic_blocks = _Field()
    commit_on_exit = _Field()
    needs_rollback = _NeedsRollbackField()
    rollback_exc = _Field()
    close_at = _Field()
    closed_in_transaction = _Field()
    errors_occurred = _Field()
    health_check_enabled = _Field()
    health_check_done = _Field()
    run_on_commit = _Field()
    run_commit_hooks_on_set_autocommit_on = _Field()

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        self._own = _State()
        # (the middleware's context variable's value, the bookkeeping in use
        # while it holds that value): a request's weak reference and its state,
        # or None and Django's own. One tuple, replaced whole.
        self._cache: tuple[object, AnyState] = (_UNRESOLVED, self._own)
        # (weak reference, decision) for each live request this wrapper has met:
        # its state, or Django's own if it declined. Kept should the cache move
        # on meanwhile (a request nested in another on this thread, a wrapper
        # shared between threads); dead requests are dropped at the next one.
        self._states: list[tuple[Any, AnyState]] = []
        self._detached = True  # until constructed: Django's own state only
        super().__init__(settings_dict, alias)
        self._detached = False

    # -- which bookkeeping is in use ------------------------------------------

    def _state(self) -> AnyState:
        ref = _current_get()
        cache = self._cache
        if ref is cache[0] and not _outside_get():
            return cache[1]
        return self._resolve(ref)

    def _resolve(self, ref: Any) -> AnyState:
        """The bookkeeping for the request behind ``ref`` (None: no request); remembered."""
        if self._detached or _outside_get():
            return self._own
        txn = None if ref is None else ref()
        if txn is None:
            state: AnyState = self._own
        else:
            for known, decided in self._states:
                if known is ref:
                    state = decided
                    break
            else:
                state = self._bind(txn, ref)
        self._cache = (ref, state)
        return state

    def _registered(self) -> bool:
        """Whether this wrapper is the one ``connections[alias]`` gives in this thread."""
        storage = getattr(connections, "_connections", None)
        if storage is not None:
            return getattr(storage, self.alias, None) is self
        return any(w is self for w in connections.all(initialized_only=True))

    def _bind(self, txn: RequestTransaction, ref: Any) -> AnyState:
        """Join the request, or decline (Django's own state); once per request."""
        environ = txn.environ
        ident = _get_ident()
        if (
            environ.get(CONNECTION_KEY) is not txn.connection  # already released
            or environ.get(session.ALIAS_KEY, DEFAULT_DB_ALIAS) != self.alias
            or not self._registered()
            or environ.setdefault(session.THREAD_KEY, ident) != ident
        ):
            self._remember(ref, self._own)
            return self._own
        state = _RequestState(txn, ref)
        self._cache = (ref, state)  # joined while Django's connection setup runs
        try:
            session.ensure_prepared(self, txn)
        except BaseException:
            self._cache = (_UNRESOLVED, self._own)
            raise
        self._remember(ref, state)
        return state

    def _remember(self, ref: Any, state: AnyState) -> None:
        # One assignment (a wrapper shared between threads); dead requests dropped.
        self._states = [*((r, s) for r, s in self._states if r() is not None), (ref, state)]

    @property
    def in_request(self) -> bool:
        """True while this wrapper uses the request's connection and transaction."""
        return self._state().bound

    def detached_for(self, conn: Any) -> DatabaseWrapper:
        """A wrapper of this alias around ``conn`` that never joins a request.

        It is what ``connection_created`` receives for a connection the
        middleware opened.
        """
        wrapper = type(self)(self.settings_dict, self.alias)
        wrapper._detached = True
        wrapper.connection = conn
        wrapper.autocommit = conn.autocommit
        return wrapper

    def get_connection_params(self) -> dict[str, Any]:
        """Django's, after refusing ``OPTIONS["pool"]``.

        Refused here, when a connection is about to be opened (by Django, or by
        the middleware, which takes its connection string from here), not when
        the wrapper is built: Django builds it while it imports the models,
        before it runs its checks, and the system check wsgi_pgconn.E001 must
        get to say the same.
        """
        if self.settings_dict.get("OPTIONS", {}).get("pool"):
            problem, fix = pool_refusal(self.alias)
            raise ImproperlyConfigured(f"{problem} {fix} (see the Django page of the docs)")
        params: dict[str, Any] = super().get_connection_params()
        return params

    # -- Django's methods that must not touch the request's connection ---------

    def create_cursor(self, name: str | None = None) -> Any:
        if name:
            # A server-side cursor that Django makes from its class, not through
            # the connection: begin the request's transaction (and run its
            # on_begin hook) first, as any other first statement would, and have
            # the request's COMMIT wait while the cursor is open (a streamed
            # response may read it after the view returned).
            state = self._state()
            txn = state.txn
            if state.bound and txn is not None:
                txn._mw.driver.begin(txn.connection)
                cursor = super().create_cursor(name)
                if not getattr(cursor, "withhold", False):
                    track_cursor(txn.connection, cursor)
                return cursor
        return super().create_cursor(name)

    def connect(self) -> None:
        if self._state().bound:
            raise TransactionManagementError(
                "cannot open a connection during a request served by wsgi_pgconn: the "
                "request's connection is in use"
            )
        super().connect()

    def close(self) -> None:
        if self._state().bound:
            # The request's connection is the middleware's: it stays open and in
            # its transaction, and is given back when the response is complete.
            return
        super().close()

    def close_if_unusable_or_obsolete(self) -> None:
        # Twice per request (Django's request_started and request_finished): the
        # fast path of _state() inlined.
        ref = _current_get()
        cache = self._cache
        state = cache[1] if ref is cache[0] and not _outside_get() else self._resolve(ref)
        if not state.bound:
            super().close_if_unusable_or_obsolete()
            return
        # close_old_connections during a request: the request's connection is
        # the middleware's business. Django's rules still apply to Django's own
        # connection (say, one opened by an on_commit callback), unless it is in
        # a transaction of its own (a test case's).
        own = self._own
        if own.connection is None or own.in_atomic_block:
            return
        token = _outside_request.set(True)
        try:
            super().close_if_unusable_or_obsolete()
        finally:
            _outside_request.reset(token)

    def validate_no_broken_transaction(self) -> None:
        # Before every query: one look at the state in use instead of two.
        ref = _current_get()
        cache = self._cache
        state = cache[1] if ref is cache[0] and not _outside_get() else self._resolve(ref)
        if state.needs_rollback:
            super().validate_no_broken_transaction()  # raises Django's own error

    # -- on_commit: run after the middleware's COMMIT ------------------------------

    def on_commit(self, func: Callable[[], Any], robust: bool = False) -> None:
        state = self._state()
        super().on_commit(func, robust)
        txn = state.txn
        if txn is not None and not state.hooks_registered and state.run_on_commit:
            state.hooks_registered = True
            txn.on_commit(lambda: self._run_request_hooks(state))
            txn.on_rollback(lambda: self._drop_request_hooks(state))

    def _drop_request_hooks(self, state: AnyState) -> None:
        state.hooks_registered = False
        state.run_on_commit = []

    def _run_request_hooks(self, state: AnyState) -> None:
        """Django's on_commit callbacks of a request, after the middleware's COMMIT.

        They run outside the request, as Django runs them after a commit: ORM
        queries in them use Django's own connection in autocommit mode. As in
        Django, a callback registered with ``robust=True`` that raises is
        logged and the next one runs; any other exception is logged and stops
        the callbacks of this transaction. Committed data stays committed.
        """
        state.hooks_registered = False
        hooks, state.run_on_commit = state.run_on_commit, []
        token = _outside_request.set(True)
        try:
            while hooks:
                _, func, robust = hooks.pop(0)
                try:
                    func()
                except Exception as exc:
                    name = getattr(func, "__qualname__", func)
                    if robust:
                        django_logger.exception("Error calling %s in on_commit() (%s).", name, exc)
                        continue
                    logger.exception(
                        "on_commit callback %s failed after the request was committed%s",
                        name,
                        f"; {len(hooks)} later callback(s) not run" if hooks else "",
                    )
                    return
        finally:
            _outside_request.reset(token)
