"""Flask extension: the middleware around ``app.wsgi_app``, configured from ``app.config``.

::

    from flask import Flask
    from wsgi_pgconn.flask import PgConn, get_connection

    app = Flask(__name__)
    app.config["DATABASE_URL"] = "postgresql://app@db/app"
    app.config["WSGI_PGCONN_SCOPE"] = "thread"
    PgConn(app)          # or: pgconn = PgConn(); pgconn.init_app(app)

    @app.post("/visits")
    def visit():
        with get_connection().cursor() as cur:   # the request's connection
            cur.execute("INSERT INTO visits DEFAULT VALUES")
        return "", 204                           # committed by the middleware

Settings: every ``DATABASE_URL`` / ``WSGI_PGCONN_*`` name of the
environment table (:data:`wsgi_pgconn.config.SETTINGS`) is read from
``app.config`` too, with the same validation (errors name the
``app.config`` key; a misspelt ``WSGI_PGCONN_*`` key is reported as one in
the environment is). Keyword arguments of :class:`PgConn` win over
``app.config``, which wins over the process environment. When no
``DATABASE_URL`` is set anywhere, a ``postgresql`` ``SQLALCHEMY_DATABASE_URI``
(Flask-SQLAlchemy's) is used, its ``+driver`` part removed.

With Flask-SQLAlchemy, set ``SQLALCHEMY_ENGINE_OPTIONS =
wsgi_pgconn.sqlalchemy.engine_options()``: the extension runs SQLAlchemy's
per-connection setup when the middleware opens a connection
(:func:`wsgi_pgconn.sqlalchemy.configure`).

Flask's test client: the extension makes ``buffered=True`` its default, so
that each response is read and closed, as a WSGI server closes it (closing
it commits the work of a streamed body and gives the connection back). A
test that passes ``buffered=False`` closes the response itself (``with
client.get(...) as response:``); a request made while an earlier response
of the same thread is still open raises a RuntimeError that says so.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import flask
from flask.testing import FlaskClient

from . import config as _config
from .errors import ConfigurationError
from .middleware import TRANSACTION_KEY, PgConnMiddleware
from .middleware import get_connection as _get_connection
from .transaction import RequestTransaction

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from werkzeug.test import TestResponse

__all__ = ["EXTENSION_KEY", "PgConn", "get_connection", "settings_from_config"]

#: The key of ``app.extensions`` (the app's :class:`PgConnMiddleware`).
EXTENSION_KEY = "wsgi_pgconn"
#: Keyword arguments of PgConn that are hooks, not settings.
_HOOKS = ("commit_veto", "configure", "on_begin")

UNCLOSED = (
    "an earlier response on this thread was never closed, so its database connection and "
    "transaction are still held: Flask's test client leaves a response open when called with "
    "buffered=False; close it (`with client.get(..., buffered=False) as response:`), or let "
    "the client read and close it (buffered=True, the default with wsgi_pgconn.flask). A WSGI "
    "server always closes responses"
)


def get_connection() -> Any:
    """The connection of the current request (``flask.request``); see wsgi_pgconn.get_connection."""
    return _get_connection(flask.request.environ)


def settings_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The wsgi_pgconn settings found in ``config`` (``app.config``), validated.

    Returns ``{setting name: value as given}``; an empty string or None counts
    as unset. Raises :class:`~wsgi_pgconn.ConfigurationError` naming the key.
    """
    found: dict[str, Any] = {}
    for name, (var, parse) in _config.SETTINGS.items():
        value = config.get(var)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        parse(f"app.config[{var!r}]", value)
        found[name] = value
    return found


def _dsn_from_sqlalchemy(uri: Any) -> str | None:
    """A postgresql SQLALCHEMY_DATABASE_URI as a libpq URL (``+driver`` removed), or None."""
    if uri is None or (isinstance(uri, str) and not uri.strip()):
        return None
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # pragma: no cover - Flask-SQLAlchemy always brings it
        return None
    url = make_url(uri)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _with_sqlalchemy_setup(
    configure: Callable[[Any], object] | None,
) -> Callable[[Any], None]:
    """The middleware's configure hook: the application's, then SQLAlchemy's setup if in use."""

    def setup(conn: Any) -> None:
        if configure is not None:
            configure(conn)
        adapter = sys.modules.get("wsgi_pgconn.sqlalchemy")
        if adapter is not None:
            adapter.configure(conn)

    return setup


