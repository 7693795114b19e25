"""In-process overhead of PgConnMiddleware: microseconds, instructions and round trips per request.

Usage::

    python benchmarks/overhead.py [--driver psycopg2|psycopg] [--requests N] [--repeat R]
                                  [--callgrind-requests M] [--no-callgrind]

Calls a WSGI application directly, many times, on one thread (no server, no
sockets other than the database connection), and compares

(a) a bare application that keeps its own thread-local connection of the
    driver (and commits itself when it queried), with
(b) the same application under ``PgConnMiddleware`` (thread scope, defaults,
    the same driver),

for a request that never queries, one that runs one query, and the page of
issue 14: three queries. It measures three things.

**Wall clock**, µs per request. Each cell is the best of R short runs of N
requests (the usual ``timeit`` practice: the minimum is the run least
disturbed by the rest of the machine; the median is shown too), bare and
middleware runs alternating so that a busy spell of the machine hits both
alike, with the garbage collector paused during a run, as ``timeit`` does. On
a loaded machine the rows that query are dominated by network round trips and
scheduling noise: compare their medians with care.

**Instructions per request**, counted with ``valgrind --tool=callgrind``
(when valgrind is installed; ``apt-get install valgrind``). One child Python
process runs every cell under callgrind, collecting only inside the measured
loops: each loop is called through ``sys.call_tracing``, and callgrind is
told ``--toggle-collect=_PyEval_CallTracing`` (CPython's C function behind
it) and ``--dump-after`` the same, so each loop is one dump. After a warm-up
(the connection open, psycopg's statements prepared), every cell runs M
requests and then 2M; the difference divided by M is one request, with what
happens once per loop cancelled out. The counts are the user-space
instructions of the client process: the application, the middleware, the
driver and libpq; not the kernel, not PostgreSQL. The garbage collector is
paused in the loops. They do not depend on the machine's load or speed,
only on the Python, driver and libpq builds: the same versions give the same
counts on another machine, to within a few instructions.

**Round trips per request**, counted on the wire: a relay
(:mod:`wsgi_pgconn.tooling.relay`, no added latency) between the application
and the server counts turns, a request burst followed by its answer.

Targets (issue 14): the middleware adds at most 10,000 instructions to the
three-query page and at most 5,000 to a request that never queries; it makes
no round trip beyond what the bare application pays (one fewer when BEGIN
rides with the first statement); at most 5 µs added per request.

The database: DATABASE_URL if set; otherwise a throwaway cluster
(wsgi_pgconn.tooling.tempdb.TemporaryCluster) that is deleted at the end.
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

try:
    from wsgi_pgconn import PgConnMiddleware, drivers, get_connection
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from wsgi_pgconn import PgConnMiddleware, drivers, get_connection

TARGET_US = 5.0
#: Instructions the middleware may add per request (issue 14), by request kind.
TARGET_INSTRUCTIONS = {"no query": 5_000, "three queries": 10_000}
BODY = b"ok"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
#: The requests, by label: the statements each one runs.
PAGES: dict[str, tuple[str, ...]] = {
    "no query": (),
    "one query": ("SELECT 1",),
    "three queries": ("SELECT 1", "SELECT 2", "SELECT 3"),
}
#: The callgrind child's loops are called through sys.call_tracing: this C function.
TOGGLE = "_PyEval_CallTracing"
CALLGRIND_WARMUP = 10  # requests before counting: past psycopg's prepare threshold (5)
SIDES = ("bare", "middleware")


# -- the applications ------------------------------------------------------------------


def connect(driver: str, dsn: str) -> Any:
    """A plain connection of ``driver``, as an application opens it (not in autocommit)."""
    module = importlib.import_module(driver)
    return module.connect(dsn)


def make_bare_app(
    driver: str, dsn: str, statements: tuple[str, ...]
) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(app, close): an application holding its own thread-local connection."""
    local = threading.local()
    opened: list[Any] = []

    def connection() -> Any:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = connect(driver, dsn)
            opened.append(conn)
        return conn

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = connection()
        if statements:
            try:
                with conn.cursor() as cur:
                    for sql in statements:
                        cur.execute(sql)
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

    return app, close


