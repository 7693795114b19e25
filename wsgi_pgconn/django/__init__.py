"""Django adapter: the ORM uses the request's connection and transaction.

In ``settings.py``::

    DATABASES = {"default": {"ENGINE": "wsgi_pgconn.django", "NAME": "app", ...}}

In ``wsgi.py``, either of::

    application = wsgi_pgconn.django.get_wsgi_application()        # DSN from DATABASES
    application = PgConnMiddleware(django.core.wsgi.get_wsgi_application())  # DATABASE_URL

Inside a request Django's ORM then runs on ``environ["wsgi_pgconn.connection"]``
in the request's transaction (see :mod:`wsgi_pgconn.django.base`); outside
requests (``migrate``, ``shell``, management commands, Django's test client)
the backend is Django's own postgresql backend. psycopg2 only: the backend
refuses to load when psycopg 3 is importable.
"""

from __future__ import annotations

from . import checks  # noqa: F401 - registers the system checks (wsgi_pgconn.E001, ...)
from .base import DatabaseWrapper
from .session import ALIAS_KEY, THREAD_KEY
from .wsgi import DjangoPgConnMiddleware, database_dsn, get_wsgi_application

__all__ = [
    "ALIAS_KEY",
    "THREAD_KEY",
    "DatabaseWrapper",
    "DjangoPgConnMiddleware",
    "database_dsn",
    "get_wsgi_application",
]
