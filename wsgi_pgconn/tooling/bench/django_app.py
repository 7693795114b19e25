"""The benchmark page as a Django project of one module.

``WSGI_PGCONN_BENCH_DJANGO`` picks the connection handling:

``maxage``        Django's persistent connections, ``CONN_MAX_AGE = 600``
``healthchecks``  the same plus ``CONN_HEALTH_CHECKS = True``
``atomic``        ``CONN_MAX_AGE = 600`` plus ``ATOMIC_REQUESTS = True``: Django's way
                  to run each request in one transaction, as the adapter does
``pgconn``        Django on the wsgi_pgconn adapter (``wsgi_pgconn.django``)

Each view runs the page's three queries.  Django runs them in autocommit
mode by default (its ``ATOMIC_REQUESTS`` is off): no BEGIN and COMMIT, two
round trips fewer than one transaction per request.  ``atomic`` and the
wsgi_pgconn adapter both send BEGIN, the three queries, COMMIT.

Django is imported with :func:`importlib.import_module` so that this module
type-checks without Django installed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from psycopg2.extensions import parse_dsn

from wsgi_pgconn.tooling.bench.apps import cursor_fetchone, run_page

MODE = os.environ.get("WSGI_PGCONN_BENCH_DJANGO", "maxage")
DSN = os.environ["WSGI_PGCONN_BENCH_DSN"]


def database_settings(dsn: str, mode: str) -> dict[str, Any]:
    params = parse_dsn(dsn)
    database: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.pop("dbname", "postgres"),
        "USER": params.pop("user", ""),
        "PASSWORD": params.pop("password", ""),
        "HOST": params.pop("host", ""),
        "PORT": params.pop("port", ""),
        "OPTIONS": params,
        "CONN_MAX_AGE": 600,
        "CONN_HEALTH_CHECKS": mode == "healthchecks",
        "ATOMIC_REQUESTS": mode == "atomic",
    }
    if mode == "pgconn":
        # Inside a request the adapter's ORM runs on the middleware's
        # connection and transaction.
        database["ENGINE"] = "wsgi_pgconn.django"
        database["CONN_MAX_AGE"] = 0
    return database


django: Any = importlib.import_module("django")
settings: Any = importlib.import_module("django.conf").settings
settings.configure(
    DEBUG=False,
    SECRET_KEY="wsgi-pgconn-bench-not-a-secret",  # noqa: S106 - a benchmark, no sessions
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
    USE_TZ=True,
    DATABASES={"default": database_settings(DSN, MODE)},
)
django.setup()

connection: Any = importlib.import_module("django.db").connection
HttpResponse: Any = importlib.import_module("django.http").HttpResponse


def page(request: Any) -> Any:
    with connection.cursor() as cur:
        body = run_page(cursor_fetchone(cur))
    return HttpResponse(body, content_type="text/html; charset=us-ascii")


urlpatterns = [importlib.import_module("django.urls").path("", page)]

if MODE == "pgconn":
    # Django's WSGI application in DjangoPgConnMiddleware (DSN from DATABASES).
    application: Any = importlib.import_module("wsgi_pgconn.django").get_wsgi_application(
        scope="thread"
    )
else:
    application = importlib.import_module("django.core.wsgi").get_wsgi_application()
