"""The benchmark's variants (rows): ways of getting a connection for a request.

Every row serves the same page (three small queries) and runs on one driver,
named at the end of the row's name: ``-pg2`` psycopg2, ``-pg3`` psycopg 3
(:mod:`wsgi_pgconn.tooling.bench.rowdriver` keeps the other driver out of
the row's server). :data:`TARGETS` are the ratios the project aims for,
printed under the table.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

PSYCOPG2 = "psycopg2"
PSYCOPG = "psycopg"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    module: str = "wsgi_pgconn.tooling.bench.apps"
    env: dict[str, str] = field(default_factory=dict)
    dsn: str = "tcp"  # tcp | unix | pgbouncer
    threads: int | None = None  # server threads per process, when not the default
    needs: tuple[str, ...] = ()  # modules the server's Python must import (besides the driver)
    needs_package: tuple[str, ...] = ()  # wsgi_pgconn submodules that must exist
    #: The row's driver (psycopg2 | psycopg), set as WSGI_PGCONN_DRIVER for its
    #: server; None: the run's WSGI_PGCONN_DRIVER (default auto).
    driver: str | None = None
    #: A server of the row's own (gunicorn-gevent | waitress) instead of the run's.
    server: str | None = None

    @property
    def upper_bound(self) -> str:
        """The hand-held connection of the row's driver (and server): the ``x hand-held`` column."""
        suffix = "pg3" if self.driver == PSYCOPG else "pg2"
        return f"{self.server}-handheld-{suffix}" if self.server else f"handheld-{suffix}"


DJANGO = "wsgi_pgconn.tooling.bench.django_app"
FSA = "wsgi_pgconn.tooling.bench.fsa_app"
HANDHELD_PG2 = "handheld-pg2"
HANDHELD_PG3 = "handheld-pg3"
#: A row's own server: gunicorn's gevent worker (--processes workers, a greenlet per client).
GUNICORN_GEVENT = "gunicorn-gevent"
#: A row's own server: waitress-serve (one process, --threads threads).
WAITRESS = "waitress"


def _app(kind: str, **env: str) -> dict[str, str]:
    return {"WSGI_PGCONN_BENCH_APP": kind, **env}


def _django(mode: str) -> dict[str, str]:
    return {"WSGI_PGCONN_BENCH_DJANGO": mode}


