"""Slow queries on a small pool: gunicorn's gevent worker against gthread.

Usage::

    python benchmarks/green_slow_query.py [--clients 20] [--sleep 0.2] [--pool 4]
                                          [--seconds 6] [--rounds 2] [--drivers psycopg2,psycopg]
                                          [--more-clients 50,100] [--package DIR]

One gunicorn worker serves an application whose every request runs
``pg_sleep(--sleep)`` on a pool of ``--pool`` connections
(``WSGI_PGCONN_SCOPE=pool``, ``POOL_TIMEOUT=5``), under the gevent worker
(psycopg2 with wsgi_pgconn's wait callback) and under gthread with as many
threads as clients. ``--clients`` client threads send requests, each on a
fresh TCP connection (what nginx does upstream), for ``--seconds``. Cells
alternate, the order reversed every other round. Reported per cell:

* p50 / p99 / max: response time, seconds; "wait" is p99 minus the query's
  own ``--sleep``: the time spent waiting for a pooled connection;
* 503: answers "all database connections are busy" (pool_timeout reached);
* backends: the most server connections of the worker seen at once in
  pg_stat_activity (sampled every 20 ms).

``--more-clients`` adds gevent-only cells with more clients, to show that the
backends stay at the pool size whatever the number of clients.

The target (the issue's): under gevent, backends <= pool size for any number
of clients, p99 within 1.2x of gthread's for the same pool, no 503 while the
pool can serve within pool_timeout. The database is a throwaway cluster;
the servers come from the servers' venv (``.ci/install-servers.sh``).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import psycopg2

from wsgi_pgconn.tooling.bench import servers
from wsgi_pgconn.tooling.tempdb import TemporaryCluster

APP = '''
import os
from wsgi_pgconn import PgConnMiddleware, get_connection
if os.environ.get("APP_PATCH_PSYCOPG2") == "1":
    try:
        from wsgi_pgconn.green import patch_psycopg2
    except ImportError:  # an older wsgi_pgconn (--package): psycogreen's callback
        from psycogreen.gevent import patch_psycopg as patch_psycopg2
    patch_psycopg2()
SLEEP = float(os.environ["APP_SLEEP"])
def app(environ, start_response):
    if environ["PATH_INFO"] == "/health":
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]
    with get_connection(environ).cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", (SLEEP,))
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
application = PgConnMiddleware(app, exempt_paths="/health")
'''


def run_cell(
    tree: str, dsn: str, driver: str, kind: str, clients: int, args: argparse.Namespace
) -> dict[str, Any]:
    app_name = f"bench-{kind}-{clients}"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("WSGI_PGCONN_", "DATABASE_URL"))
    }
    env.update(
        DATABASE_URL=f"{dsn} application_name={app_name}",
        WSGI_PGCONN_DRIVER=driver,
        WSGI_PGCONN_SCOPE="pool",
        WSGI_PGCONN_POOL_SIZE=str(args.pool),
        WSGI_PGCONN_POOL_TIMEOUT="5",
        APP_SLEEP=str(args.sleep),
        APP_PATCH_PSYCOPG2="1" if driver == "psycopg2" and kind == "gevent" else "0",
    )
    if kind == "gevent":
        server = servers.gunicorn_server(
            "slowapp:application",
            workers=1,
            worker_class="gevent",
            python_path=[tree],
            env=env,
            extra_args=["--worker-connections", str(max(100, clients * 2))],
            name="bench-gevent",
        )
    else:
        server = servers.gunicorn_server(
            "slowapp:application",
            workers=1,
            threads=clients,
            worker_class="gthread",
            python_path=[tree],
            env=env,
            name="bench-gthread",
        )
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    most = 0
    probe = psycopg2.connect(dsn, application_name="bench-probe")
    probe.autocommit = True
    try:
        server.start(ready_path="/health", ready_status=200, timeout=60)
        end = time.monotonic() + args.seconds
        done = threading.Event()

        def client() -> None:
            while time.monotonic() < end:
                start = time.monotonic()
                try:
                    status, _, _ = servers.http_get(server.port, "/", timeout=30)
                except (OSError, http.client.HTTPException):
                    status = 0
                with lock:
                    latencies.append(time.monotonic() - start)
                    statuses[status] = statuses.get(status, 0) + 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        with probe.cursor() as cur:
            while not done.is_set():
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (app_name,),
                )
                most = max(most, cur.fetchone()[0])
                if not any(t.is_alive() for t in threads):
                    done.set()
                time.sleep(0.02)  # sampling interval
        for t in threads:
            t.join()
    finally:
        server.cleanup()
        probe.close()
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))]

    return {
        "kind": kind,
        "clients": clients,
        "requests": len(ordered),
        "p50": statistics.median(ordered),
        "p99": pct(0.99),
        "max": ordered[-1],
        "503": statuses.get(503, 0),
        "other": sum(n for s, n in statuses.items() if s not in (200, 503)),
        "backends": most,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=0.2)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--drivers", default="psycopg2,psycopg")
    parser.add_argument("--more-clients", default="50,100")
    parser.add_argument(
        "--package",
        default=servers.package_dir(),
        help="the wsgi_pgconn package folder the servers run (default: this one)",
    )
    args = parser.parse_args()
    if servers.gunicorn_python() is None or not servers.python_has(
        servers.gunicorn_python(), "gevent"
    ):
        print(f"gunicorn with gevent not found: run {servers.INSTALL_HINT}", file=sys.stderr)
        return 2
    more = [int(n) for n in args.more_clients.split(",") if n.strip()]
    stage_dir = tempfile.mkdtemp(prefix="green-bench-")
    with open(os.path.join(stage_dir, "slowapp.py"), "w") as f:
        f.write(APP)
    tree = servers.stage([args.package, os.path.join(stage_dir, "slowapp.py")])
    shutil.rmtree(stage_dir)
    print(
        f"# pg_sleep({args.sleep}) per request, pool of {args.pool}, 1 gunicorn worker, "
        f"{args.seconds:g} s per cell, {args.rounds} rounds (medians), fresh TCP per request"
    )
    try:
        with TemporaryCluster() as pg:
            dsn = pg.dsn()
            for driver in args.drivers.split(","):
                cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
                plan = [("gevent", args.clients), ("gthread", args.clients)]
                for r in range(args.rounds):
                    for kind, clients in plan if r % 2 == 0 else reversed(plan):
                        cells.setdefault((kind, clients), []).append(
                            run_cell(tree, dsn, driver, kind, clients, args)
                        )
                for clients in more:
                    cells[("gevent", clients)] = [
                        run_cell(tree, dsn, driver, "gevent", clients, args)
                    ]
                print(f"\n## {driver}")
                print(
                    "| worker | clients | requests | p50 s | p99 s | wait p99 s | max s "
                    "| 503 | other | backends |"
                )
                print("|---|---|---|---|---|---|---|---|---|---|")
                for (kind, clients), runs in cells.items():
                    med = {
                        key: statistics.median(run[key] for run in runs)
                        for key in ("requests", "p50", "p99", "max", "503", "other", "backends")
                    }
                    print(
                        f"| {kind} | {clients} | {med['requests']:.0f} | {med['p50']:.3f} "
                        f"| {med['p99']:.3f} | {med['p99'] - args.sleep:.3f} | {med['max']:.3f} "
                        f"| {med['503']:.0f} | {med['other']:.0f} | {med['backends']:.0f} |"
                    )
                gevent = statistics.median(r["p99"] for r in cells[("gevent", args.clients)])
                gthread = statistics.median(r["p99"] for r in cells[("gthread", args.clients)])
                print(f"\ngevent p99 / gthread p99 = {gevent / gthread:.2f} (target <= 1.2)")
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
