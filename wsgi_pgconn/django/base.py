"""The database backend ``wsgi_pgconn.django``: Django's postgresql backend, request-aware.

Outside a request it *is* Django's postgresql backend on psycopg2: same
connections, same autocommit, same transactions.

Inside a request served by wsgi_pgconn's middleware (on the thread that serves
it, for the alias the middleware is bound to, ``"default"`` unless
:data:`~wsgi_pgconn.django.session.ALIAS_KEY` says otherwise) the wrapper's
``connection`` is the request's psycopg2 connection, and Django's transaction
bookkeeping is a separate set that starts "inside an atomic block":

* ``atomic()`` makes a savepoint of the request's transaction;
  ``atomic(durable=True)``, ``commit()``, ``rollback()`` and
  ``set_autocommit()`` raise Django's usual errors;
* ``on_commit()`` callbacks wait for the middleware's real COMMIT and are
  dropped when the request rolls back;
* ``set_rollback(True)`` outside any ``atomic()`` rolls the request back;
* ``close()`` and ``close_if_unusable_or_obsolete()`` (``close_old_connections``)
  leave the request's connection alone.

Django's own bookkeeping (and its own connection, if one is open, for example
the test case's) is untouched and in use again as soon as the request ends.
"""

from __future__ import annotations

import contextvars
import importlib.util
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ImproperlyConfigured

_PSYCOPG3 = (
    "wsgi_pgconn.django runs on psycopg2, but psycopg (version 3) is importable, and "
    "Django's postgresql backend prefers it: the ORM would use psycopg 3 while the "
    "middleware uses psycopg2. Uninstall psycopg (pip uninstall psycopg psycopg-binary "
    "psycopg-c) from this environment."
)

if importlib.util.find_spec("psycopg") is not None:
    raise ImproperlyConfigured(_PSYCOPG3)

import psycopg2.extensions as ext  # noqa: E402
from django.db import DEFAULT_DB_ALIAS, connections, transaction  # noqa: E402
from django.db.backends.postgresql import base as _postgresql  # noqa: E402
from django.db.backends.postgresql.psycopg_any import is_psycopg3  # noqa: E402
from django.db.transaction import TransactionManagementError  # noqa: E402

from ..middleware import CONNECTION_KEY, RequestTransaction, current_transaction  # noqa: E402
from . import session  # noqa: E402
from .creation import DatabaseCreation  # noqa: E402

if is_psycopg3:  # pragma: no cover - the find_spec check above comes first
    raise ImproperlyConfigured(_PSYCOPG3)

__all__ = ["DatabaseWrapper"]

logger = logging.getLogger("wsgi_pgconn.django")
django_logger = logging.getLogger("django.db.backends.base")

_INERROR = ext.TRANSACTION_STATUS_INERROR

#: True while on_commit callbacks of a committed request run: Django is then
#: outside the request (autocommit, its own connection), as after any COMMIT.
_outside_request: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "wsgi_pgconn_django_outside_request", default=False
)


def _no_transaction() -> None:
    return None


class _State:
    """Django's per-connection transaction bookkeeping (BaseDatabaseWrapper's attributes)."""

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
        "txn_ref",
    )

    def __init__(self, txn: RequestTransaction | None = None) -> None:
        # Weak, as the middleware's own reference: a response the server never
        # closes must stay collectable (its __del__ rolls back and releases).
        self.txn_ref: Callable[[], RequestTransaction | None] = (
            _no_transaction if txn is None else weakref.ref(txn)
        )
        self.hooks_registered = False
        # Django's own state is filled in by BaseDatabaseWrapper.__init__ and
        # connect(); a request's state is "inside the request's atomic block".
        if txn is not None:
            self.connection: Any = txn.connection
            self.autocommit = False
            self.in_atomic_block = True
            self.savepoint_state = 0
            self.savepoint_ids: list[str | None] = []
            self.atomic_blocks: list[Any] = []
            self.commit_on_exit = True
            self.needs_rollback = False
            self.rollback_exc: BaseException | None = None
            self.close_at: float | None = None
            self.closed_in_transaction = False
            self.errors_occurred = False
            self.health_check_enabled = False
            self.health_check_done = True
            self.run_on_commit: list[tuple[set[str | None], Callable[[], Any], bool]] = []
            self.run_commit_hooks_on_set_autocommit_on = False

    @property
    def bound(self) -> bool:
        """Whether this is a request's bookkeeping (else Django's own)."""
        return self.txn_ref is not _no_transaction

    @property
    def txn(self) -> RequestTransaction | None:
        return self.txn_ref()