#: Middleware settings other than the defaults (``--setting NAME=VALUE``).
SETTINGS: dict[str, str] = {}


def make_middleware_app(
    driver: str, dsn: str, statements: tuple[str, ...]
) -> tuple[Callable[..., Any], Callable[[], None]]:
    """(app, close): the same application under the middleware (thread scope, defaults)."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        conn = get_connection(environ)
        if statements:
            with conn.cursor() as cur:
                for sql in statements:
                    cur.execute(sql)
                    cur.fetchone()
        start_response("200 OK", HEADERS)
        return [BODY]

    mw = PgConnMiddleware(app, dsn=dsn, driver=driver, **SETTINGS)  # type: ignore[arg-type]
    return mw, mw.close


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


# -- round trips, counted by a relay ---------------------------------------------------------


def relay_target(dsn: str, driver: str) -> tuple[str, int] | str:
    params = drivers.parse_conninfo(dsn, driver)
    host = params.get("host") or os.environ.get("PGHOST") or "/var/run/postgresql"
    port = int(params.get("port") or os.environ.get("PGPORT") or 5432)
    return f"{host}/.s.PGSQL.{port}" if host.startswith("/") else (host, port)


def round_trips(driver: str, dsn: str, n: int = 50) -> dict[str, tuple[float, float]]:
    """Turns per request, (bare, middleware), by page: counted between the app and the server."""
    from wsgi_pgconn.tooling.relay import Relay

    load = drivers.load(driver)
    result: dict[str, tuple[float, float]] = {}
    with Relay(relay_target(dsn, driver)) as relay:
        relayed = load.make_conninfo(dsn, host="127.0.0.1", port=str(relay.port))
        environ = base_environ()
        for label, statements in PAGES.items():
            counts = []
            for make in (make_bare_app, make_middleware_app):
                app, close = make(driver, relayed, statements)
                try:
                    serve(app, environ, 10)  # the connection is open before counting
                    before = relay.stats()
                    serve(app, environ, n)
                    counts.append(relay.stats().since(before).turns / n)
                finally:
                    close()
            result[label] = (counts[0], counts[1])
    return result


# -- instructions, counted by callgrind -------------------------------------------------------


def callgrind_child(driver: str, dsn: str, requests: int) -> int:
    """Run under callgrind by :func:`count_instructions`: every cell, M then 2M requests."""
    environ = base_environ()
    order = []
    closers = []
    try:
        for label, statements in PAGES.items():
            for side, make in (("bare", make_bare_app), ("middleware", make_middleware_app)):
                app, close = make(driver, dsn, statements)
                closers.append(close)
                serve(app, environ, CALLGRIND_WARMUP)
                gc.collect()
                gc.disable()
                for n in (requests, 2 * requests):
                    sys.call_tracing(serve, (app, environ, n))  # one callgrind dump each
                    order.append([label, side, n])
                gc.enable()
    finally:
        for close in closers:
            close()
    print(json.dumps(order), flush=True)
    return 0


def count_instructions(
    driver: str, dsn: str, requests: int
) -> tuple[dict[str, tuple[float, float]], str]:
    """Instructions per request, (bare, middleware), by page; and the valgrind version."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    version = subprocess.run(
        [valgrind, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts every run
    with tempfile.TemporaryDirectory(prefix="overhead-callgrind-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        argv = [
            valgrind,
            "--tool=callgrind",
            f"--toggle-collect={TOGGLE}",
            f"--dump-after={TOGGLE}",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--callgrind-child",
            "--driver",
            driver,
            "--dsn",
            dsn,
            "--callgrind-requests",
            str(requests),
            *(f"--setting={name}={value}" for name, value in SETTINGS.items()),
        ]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the callgrind run failed:\n{proc.stdout}{proc.stderr}")
        order = json.loads(proc.stdout.strip().splitlines()[-1])
        dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        totals = [_callgrind_total(path) for path in dumps]
    if len(totals) != len(order) or not all(totals):
        raise RuntimeError(
            f"callgrind wrote {len(totals)} non-empty dumps for {len(order)} loops: "
            f"does this Python have the C function {TOGGLE}?"
        )
    measured: dict[tuple[str, str, int], int] = {
        (label, side, n): total for (label, side, n), total in zip(order, totals, strict=True)
    }
    result = {}
    for label in PAGES:
        per_request = [
            (measured[(label, side, 2 * requests)] - measured[(label, side, requests)]) / requests
            for side in ("bare", "middleware")
        ]
        result[label] = (per_request[0], per_request[1])
    return result, version


def _callgrind_total(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    return 0


# -- the database ------------------------------------------------------------------------------


@contextmanager
def database() -> Iterator[str]:
    """The application's DSN: DATABASE_URL, else a throwaway cluster's."""
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    from wsgi_pgconn.tooling.tempdb import TemporaryCluster

    with TemporaryCluster() as cluster:
        cluster.create_database("wsgi_pgconn_overhead")
        yield cluster.dsn(dbname="wsgi_pgconn_overhead", application_name="overhead")


def describe(driver: str, dsn: str) -> str:
    try:
        conn = connect(driver, dsn)
        try:
            server_version = drivers.load(driver).parameter_status(conn, "server_version") or "?"
        finally:
            conn.close()
    except Exception as exc:  # the description is decoration
        server_version = f"? ({exc})"
    return (
        f"Python {platform.python_version()}, {drivers.load(driver).version()}, "
        f"PostgreSQL {server_version}, {os.cpu_count()} CPUs"
    )


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--driver",
        choices=drivers.CHOICES,
        default="auto",
        help="the driver of both applications (default: auto, psycopg 3 if installed)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="requests per timed run without a query (default 2000; a twentieth with queries)",
    )
    parser.add_argument("--repeat", type=int, default=41, help="timed runs per cell (default 41)")
    parser.add_argument(
        "--callgrind-requests",
        type=int,
        default=100,
        help="M: callgrind counts M and 2M requests per cell (default 100)",
    )
    parser.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a middleware setting other than its default, e.g. pipeline_begin=0 (repeatable)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results to PATH as JSON")
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    driver = drivers.resolve(args.driver)
    for item in args.setting:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--setting takes NAME=VALUE, not {item!r}")
        SETTINGS[name.strip()] = value.strip()
    if args.callgrind_child:
        return callgrind_child(driver, args.dsn, args.callgrind_requests)
    n_idle, n_query = args.requests, max(50, args.requests // 20)

    for var in list(os.environ):
        if var.startswith("WSGI_PGCONN_"):
            del os.environ[var]  # the middleware runs with its defaults

    instructions: dict[str, tuple[float, float]] | None = None
    callgrind_note = ""
    with database() as dsn:
        rows = []
        for label, statements in PAGES.items():
            bare, close_bare = make_bare_app(driver, dsn, statements)
            wrapped, close_mw = make_middleware_app(driver, dsn, statements)
            n = n_idle if not statements else n_query
            try:
                bare_runs, mw_runs = time_pair(bare, wrapped, n, args.repeat)
            finally:
                close_bare()
                close_mw()
            rows.append((label, n, bare_runs, mw_runs))
        trips = round_trips(driver, dsn)
        if not args.no_callgrind:
            try:
                instructions, version = count_instructions(driver, dsn, args.callgrind_requests)
                callgrind_note = (
                    f"{version}, {2 * args.callgrind_requests} minus {args.callgrind_requests} "
                    "requests per cell, divided"
                )
            except RuntimeError as exc:
                callgrind_note = f"not counted: {exc}"
        header_line = describe(driver, dsn)

    print(f"wsgi_pgconn in-process overhead, driver {driver}: {header_line}")
    if SETTINGS:
        print("middleware settings: " + ", ".join(f"{k}={v}" for k, v in SETTINGS.items()))
    print(
        f"wall clock: best of {args.repeat} runs per cell (median in brackets); round trips per "
        "request: turns counted by a relay between the application and the server"
    )
    print()
    header = (
        f"{'request':<14} {'runs of':>8} {'bare app µs':>18} {'middleware µs':>18} "
        f"{'added µs':>9} {'ratio':>6} {'round trips bare':>17} {'middleware':>11}"
    )
    print(header)
    print("-" * len(header))
    ok = True
    worst = float("-inf")
    extra_trips = float("-inf")
    for label, n, bare_runs, mw_runs in rows:
        bare_best, bare_median = min(bare_runs), statistics.median(bare_runs)
        mw_best, mw_median = min(mw_runs), statistics.median(mw_runs)
        added = mw_best - bare_best
        rt_bare, rt_mw = trips[label]
        print(
            f"{label:<14} {n:>8} {bare_best:>8.2f} [{bare_median:>7.2f}] "
            f"{mw_best:>8.2f} [{mw_median:>7.2f}] {added:>+9.2f} {mw_best / bare_best:>5.2f}x "
            f"{rt_bare:>17.2f} {rt_mw:>11.2f}"
        )
        worst = max(worst, added)
        extra_trips = max(extra_trips, rt_mw - rt_bare)
    print()
    print(f"instructions per request, client side (valgrind --tool=callgrind: {callgrind_note})")
    if instructions is not None:
        print()
        header = f"{'request':<14} {'bare app':>12} {'middleware':>12} {'added':>12} {'ratio':>7}"
        print(header)
        print("-" * len(header))
        for label, (bare_i, mw_i) in instructions.items():
            print(
                f"{label:<14} {bare_i:>12,.0f} {mw_i:>12,.0f} {mw_i - bare_i:>+12,.0f} "
                f"{mw_i / bare_i:>6.2f}x"
            )
    print(
        """
How to read: "bare app" is the application with its own thread-local connection,
committing itself; "middleware" is the same application under PgConnMiddleware;
"added" is the difference, what the middleware costs per request. Microseconds
depend on the machine and its load (compare the medians on a busy machine);
instructions are counted by callgrind in the client process only (application,
middleware, driver, libpq; not the kernel, not PostgreSQL) and do not: on the same
Python, driver and libpq they come out the same on any machine. Round trips are
the turns a request waits for the server: the bare application pays BEGIN and
COMMIT as turns of their own; the middleware sends BEGIN with the first statement."""
    )
    print()
    print(
        f"target: at most {TARGET_US:g} µs added per request -> worst {worst:+.2f} µs: "
        f"{'met' if worst <= TARGET_US else 'NOT MET'}"
    )
    ok = ok and worst <= TARGET_US
    print(
        f"target: no round trip beyond the bare application's -> middleware minus bare "
        f"{extra_trips:+.2f} per request at most: {'met' if not extra_trips > 0.01 else 'NOT MET'}"
    )
    ok = ok and not extra_trips > 0.01
    if instructions is not None:
        for label, limit in TARGET_INSTRUCTIONS.items():
            bare_i, mw_i = instructions[label]
            met = mw_i - bare_i <= limit
            ok = ok and met
            print(
                f"target: at most {limit:,} instructions added ({label}) -> "
                f"{mw_i - bare_i:+,.0f}: {'met' if met else 'NOT MET'}"
            )
    if args.json:
        results = {
            "driver": driver,
            "description": header_line,
            "settings": SETTINGS,
            "wall_us": {
                label: {"requests": n, "bare": bare_runs, "middleware": mw_runs}
                for label, n, bare_runs, mw_runs in rows
            },
            "round_trips": {
                label: dict(zip(SIDES, pair, strict=True)) for label, pair in trips.items()
            },
            "instructions": None
            if instructions is None
            else {
                label: dict(zip(SIDES, pair, strict=True)) for label, pair in instructions.items()
            },
            "callgrind": callgrind_note,
            "targets_met": ok,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
