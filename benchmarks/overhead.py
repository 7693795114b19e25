"""In-process overhead of PgConnMiddleware: microseconds and round trips per request.

Usage::

    python benchmarks/overhead.py [--requests N] [--repeat R]

Calls a WSGI application directly, many times, on one thread (no server, no
sockets other than the database connection), and compares

(a) a bare application that keeps its own thread-local psycopg2 connection
    (and commits itself when it queried), with
(b) the same application under ``PgConnMiddleware`` (thread scope, defaults),

for a request that never queries and for one that runs one query. Each cell
is the best of R short runs of N requests (the usual ``timeit`` practice: the
minimum is the run least disturbed by the rest of the machine; the median is
shown too), bare and middleware runs alternating so that a busy spell of the
machine hits both alike, with the garbage collector paused during a run, as
``timeit`` does. On a loaded machine the one-query row is dominated by
network round trips and scheduling noise: compare its medians with care. Round trips per
request are counted on the server with pg_stat_statements when it is
available, otherwise on the client from the process's write system calls
(/proc/self/io ``syscw``: libpq sends each statement with one write).

Target: the middleware adds at most 5 µs per request, and no round trip
beyond the BEGIN/COMMIT the bare application pays too.

The database: DATABASE_URL if set; otherwise a throwaway cluster
(wsgi_pgconn.tooling.tempdb.TemporaryCluster, with pg_stat_statements loaded) that is
deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import psycopg2.extensions

try:
    from wsgi_pgconn import PgConnMiddleware, get_connection
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from wsgi_pgconn import PgConnMiddleware, get_connection

TARGET_US = 5.0
BENCH_DB = "wsgi_pgconn_overhead"
BODY = b"ok"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
QUERY = "SELECT 1"


# -- the applications ------------------------------------------------------------------


def make_bare_apps(dsn: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[[], None]]:
    """(no-query app, one-query app, close) holding their own thread-local connection."""
    local = threading.local()
    opened: list[psycopg2.extensions.connection] = []

    def connection() -> psycopg2.extensions.connection:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg2.connect(dsn)
            opened.append(conn)
        return conn

    def no_query(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        connection()
        start_response("200 OK", HEADERS)
        return [BODY]

    def one_query(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = connection()
        try:
            with conn.cursor() as cur:
                cur.execute(QUERY)
                cur.fetchone()
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        start_response("200 OK", HEADERS)
        return [BODY]

    def close() -> None:
        for conn in opened:
            conn.close()

    return no_query, one_query, close


def mw_no_query(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    get_connection(environ)
    start_response("200 OK", HEADERS)
    return [BODY]


def mw_one_query(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    with get_connection(environ).cursor() as cur:
        cur.execute(QUERY)
        cur.fetchone()
    start_response("200 OK", HEADERS)
    return [BODY]


# -- the "server" ------------------------------------------------------------------------


def base_environ() -> dict[str, Any]:
    import io
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr}
    setup_testing_defaults(environ)
    environ["wsgi.multithread"] = True
    return environ


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def serve(app: Callable[..., Any], environ: dict[str, Any], n: int) -> None:
    """What a server does per request: a fresh environ, call, iterate, close."""
    copy = dict
    for _ in range(n):
        result = app(copy(environ), start_response)
        try:
            for _chunk in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()


def time_pair(
    bare: Callable[..., Any], wrapped: Callable[..., Any], n: int, repeat: int
) -> tuple[list[float], list[float]]:
    """Microseconds per request of ``repeat`` runs of ``n`` requests each, for both apps.

    The runs alternate (bare, middleware, bare, ...) so that a slow spell of the
    machine hits both sides alike.
    """
    environ = base_environ()
    for app in (bare, wrapped):
        serve(app, environ, max(50, n // 20))  # warm up: connection opened, caches hot
    runs: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for app, out in ((bare, runs[0]), (wrapped, runs[1])):
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                start = time.perf_counter_ns()
                serve(app, environ, n)
                elapsed = time.perf_counter_ns() - start
            finally:
                if gc_was_enabled:
                    gc.enable()
            out.append(elapsed / n / 1000)
    return runs


# -- counting round trips ----------------------------------------------------------------------


class ServerCounter:
    """Statements executed in the benchmark database, from pg_stat_statements."""

    label = "server: pg_stat_statements"

    def __init__(self, admin_dsn: str, dbname: str) -> None:
        self._admin_dsn = admin_dsn
        self._dbname = dbname

    @staticmethod
    def available(admin_dsn: str) -> bool:
        try:
            conn = psycopg2.connect(admin_dsn)
        except psycopg2.Error:
            return False
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
                if cur.fetchone() is None:
                    return False
                cur.execute("SELECT count(*) FROM pg_stat_statements")
            return True
        except psycopg2.Error:
            return False
        finally:
            conn.close()

    def _run(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(self._admin_dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, args or None)
                return cur.fetchall()
        finally:
            conn.close()

    @contextmanager
    def measure(self) -> Iterator[list[int]]:
        self._run("SELECT pg_stat_statements_reset()")
        out: list[int] = []
        yield out
        rows = self._run(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = %s",
            self._dbname,
        )
        out.append(int(rows[0][0]))


class ClientCounter:
    """Write system calls of this process (one per statement libpq sends)."""

    label = "client: write() calls, /proc/self/io"

    @staticmethod
    def available() -> bool:
        try:
            ClientCounter._syscw()
        except OSError:
            return False
        return True

    @staticmethod
    def _syscw() -> int:
        with open("/proc/self/io", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("syscw:"):
                    return int(line.split()[1])
        raise OSError("no syscw in /proc/self/io")

    @contextmanager
    def measure(self) -> Iterator[list[int]]:
        out: list[int] = []
        before = self._syscw()
        yield out
        out.append(self._syscw() - before)


def round_trips(counter: Any, app: Callable[..., Any], n: int) -> float:
    environ = base_environ()
    serve(app, environ, 10)  # the connection is open before counting
    with counter.measure() as result:
        serve(app, environ, n)
    return result[0] / n


# -- the database ------------------------------------------------------------------------------


@contextmanager
def database() -> Iterator[tuple[str, str, str]]:
    """(application DSN, admin DSN for counting, database name)."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        params = psycopg2.extensions.parse_dsn(url)
        yield url, url, params.get("dbname", "")
        return
    from wsgi_pgconn.tooling.tempdb import TemporaryCluster

    settings = {
        "shared_preload_libraries": "'pg_stat_statements'",
        "pg_stat_statements.track_utility": "on",
    }
    with TemporaryCluster(settings=settings) as cluster:
        cluster.create_database(BENCH_DB)
        admin = cluster.dsn(dbname="postgres", application_name="overhead-admin")
        conn = psycopg2.connect(admin)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        finally:
            conn.close()
        yield cluster.dsn(dbname=BENCH_DB, application_name="overhead"), admin, BENCH_DB


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="requests per run without a query (default 2000; a twentieth with one)",
    )
    parser.add_argument("--repeat", type=int, default=41, help="runs per cell (default 41)")
    args = parser.parse_args(argv)
    n_idle, n_query = args.requests, max(50, args.requests // 20)

    for var in list(os.environ):
        if var.startswith("WSGI_PGCONN_"):
            del os.environ[var]  # the middleware runs with its defaults

    with database() as (dsn, admin_dsn, dbname):
        if dbname and ServerCounter.available(admin_dsn):
            counter: Any = ServerCounter(admin_dsn, dbname)
        elif ClientCounter.available():
            counter = ClientCounter()
        else:
            counter = None

        bare_idle, bare_query, close_bare = make_bare_apps(dsn)
        mw_idle = PgConnMiddleware(mw_no_query, dsn=dsn)
        mw_query = PgConnMiddleware(mw_one_query, dsn=dsn)
        rows = []
        try:
            for label, bare, wrapped, n in (
                ("no query", bare_idle, mw_idle, n_idle),
                ("one query", bare_query, mw_query, n_query),
            ):
                bare_runs, mw_runs = time_pair(bare, wrapped, n, args.repeat)
                bare_best, bare_median = min(bare_runs), statistics.median(bare_runs)
                mw_best, mw_median = min(mw_runs), statistics.median(mw_runs)
                trips = (
                    (round_trips(counter, bare, 500), round_trips(counter, wrapped, 500))
                    if counter is not None
                    else (float("nan"), float("nan"))
                )
                rows.append((label, n, bare_best, mw_best, bare_median, mw_median, *trips))
        finally:
            close_bare()
            mw_idle.close()
            mw_query.close()

        server_version = "?"
        try:
            conn = psycopg2.connect(dsn)
            try:
                server_version = conn.info.parameter_status("server_version") or "?"
            finally:
                conn.close()
        except psycopg2.Error:
            pass

    print(
        f"wsgi_pgconn in-process overhead: Python {platform.python_version()}, "
        f"psycopg2 {psycopg2.__version__.split()[0]}, PostgreSQL {server_version}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"best of {args.repeat} runs per cell (median in brackets); round trips per request "
        f"counted by {counter.label if counter else 'nothing (no counter available)'}"
    )
    print()
    header = (
        f"{'request':<10} {'runs of':>8} {'bare app µs':>18} {'middleware µs':>18} "
        f"{'added µs':>9} {'ratio':>6} {'round trips bare':>17} {'middleware':>11}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    for label, n, bare_best, mw_best, bare_median, mw_median, rt_bare, rt_mw in rows:
        added = mw_best - bare_best
        print(
            f"{label:<10} {n:>8} {bare_best:>8.2f} [{bare_median:>7.2f}] "
            f"{mw_best:>8.2f} [{mw_median:>7.2f}] {added:>+9.2f} {mw_best / bare_best:>5.2f}x "
            f"{rt_bare:>17.2f} {rt_mw:>11.2f}"
        )
        ok = ok and added <= TARGET_US and not (rt_mw > rt_bare + 0.01)
    print()
    worst = max(r[3] - r[2] for r in rows)
    extra_trips = max(r[7] - r[6] for r in rows)
    print(
        f"target: at most {TARGET_US:g} µs added per request -> worst {worst:+.2f} µs: "
        f"{'met' if worst <= TARGET_US else 'NOT MET'}"
    )
    print(
        f"target: no round trip beyond BEGIN/COMMIT -> middleware minus bare "
        f"{extra_trips:+.2f} per request: {'met' if not extra_trips > 0.01 else 'NOT MET'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
