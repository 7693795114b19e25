"""The benchmark's variants: ways of getting a connection for a request."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    module: str = "wsgi_pgconn.tooling.bench.apps"
    env: dict[str, str] = field(default_factory=dict)
    dsn: str = "tcp"  # tcp | unix | pgbouncer
    threads: int | None = None  # server threads per process, when not the default
    needs: tuple[str, ...] = ()  # modules the server's Python must import
    needs_package: tuple[str, ...] = ()  # wsgi_pgconn submodules that must exist


APPS = "wsgi_pgconn.tooling.bench.apps"
DJANGO = "wsgi_pgconn.tooling.bench.django_app"

VARIANTS = [
    Variant(
        "connect-tcp", "connect per request, TCP + scram", env={"WSGI_PGCONN_BENCH_APP": "connect"}
    ),
    Variant(
        "connect-unix",
        "connect per request, unix socket + trust",
        env={"WSGI_PGCONN_BENCH_APP": "connect"},
        dsn="unix",
    ),
    Variant(
        "pgconn-thread",
        "wsgi_pgconn scope=thread",
        env={"WSGI_PGCONN_BENCH_APP": "pgconn", "WSGI_PGCONN_BENCH_SCOPE": "thread"},
    ),
    Variant(
        "pgconn-pool",
        "wsgi_pgconn scope=pool",
        env={"WSGI_PGCONN_BENCH_APP": "pgconn", "WSGI_PGCONN_BENCH_SCOPE": "pool"},
    ),
    Variant(
        "pgconn-process",
        "wsgi_pgconn scope=process (threads=1)",
        env={"WSGI_PGCONN_BENCH_APP": "pgconn", "WSGI_PGCONN_BENCH_SCOPE": "process"},
        threads=1,
    ),
    Variant(
        "handheld", "hand-held thread-local connection", env={"WSGI_PGCONN_BENCH_APP": "handheld"}
    ),
    Variant(
        "threadedpool",
        "psycopg2 ThreadedConnectionPool",
        env={"WSGI_PGCONN_BENCH_APP": "threadedpool"},
    ),
    Variant(
        "sqlalchemy",
        "SQLAlchemy QueuePool, pool_pre_ping",
        env={"WSGI_PGCONN_BENCH_APP": "sqlalchemy"},
        needs=("sqlalchemy",),
    ),
    Variant(
        "django-maxage",
        "Django CONN_MAX_AGE=600",
        module=DJANGO,
        env={"WSGI_PGCONN_BENCH_DJANGO": "maxage"},
        needs=("django",),
    ),
    Variant(
        "django-health",
        "Django CONN_MAX_AGE + CONN_HEALTH_CHECKS",
        module=DJANGO,
        env={"WSGI_PGCONN_BENCH_DJANGO": "healthchecks"},
        needs=("django",),
    ),
    Variant(
        "django-maxage-atomic",
        "Django CONN_MAX_AGE + ATOMIC_REQUESTS",
        module=DJANGO,
        env={"WSGI_PGCONN_BENCH_DJANGO": "atomic"},
        needs=("django",),
    ),
    Variant(
        "django-pgconn",
        "Django on the wsgi_pgconn adapter",
        module=DJANGO,
        env={"WSGI_PGCONN_BENCH_DJANGO": "pgconn"},
        needs=("django",),
        needs_package=("wsgi_pgconn.django",),
    ),
    Variant(
        "pgbouncer",
        "PgBouncer: connect per request, unix socket + trust",
        env={"WSGI_PGCONN_BENCH_APP": "connect"},
        dsn="pgbouncer",
    ),
]

BY_NAME = {v.name: v for v in VARIANTS}
BASELINE = "connect-tcp"
UPPER_BOUND = "handheld"


def package_has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False