VARIANTS = [
    Variant(
        "connect-tcp-pg2",
        "connect per request, TCP + scram",
        env=_app("connect"),
        driver=PSYCOPG2,
    ),
    Variant(
        "connect-unix-pg2",
        "connect per request, unix socket + trust",
        env=_app("connect"),
        dsn="unix",
        driver=PSYCOPG2,
    ),
    # psycopg2: hand-held, its pool, wsgi_pgconn, SQLAlchemy
    Variant(
        HANDHELD_PG2,
        "hand-held thread-local connection, commit per request",
        env=_app("handheld"),
        driver=PSYCOPG2,
    ),
    Variant(
        "threadedpool-pg2",
        "psycopg2 ThreadedConnectionPool",
        env=_app("threadedpool"),
        driver=PSYCOPG2,
    ),
    Variant(
        "pgconn-thread-pg2",
        "wsgi_pgconn scope=thread",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="thread"),
        driver=PSYCOPG2,
    ),
    Variant(
        "pgconn-pool-pg2",
        "wsgi_pgconn scope=pool",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="pool"),
        driver=PSYCOPG2,
    ),
    Variant(
        "pgconn-process-pg2",
        "wsgi_pgconn scope=process (threads=1)",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="process"),
        threads=1,
        driver=PSYCOPG2,
    ),
    Variant(
        "sqlalchemy-pg2",
        "SQLAlchemy QueuePool, pool_pre_ping",
        env=_app("sqlalchemy"),
        needs=("sqlalchemy",),
        driver=PSYCOPG2,
    ),
    # psycopg 3: hand-held, psycopg_pool, wsgi_pgconn
    Variant(
        HANDHELD_PG3,
        "hand-held thread-local connection, commit per request",
        env=_app("handheld"),
        driver=PSYCOPG,
    ),
    Variant(
        "psycopg-pool-pg3",
        "psycopg_pool.ConnectionPool",
        env=_app("psycopgpool"),
        needs=("psycopg_pool",),
        driver=PSYCOPG,
    ),
    Variant(
        "pgconn-thread-pg3",
        "wsgi_pgconn scope=thread",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="thread"),
        driver=PSYCOPG,
    ),
    Variant(
        "pgconn-pool-pg3",
        "wsgi_pgconn scope=pool",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="pool"),
        driver=PSYCOPG,
    ),
    # Django on psycopg2 (psycopg 3 kept out of the server)
    Variant(
        "django-maxage-pg2",
        "Django CONN_MAX_AGE=600 (autocommit)",
        module=DJANGO,
        env=_django("maxage"),
        needs=("django",),
        driver=PSYCOPG2,
    ),
    Variant(
        "django-health-pg2",
        "Django CONN_MAX_AGE + CONN_HEALTH_CHECKS",
        module=DJANGO,
        env=_django("healthchecks"),
        needs=("django",),
        driver=PSYCOPG2,
    ),
    Variant(
        "django-maxage-atomic-pg2",
        "Django CONN_MAX_AGE + ATOMIC_REQUESTS",
        module=DJANGO,
        env=_django("atomic"),
        needs=("django",),
        driver=PSYCOPG2,
    ),
    Variant(
        "django-pgconn-pg2",
        "Django on the wsgi_pgconn adapter",
        module=DJANGO,
        env=_django("pgconn"),
        needs=("django",),
        needs_package=("wsgi_pgconn.django",),
        driver=PSYCOPG2,
    ),
    # Django on psycopg 3 (what Django picks when both are installed)
    Variant(
        "django-maxage-pg3",
        "Django CONN_MAX_AGE=600 (autocommit)",
        module=DJANGO,
        env=_django("maxage"),
        needs=("django",),
        driver=PSYCOPG,
    ),
    Variant(
        "django-maxage-atomic-pg3",
        "Django CONN_MAX_AGE + ATOMIC_REQUESTS",
        module=DJANGO,
        env=_django("atomic"),
        needs=("django",),
        driver=PSYCOPG,
    ),
    Variant(
        "django-pool-pg3",
        'Django\'s pool, OPTIONS["pool"] (autocommit)',
        module=DJANGO,
        env=_django("pool"),
        needs=("django", "psycopg_pool"),
        driver=PSYCOPG,
    ),
    Variant(
        "django-pool-atomic-pg3",
        'Django\'s pool, OPTIONS["pool"] + ATOMIC_REQUESTS',
        module=DJANGO,
        env=_django("pool-atomic"),
        needs=("django", "psycopg_pool"),
        driver=PSYCOPG,
    ),
    Variant(
        "django-pgconn-pg3",
        "Django on the wsgi_pgconn adapter",
        module=DJANGO,
        env=_django("pgconn"),
        needs=("django",),
        needs_package=("wsgi_pgconn.django",),
        driver=PSYCOPG,
    ),
    # Flask-SQLAlchemy (the ORM's page: Session.get, a count, the backend pid)
    Variant(
        "fsa-pool-pg2",
        "Flask-SQLAlchemy, its own QueuePool",
        module=FSA,
        env={"WSGI_PGCONN_BENCH_FSA": "own"},
        needs=("flask_sqlalchemy",),
        driver=PSYCOPG2,
    ),
    Variant(
        "fsa-pool-ping-pg2",
        "Flask-SQLAlchemy, its own QueuePool, pool_pre_ping",
        module=FSA,
        env={"WSGI_PGCONN_BENCH_FSA": "own-ping"},
        needs=("flask_sqlalchemy",),
        driver=PSYCOPG2,
    ),
    Variant(
        "fsa-pgconn-pg2",
        "Flask-SQLAlchemy on wsgi_pgconn (thread scope)",
        module=FSA,
        env={"WSGI_PGCONN_BENCH_FSA": "pgconn", "WSGI_PGCONN_BENCH_SCOPE": "thread"},
        needs=("flask_sqlalchemy",),
        needs_package=("wsgi_pgconn.sqlalchemy", "wsgi_pgconn.flask"),
        driver=PSYCOPG2,
    ),
    Variant(
        "pgbouncer-pg2",
        "PgBouncer: connect per request, unix socket + trust",
        env=_app("connect"),
        dsn="pgbouncer",
        driver=PSYCOPG2,
    ),
    # Servers of their own (not the run's): gunicorn's gevent worker, waitress
    Variant(
        "gevent-pool-pg2",
        "gunicorn -k gevent: wsgi_pgconn scope=pool (wait callback)",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="pool", WSGI_PGCONN_BENCH_GREEN="1"),
        needs=("gevent",),
        driver=PSYCOPG2,
        server=GUNICORN_GEVENT,
    ),
    Variant(
        "gevent-pool-pg3",
        "gunicorn -k gevent: wsgi_pgconn scope=pool",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="pool", WSGI_PGCONN_BENCH_GREEN="1"),
        needs=("gevent",),
        driver=PSYCOPG,
        server=GUNICORN_GEVENT,
    ),
    Variant(
        "waitress-handheld-pg2",
        "waitress: hand-held thread-local connection",
        env=_app("handheld"),
        needs=("waitress",),
        driver=PSYCOPG2,
        server=WAITRESS,
    ),
    Variant(
        "waitress-thread-pg2",
        "waitress: wsgi_pgconn scope=thread",
        env=_app("pgconn", WSGI_PGCONN_BENCH_SCOPE="thread"),
        needs=("waitress",),
        driver=PSYCOPG2,
        server=WAITRESS,
    ),
]