class _Guard:
    """``app.wsgi_app``: the middleware, refusing a request while an earlier response is open."""

    def __init__(self, middleware: PgConnMiddleware) -> None:
        self.middleware = middleware
        self._local = threading.local()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        local = self._local
        last: weakref.ref[RequestTransaction] | None = getattr(local, "last", None)
        if last is not None:
            local.last = None
            if _held(last):
                gc.collect()  # an unreferenced response is rolled back and released
                if _held(last):
                    local.last = last
                    raise RuntimeError(UNCLOSED)
        result = self.middleware(environ, start_response)
        txn = environ.get(TRANSACTION_KEY)
        if isinstance(txn, RequestTransaction) and txn.environ is environ:
            local.last = weakref.ref(txn)  # its response holds the connection until closed
        return result

    def __getattr__(self, name: str) -> Any:
        # close(), stats(), settings, app: the middleware's.
        return getattr(self.middleware, name)


def _held(ref: weakref.ref[RequestTransaction]) -> bool:
    txn = ref()
    return txn is not None and txn.environ.get(TRANSACTION_KEY) is txn


class _BufferedClient(FlaskClient):
    """Flask's test client, reading and closing every response unless told ``buffered=False``."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> TestResponse:
        return super().open(*args, buffered=buffered, **kwargs)


def _buffered(client_class: type[FlaskClient] | None) -> type[FlaskClient]:
    base = client_class or FlaskClient
    if issubclass(base, _BufferedClient):
        return base
    if base is FlaskClient:
        return _BufferedClient
    return type("PgConn" + base.__name__, (_BufferedClient, base), {})


class PgConn:
    """The Flask extension: ``PgConn(app)``, or ``PgConn()`` then ``init_app(app)``.

    Keyword arguments are those of :class:`~wsgi_pgconn.PgConnMiddleware`
    (settings such as ``scope=``, hooks such as ``commit_veto=``); they win
    over ``app.config``. ``init_app`` wraps ``app.wsgi_app`` (keep it the
    outermost WSGI middleware that touches the database) and stores the
    middleware in ``app.extensions["wsgi_pgconn"]``.
    """

    def __init__(self, app: flask.Flask | None = None, **options: Any) -> None:
        unknown = set(options) - set(_config.SETTINGS) - set(_HOOKS)
        if unknown:
            raise TypeError(f"unknown PgConn argument(s): {', '.join(sorted(unknown))}")
        self.options = options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("wsgi_pgconn.flask.PgConn is already installed on this app")
        settings = settings_from_config(app.config)
        settings.update(
            (name, value)
            for name, value in self.options.items()
            if name not in _HOOKS and value is not None
        )
        if "dsn" not in settings and not os.environ.get("DATABASE_URL", "").strip():
            dsn = _dsn_from_sqlalchemy(app.config.get("SQLALCHEMY_DATABASE_URI"))
            if dsn is not None:
                settings["dsn"] = dsn
        middleware = PgConnMiddleware(
            app.wsgi_app,
            commit_veto=self.options.get("commit_veto"),
            configure=_with_sqlalchemy_setup(self.options.get("configure")),
            on_begin=self.options.get("on_begin"),
            **settings,
        )
        # Misspelt names in app.config: reported as those of the environment are.
        unknown = _config.unknown_variables(dict.fromkeys(app.config))
        if unknown and middleware.settings.strict:
            raise ConfigurationError(
                f"unknown wsgi_pgconn setting(s) in app.config: {_config.describe_unknown(unknown)}"
                f" ({_config.ENV_PREFIX}STRICT is on: remove them, or correct their names)"
            )
        _config.warn_unknown(dict.fromkeys(app.config), "app.config")
        guard: WSGIApplication = _Guard(middleware)
        app.wsgi_app = guard  # type: ignore[method-assign, assignment]
        app.extensions[EXTENSION_KEY] = middleware
        app.test_client_class = _buffered(app.test_client_class)

    @staticmethod
    def middleware(app: flask.Flask | None = None) -> PgConnMiddleware:
        """The middleware of ``app`` (default: the current app)."""
        target = app if app is not None else flask.current_app
        middleware: PgConnMiddleware = target.extensions[EXTENSION_KEY]
        return middleware
