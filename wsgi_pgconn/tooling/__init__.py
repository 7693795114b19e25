"""Tooling around wsgi_pgconn, not part of the library.

``bench``   the headline benchmark (``python -m wsgi_pgconn.bench``) and the
            real-server helpers the test suite shares with it
``tempdb``  throwaway PostgreSQL clusters for tests, examples and benchmarks
            (``python -m wsgi_pgconn.tempdb``)
``ports``   the TCP port range every one of them picks its ports from

The library (``wsgi_pgconn`` and ``wsgi_pgconn.django``) never imports this
package: an application that only uses the middleware never loads it.
"""

from __future__ import annotations

__all__ = ["TOOLING_ENVIRONMENT"]

# Every environment variable with the library's WSGI_PGCONN_ prefix that the
# tooling, the test suite and the CI scripts read; none of them is a setting
# of the middleware. The library keeps the same list, as
# wsgi_pgconn.config.NOT_SETTINGS (it never imports the tooling), so as not to
# report them as unknown settings (the benchmark's servers, for one, run the
# middleware with WSGI_PGCONN_BENCH_* in their environment). tests/test_tooling.py
# checks that every such name in the repository is here, and that the two agree.
TOOLING_ENVIRONMENT: tuple[str, ...] = (
    "WSGI_PGCONN_PORT_RANGE",  # ports of clusters, servers, poolers (tooling/ports.py)
    "WSGI_PGCONN_PG_BINDIR",  # the PostgreSQL server programs (tooling/tempdb.py)
    "WSGI_PGCONN_TEST_DSN",  # the test suite on an existing server (tests/conftest.py)
    "WSGI_PGCONN_SERVER_VENV",  # the real servers' virtualenv (.ci/install-servers.sh)
    "WSGI_PGCONN_SERVER_PYTHON",  # the Python that venv is built from (the same script)
    "WSGI_PGCONN_DJANGO_LINES",  # .ci/django-matrix.sh: Python and Django lines
    "WSGI_PGCONN_DJANGO_VENVS",  # .ci/django-matrix.sh: where their venvs live
    "WSGI_PGCONN_BENCH_APP",  # the benchmark's applications (tooling/bench/apps.py)
    "WSGI_PGCONN_BENCH_DJANGO",
    "WSGI_PGCONN_BENCH_DSN",
    "WSGI_PGCONN_BENCH_POOL_SIZE",
    "WSGI_PGCONN_BENCH_SCOPE",
    "WSGI_PGCONN_BENCH_FSA",  # the Flask-SQLAlchemy page's variant
    "WSGI_PGCONN_BENCH_GREEN",  # the benchmark's page under gevent
)