BY_NAME = {v.name: v for v in VARIANTS}
BASELINE = "connect-tcp-pg2"


@dataclass(frozen=True)
class Target:
    """A ratio the project aims for: requests/s of ``row`` over the best of ``over``.

    ``minimum`` None: the ratio is only reported. ``latency``: the target
    holds for ``--rtt`` runs (True), loopback runs (False) or both (None).
    """

    row: str
    over: tuple[str, ...]
    minimum: float | None
    latency: bool | None = None
    note: str = ""


TARGETS = [
    # psycopg 3 (issue 10), loopback
    Target("pgconn-thread-pg3", (HANDHELD_PG3,), 0.97, False),
    Target("pgconn-thread-pg3", ("psycopg-pool-pg3",), 1.0, False),
    Target("pgconn-thread-pg3", ("django-pool-atomic-pg3",), 1.0, False),
    # the hot path (issue 14), loopback
    Target("pgconn-thread-pg2", (HANDHELD_PG2,), 0.97, False),
    Target("pgconn-thread-pg2", (BASELINE,), 12.0, False),
    # Flask-SQLAlchemy (issue 13): against the faster of its own pool's rows
    Target("fsa-pgconn-pg2", ("fsa-pool-pg2", "fsa-pool-ping-pg2"), 1.0),
    # network latency (issue 14): one round trip fewer than the same transaction by hand
    Target("pgconn-thread-pg2", (HANDHELD_PG2,), 1.15, True),
    Target("pgconn-thread-pg3", (HANDHELD_PG3,), 1.15, True),
    Target("django-pgconn-pg2", ("django-maxage-atomic-pg2",), 1.15, True),
    Target("django-pgconn-pg3", ("django-maxage-atomic-pg3",), 1.15, True),
    Target(
        "django-pgconn-pg2",
        ("django-maxage-pg2",),
        None,
        True,
        "autocommit, no transaction: the floor",
    ),
    Target(
        "django-pgconn-pg3",
        ("django-maxage-pg3",),
        None,
        True,
        "autocommit, no transaction: the floor",
    ),
]


def package_has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
