"""Measure what ``pooler="transaction"`` costs per request, directly and through PgBouncer.

Run from the repository root (needs PostgreSQL server binaries and pgbouncer)::

    python tests/scaling/measure_scaling.py [--requests 2000] [--rounds 5]

Every variant serves the same in-process requests (no HTTP server, so only
the database work is timed): one ``SELECT 1`` per request, that is BEGIN,
the query and COMMIT. The variants run in alternation, round after round, and
the median of the per-round means is printed, with the difference to the
variant without a statement_timeout on the same path.
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling_servers import PgBouncer, query

from wsgi_pgconn import PgConnMiddleware, get_connection
from wsgi_pgconn.tooling.tempdb import TemporaryCluster


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchall()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def middleware(application: Any, **kwargs: Any) -> PgConnMiddleware:
    """PgConnMiddleware(application, **kwargs); ``pooler`` through the environment if the
    installed version does not take it as a keyword yet."""
    if "pooler" in inspect.signature(PgConnMiddleware.__init__).parameters:
        return PgConnMiddleware(application, **kwargs)
    pooler = kwargs.pop("pooler", "none")
    saved = os.environ.get("WSGI_PGCONN_POOLER")
    os.environ["WSGI_PGCONN_POOLER"] = pooler
    try:
        return PgConnMiddleware(application, **kwargs)
    finally:
        if saved is None:
            del os.environ["WSGI_PGCONN_POOLER"]
        else:
            os.environ["WSGI_PGCONN_POOLER"] = saved


def serve(mw: PgConnMiddleware, environ: dict[str, Any]) -> None:
    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not status.startswith("200"):
            raise RuntimeError(status)
        return lambda data: None

    body = mw(dict(environ), start_response)
    for _ in body:
        pass
    close = getattr(body, "close", None)
    if close is not None:
        close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "wsgi.multithread": False,
        "wsgi.url_scheme": "http",
    }
    with TemporaryCluster() as cluster:
        query(
            cluster.dsn(),
            "CREATE ROLE scaling_pool LOGIN; CREATE ROLE scaling_limited LOGIN; "
            "ALTER ROLE scaling_limited SET statement_timeout = '5s'",
        )
        bouncer = PgBouncer(
            cluster,
            pool_mode="transaction",
            pool_size=2,
            databases={
                "appdb": {"dbname": "postgres", "user": "scaling_pool"},
                "limited": {"dbname": "postgres", "user": "scaling_limited"},
            },
            users={"app": "measure-only"},
        )
        try:
            bouncer.start()
            via = bouncer.dsn("appdb", "app")
            variants: dict[str, PgConnMiddleware] = {
                "direct, no timeout": middleware(app, dsn=cluster.dsn(), scope="process"),
                "direct, statement_timeout as startup option (pooler=none)": middleware(
                    app, dsn=cluster.dsn(), scope="process", statement_timeout="5s"
                ),
                "direct, statement_timeout per request (pooler=transaction)": middleware(
                    app,
                    dsn=cluster.dsn(),
                    scope="process",
                    statement_timeout="5s",
                    pooler="transaction",
                ),
                "PgBouncer, no timeout": middleware(
                    app, dsn=via, scope="process", pooler="transaction"
                ),
                "PgBouncer, statement_timeout per request (pooler=transaction)": middleware(
                    app, dsn=via, scope="process", statement_timeout="5s", pooler="transaction"
                ),
                "PgBouncer, ALTER ROLE ... SET statement_timeout": middleware(
                    app, dsn=bouncer.dsn("limited", "app"), scope="process", pooler="transaction"
                ),
            }
            means: dict[str, list[float]] = {name: [] for name in variants}
            for mw in variants.values():  # warm up: connect, fill caches
                for _ in range(200):
                    serve(mw, environ)
            for _ in range(args.rounds):
                for name, mw in variants.items():
                    started = time.perf_counter()
                    for _ in range(args.requests):
                        serve(mw, environ)
                    means[name].append((time.perf_counter() - started) / args.requests * 1e6)
            for mw in variants.values():
                mw.close()
        finally:
            bouncer.cleanup()

    print(f"{args.rounds} rounds x {args.requests} requests (BEGIN; SELECT 1; COMMIT) each;")
    print("us per request: median of the round means, fastest round; difference to no timeout")
    for name, values in means.items():
        path = "direct, no timeout" if name.startswith("direct") else "PgBouncer, no timeout"
        median, fastest = statistics.median(values), min(values)
        print(
            f"  {name:<63} {median:6.0f} {fastest:6.0f}   "
            f"{median - statistics.median(means[path]):+5.0f} {fastest - min(means[path]):+5.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
