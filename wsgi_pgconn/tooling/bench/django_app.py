"""The benchmark page as a Django project of one module.

``WSGI_PGCONN_BENCH_DJANGO`` picks the connection handling:

``maxage``        Django's persistent connections, ``CONN_MAX_AGE = 600``
``healthchecks``  the same plus ``CONN_HEALTH_CHECKS = True``
``atomic``        ``CONN_MAX_AGE = 600`` plus ``ATOMIC_REQUESTS = True``: Django's way
                  to run each request in one transaction, as the adapter does
``pool``          Django's own connection pool (``OPTIONS["pool"]``, psycopg 3 only,
                  ``CONN_MAX_AGE = 0``), min_size = max_size = the pool size
``pool-atomic``   the same plus ``ATOMIC_REQUESTS = True``
``pgconn``        Django on the wsgi_pgconn adapter (``wsgi_pgconn.django``)

Each view runs the page's three queries.  Django runs them in autocommit
mode by default (its ``ATOMIC_REQUESTS`` is off): no BEGIN and COMMIT, two
round trips fewer than one transaction per request.  ``atomic`` sends BEGIN,
the three queries, COMMIT; the wsgi_pgconn adapter the same with BEGIN riding
on the first query.

Django's backend uses psycopg 3 whenever it can import it: the row's driver
(``WSGI_PGCONN_DRIVER``) is made the only importable one first
(:func:`.rowdriver.isolate`), and the page names the driver Django uses.

Django is imported with :func:`importlib.import_module` so that this module
type-checks without Django installed.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from wsgi_pgconn import drivers
from wsgi_pgconn.tooling.bench.apps import cursor_fetchone, run_page
from wsgi_pgconn.tooling.bench.rowdriver import isolate

MODES = ("maxage", "healthchecks", "atomic", "pool", "pool-atomic", "pgconn")
MODE = os.environ.get("WSGI_PGCONN_BENCH_DJANGO", "maxage")
DSN = os.environ["WSGI_PGCONN_BENCH_DSN"]
DRIVER = isolate()  # before Django is imported


def database_settings(dsn: str, mode: str, driver: str) -> dict[str, Any]:
    if mode not in MODES:
        raise ValueError(f"unknown Django benchmark mode {mode!r}: one of {', '.join(MODES)}")
    params = drivers.parse_conninfo(dsn, driver)
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
        "ATOMIC_REQUESTS": mode in ("atomic", "pool-atomic"),
    }
    if mode in ("pool", "pool-atomic"):
        # Django's pool needs CONN_MAX_AGE = 0: the connection goes back to
        # the pool at the end of each request.
        size = int(os.environ.get("WSGI_PGCONN_BENCH_POOL_SIZE") or 4)
        database["OPTIONS"] = {**params, "pool": {"min_size": size, "max_size": size}}
        database["CONN_MAX_AGE"] = 0
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
    DATABASES={"default": database_settings(DSN, MODE, DRIVER)},
)
django.setup()

connection: Any = importlib.import_module("django.db").connection
HttpResponse: Any = importlib.import_module("django.http").HttpResponse
#: The driver Django's backend really uses (it picks psycopg 3 when it can import it).
USED = (
    "psycopg"
    if importlib.import_module("django.db.backends.postgresql.psycopg_any").is_psycopg3
    else "psycopg2"
)


def page(request: Any) -> Any:
    with connection.cursor() as cur:
        body = run_page(cursor_fetchone(cur), USED)
    return HttpResponse(body, content_type="text/html; charset=us-ascii")


urlpatterns = [importlib.import_module("django.urls").path("", page)]

if MODE == "pgconn":
    # Django's WSGI application in DjangoPgConnMiddleware (DSN from DATABASES).
    application: Any = importlib.import_module("wsgi_pgconn.django").get_wsgi_application(
        scope="thread"
    )
else:
    application = importlib.import_module("django.core.wsgi").get_wsgi_application()