class _Field:
    """An attribute of Django's bookkeeping, read from the state in use."""

    name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: DatabaseWrapper | None, owner: type | None = None) -> Any:
        if wrapper is None:
            return self
        return getattr(wrapper._state(), self.name)

    def __set__(self, wrapper: DatabaseWrapper, value: Any) -> None:
        setattr(wrapper._state(), self.name, value)


class _ConnectionField(_Field):
    def __set__(self, wrapper: DatabaseWrapper, value: Any) -> None:
        state = wrapper._state()
        if state.bound and value is not state.connection:
            raise TransactionManagementError(
                "the connection of a request belongs to wsgi_pgconn's middleware; "
                "Django cannot replace or drop it during the request"
            )
        state.connection = value


class _NeedsRollbackField(_Field):
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
            and txn.connection.get_transaction_status() != _INERROR
        ):
            txn.set_rollback_only()


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
        self._bound: _State | None = None
        self._declined: weakref.ref[RequestTransaction] | None = None
        self._detached = True  # until constructed: Django's own state only
        super().__init__(settings_dict, alias)
        self._detached = False

    # -- which bookkeeping is in use ------------------------------------------

    def _state(self) -> _State:
        if self._detached or _outside_request.get():
            return self._own
        txn = current_transaction()
        if txn is None:
            if self._bound is not None or self._declined is not None:
                self._bound = self._declined = None
            return self._own
        bound = self._bound
        if bound is not None and bound.txn_ref() is txn:
            return bound
        if self._declined is not None and self._declined() is txn:
            return self._own
        return self._bind(txn)

    def _bind(self, txn: RequestTransaction) -> _State:
        environ = txn.environ
        ident = threading.get_ident()
        if (
            environ.get(CONNECTION_KEY) is not txn.connection  # already released
            or environ.get(session.ALIAS_KEY, DEFAULT_DB_ALIAS) != self.alias
            or not any(w is self for w in connections.all(initialized_only=True))
            or environ.setdefault(session.THREAD_KEY, ident) != ident
        ):
            self._bound, self._declined = None, weakref.ref(txn)
            return self._own
        state = _State(txn)
        # Django's "durable" check looks at the innermost atomic block: the
        # request's transaction is one, and not a test case's.
        state.atomic_blocks.append(transaction.Atomic(self.alias, False, False))
        self._bound, self._declined = state, None
        try:
            session.ensure_prepared(self, txn)
        except BaseException:
            self._bound = None
            raise
        return state

    @property
    def in_request(self) -> bool:
        """True while this wrapper uses the request's connection and transaction."""
        return self._state().bound

    def detached_for(self, conn: ext.connection) -> DatabaseWrapper:
        """A wrapper of this alias around ``conn`` that never joins a request.

        It is what ``connection_created`` receives for a connection the
        middleware opened.
        """
        wrapper = type(self)(self.settings_dict, self.alias)
        wrapper._detached = True
        wrapper.connection = conn
        wrapper.autocommit = conn.autocommit
        return wrapper

    # -- Django's methods that must not touch the request's connection ---------

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
        if not self._state().bound:
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

    # -- on_commit: run after the middleware's COMMIT ------------------------------

    def on_commit(self, func: Callable[[], Any], robust: bool = False) -> None:
        state = self._state()
        super().on_commit(func, robust)
        txn = state.txn
        if txn is not None and not state.hooks_registered and state.run_on_commit:
            state.hooks_registered = True
            txn.on_commit(lambda: self._run_request_hooks(state))
            txn.on_rollback(lambda: self._drop_request_hooks(state))

    def _drop_request_hooks(self, state: _State) -> None:
        state.hooks_registered = False
        state.run_on_commit = []

    def _run_request_hooks(self, state: _State) -> None:
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
