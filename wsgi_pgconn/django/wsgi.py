"""The middleware built from Django's settings for one database alias.

::

    # wsgi.py
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    from wsgi_pgconn.django import get_wsgi_application

    application = get_wsgi_application()  # alias="default", scope etc. as keywords

The connection string is made from ``DATABASES[alias]`` when the first request
arrives, not at import: under Django's test runner that is the test database.
"""

from __future__ import annotations

import os
import threading
from threading import get_ident as _get_ident
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections

from .. import config as _config
from .. import drivers
from ..middleware import PgConnMiddleware
from ..transaction import CommitVeto
from . import session
from .base import DatabaseWrapper

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["DjangoPgConnMiddleware", "database_dsn", "get_wsgi_application"]

#: Keys of Django's connection parameters that are driver arguments, not libpq ones.
_NOT_LIBPQ = (
    "cursor_factory",
    "connection_factory",
    "async",
    "async_",
    "context",
    "prepare_threshold",
)

_ISOLATION_NAMES = {
    "READ_UNCOMMITTED": "read committed",  # PostgreSQL runs it as read committed
    "READ_COMMITTED": "read committed",
    "REPEATABLE_READ": "repeatable read",
    "SERIALIZABLE": "serializable",
}


def _wrapper(alias: str) -> DatabaseWrapper:
    wrapper = connections[alias]
    if not isinstance(wrapper, DatabaseWrapper):
        engine = wrapper.settings_dict.get("ENGINE")
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['ENGINE'] is {engine!r}: set it to 'wsgi_pgconn.django' so "
            "that Django's ORM uses the request's connection and transaction"
        )
    return wrapper


def database_dsn(alias: str = DEFAULT_DB_ALIAS) -> str:
    """The libpq connection string of ``DATABASES[alias]``, as Django would connect now."""
    params = _wrapper(alias).get_connection_params()
    for key in _NOT_LIBPQ:
        params.pop(key, None)
    return drivers.load(session.DRIVER).make_conninfo(
        **{key: str(value) for key, value in params.items() if value is not None and value != ""}
    )


def database_isolation_level(alias: str = DEFAULT_DB_ALIAS) -> str | None:
    """``OPTIONS["isolation_level"]`` of ``DATABASES[alias]`` as a wsgi_pgconn setting."""
    value = _wrapper(alias).settings_dict["OPTIONS"].get("isolation_level")
    if value is None:
        return None
    from django.db.backends.postgresql.psycopg_any import IsolationLevel

    try:
        level = IsolationLevel(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"DATABASES[{alias!r}]['OPTIONS']['isolation_level'] = {value!r} is not a "
            "PostgreSQL isolation level (see IsolationLevel in Django's docs)"
        ) from None
    return _ISOLATION_NAMES[level.name]


class DjangoPgConnMiddleware:
    """PgConnMiddleware connected to the database of ``DATABASES[alias]``.

    Keyword arguments are PgConnMiddleware's settings and hooks (``scope``,
    ``pool_size``, ``max_age``, ..., ``commit_veto``, ``configure``,
    ``on_begin``), validated now; ``dsn`` is not one of them: the connection
    string is derived from the settings at the first request, together with
    ``OPTIONS["isolation_level"]``. Django's per-connection setup (time zone,
    role, ``connection_created``) runs once per new connection, before your
    ``configure``.

    The PgConnMiddleware itself is :attr:`middleware` once built; :meth:`close`
    and :meth:`stats` are its own.
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        alias: str = DEFAULT_DB_ALIAS,
        commit_veto: CommitVeto | None = None,
        configure: Callable[[Any], object] | None = None,
        on_begin: Callable[[Any, dict[str, Any]], object] | None = None,
        **settings: Any,
    ) -> None:
        if "dsn" in settings:
            raise TypeError(
                "DjangoPgConnMiddleware takes its connection string from "
                f"settings.DATABASES[{alias!r}]; to give one yourself, use PgConnMiddleware"
            )
        # A bad value fails now, as with PgConnMiddleware (DATABASE_URL is not ours to check);
        # so does a driver other than Django's.
        driver = _config.parse(os.environ, dsn="", **settings).driver
        if driver not in ("auto", session.DRIVER):
            session.check_driver(drivers.load(driver))
        self.app = app
        self.alias = alias
        self._settings = settings
        self._commit_veto = commit_veto
        self._configure = configure
        self._on_begin = on_begin
        self._middleware: PgConnMiddleware | None = None
        self._lock = threading.Lock()
        session.track(self)

    def __repr__(self) -> str:
        return f"<DjangoPgConnMiddleware alias={self.alias!r} {self._middleware!r}>"

    @property
    def middleware(self) -> PgConnMiddleware:
        """The PgConnMiddleware (built from the settings now if no request has come yet)."""
        middleware = self._middleware
        if middleware is None:
            with self._lock:
                middleware = self._middleware
                if middleware is None:
                    middleware = self._middleware = self._build()
        return middleware

    def _build(self) -> PgConnMiddleware:
        settings = dict(self._settings)
        settings["driver"] = session.DRIVER
        if settings.get("isolation_level") is None:
            settings["isolation_level"] = database_isolation_level(self.alias)
        options = _wrapper(self.alias).settings_dict["OPTIONS"]
        if session.DRIVER == "psycopg" and settings.get("prepare_threshold") is None:
            # Django's default: no server-side prepared statements (poolers).
            threshold = options.get("prepare_threshold")
            settings["prepare_threshold"] = "off" if threshold is None else threshold
        return PgConnMiddleware(
            self.app,
            dsn=database_dsn(self.alias),
            commit_veto=self._commit_veto,
            configure=self._configure_connection,
            on_begin=self._on_begin,
            **settings,
        )

    def _configure_connection(self, conn: Any) -> None:
        session.prepare_connection(_wrapper(self.alias), self.middleware.driver, conn)
        if self._configure is not None:
            self._configure(conn)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        # Which alias and thread the request's connection is for (read when the
        # ORM first meets the request, see DatabaseWrapper._bind).
        environ[session.ALIAS_KEY] = self.alias
        environ[session.THREAD_KEY] = _get_ident()
        return (self._middleware or self.middleware)(environ, start_response)

    def stats(self) -> dict[str, Any]:
        """The middleware's counters (empty before the first request)."""
        return {} if self._middleware is None else self._middleware.stats()

    def close(self) -> None:
        """Close this process's connections (they reopen at the next request)."""
        if self._middleware is not None:
            self._middleware.close()


def get_wsgi_application(*, alias: str = DEFAULT_DB_ALIAS, **kwargs: Any) -> DjangoPgConnMiddleware:
    """Django's WSGI application wrapped in :class:`DjangoPgConnMiddleware`."""
    from django.core.wsgi import get_wsgi_application as django_application

    return DjangoPgConnMiddleware(django_application(), alias=alias, **kwargs)
