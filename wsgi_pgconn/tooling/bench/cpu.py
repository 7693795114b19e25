"""``python -m wsgi_pgconn.tooling.bench.cpu``: CPU and round trips per request, in process.

No server, no HTTP: each variant's WSGI application (the benchmark's own
modules, :mod:`wsgi_pgconn.tooling.bench.apps` and
:mod:`wsgi_pgconn.tooling.bench.django_app`) is imported in a fresh Python
process and called many times in one thread against a throwaway PostgreSQL
cluster (or ``DATABASE_URL`` with ``--use-database-url``). Each child
reports, per batch of ``--requests`` calls, the CPU time of the process
(``time.process_time``: user + system, the libpq socket calls included; the
server's own CPU is not in it) and the wall time (``time.perf_counter``,
which also holds the server's time to answer) per request. Children of the
variants alternate, the order reversed every other round, so that a busy
spell of a shared machine hits them alike; the table shows the best and the
median batch.

Round trips are counted by the server: one more child per variant runs with
``log_statement = all`` for its own session and the statements it sent are
read back from the server log, for the first request (connection setup
included) and per request after it.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import wsgi_pgconn
from wsgi_pgconn.tooling.bench.variants import BY_NAME

DEFAULT_VARIANTS = (
    "handheld",
    "pgconn-thread",
    "django-maxage",
    "django-health",
    "django-maxage-atomic",
    "django-pgconn",
)
LOG_PREFIX = "%m [%p] %a: "
STATEMENT_MARK = "LOG:  statement: "


def _environ() -> dict[str, Any]:
    """A GET / as a threaded WSGI server (mod_wsgi daemon mode) would hand it over."""
    return {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "HTTP_HOST": "127.0.0.1:8000",
        "HTTP_USER_AGENT": "wsgi_pgconn.tooling.bench.cpu",
        "HTTP_ACCEPT": "*/*",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    if status[:1] != "2":
        raise RuntimeError(f"the page answered {status}")
    return None


def _request(app: Any, template: dict[str, Any]) -> None:
    environ = dict(template)
    body: Iterable[bytes] = app(environ, _start_response)
    try:
        for _chunk in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def child(variant_name: str, dsn: str, requests: int, batches: int, warmup: int) -> int:
    """Import the variant's application, call it; print one JSON line of µs per request."""
    variant = BY_NAME[variant_name]
    os.environ.update(variant.env)
    os.environ["WSGI_PGCONN_BENCH_DSN"] = dsn
    os.environ["WSGI_PGCONN_BENCH_POOL_SIZE"] = "4"
    app = importlib.import_module(variant.module).application
    template = _environ()
    for _ in range(warmup):
        _request(app, template)
    cpu: list[float] = []
    sys_: list[float] = []
    wall: list[float] = []
    for _ in range(batches):
        t0, c0, w0 = os.times(), time.process_time(), time.perf_counter()
        for _ in range(requests):
            _request(app, template)
        t1, c1, w1 = os.times(), time.process_time(), time.perf_counter()
        cpu.append((c1 - c0) / requests * 1e6)
        sys_.append((t1.system - t0.system) / requests * 1e6)
        wall.append((w1 - w0) / requests * 1e6)
    result = {"variant": variant_name, "cpu_us": cpu, "sys_us": sys_, "wall_us": wall}
    print(json.dumps(result), flush=True)
    return 0


def _run_child(variant: str, dsn: str, requests: int, batches: int, warmup: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_package_parent(), env.get("PYTHONPATH", "")) if p
    )
    argv = [
        sys.executable,
        "-m",
        "wsgi_pgconn.tooling.bench.cpu",
        "--child",
        variant,
        "--dsn",
        dsn,
        "--requests",
        str(requests),
        "--batches",
        str(batches),
        "--warmup",
        str(warmup),
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stdout}{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _package_parent() -> str:
    """The folder that holds the wsgi_pgconn package being run."""
    return os.path.dirname(os.path.dirname(os.path.abspath(wsgi_pgconn.__file__)))


def _statements(log: str, application_name: str) -> list[str]:
    tag = f" {application_name}: {STATEMENT_MARK}"
    return [line.split(tag, 1)[1].strip() for line in log.splitlines() if tag in line]


def count_round_trips(cluster: Any, dsn: str, variant: str, requests: int) -> dict[str, Any]:
    """Statements the server received from ``variant``: first request, then per request."""
    from wsgi_pgconn.tooling.bench.database import with_params

    counts = []
    tails: list[str] = []
    for n in (1, 1 + requests):
        name = f"cpu_{variant.replace('-', '_')}_{n}"
        logged = with_params(dsn, application_name=name, options="-c log_statement=all")
        _run_child(variant, logged, n, 1, 0)
        statements = _statements(cluster.read_log(), name)
        counts.append(len(statements))
        tails = statements
    per_request = (counts[1] - counts[0]) / requests
    per = round(per_request)
    return {
        "first": counts[0],
        "per_request": per_request,
        "last_request": tails[-per:] if per > 0 else [],
    }


def parent(args: argparse.Namespace) -> int:
    from wsgi_pgconn.tooling.bench.database import open_database, with_params

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {n: {"cpu": [], "wall": []} for n in names}
    trips: dict[str, dict[str, Any]] = {}

    def log(message: str) -> None:
        print("cpu: " + message, file=sys.stderr, flush=True)

    with open_database(
        log, settings={"log_line_prefix": LOG_PREFIX}, use_database_url=args.use_database_url
    ) as db:
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                dsn = with_params(db.app_dsn, application_name="cpu_" + name.replace("-", "_"))
                out = _run_child(name, dsn, args.requests, args.batches, args.warmup)
                results[name]["cpu"] += out["cpu_us"]
                results[name]["wall"] += out["wall_us"]
                log(
                    f"round {rnd + 1}: {name:<21} cpu {min(out['cpu_us']):7.1f} µs"
                    f"  wall {min(out['wall_us']):7.1f} µs"
                )
        if db.cluster is not None and not args.no_round_trips:
            for name in names:
                trips[name] = count_round_trips(db.cluster, db.app_dsn, name, 20)
    print(format_results(names, results, trips, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "round_trips": trips}, f, indent=2)
    return 0


def format_results(
    names: Sequence[str],
    results: dict[str, dict[str, list[float]]],
    trips: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    lines = [
        f"µs per request in one thread; {args.rounds} rounds x {args.batches} batches x "
        f"{args.requests} requests per variant (best / median batch)",
        f"{'variant':<22}{'cpu best':>10}{'cpu med':>10}{'wall best':>11}{'wall med':>10}"
        f"{'trips 1st':>11}{'trips/req':>11}",
    ]
    for name in names:
        cpu, wall = results[name]["cpu"], results[name]["wall"]
        trip = trips.get(name)
        lines.append(
            f"{name:<22}{min(cpu):10.1f}{statistics.median(cpu):10.1f}"
            f"{min(wall):11.1f}{statistics.median(wall):10.1f}"
            + (f"{trip['first']:11d}{trip['per_request']:11.2f}" if trip else "")
        )
    for name in names:
        trip = trips.get(name)
        if trip:
            lines.append(f"{name}: one request sends: " + "; ".join(trip["last_request"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn.tooling.bench.cpu", description=__doc__
    )
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch")
    parser.add_argument("--batches", type=int, default=5, help="batches per child")
    parser.add_argument("--rounds", type=int, default=3, help="children per variant")
    parser.add_argument("--warmup", type=int, default=200, help="requests before timing")
    parser.add_argument("--no-round-trips", action="store_true")
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help="use the database named by DATABASE_URL (else a set DATABASE_URL is refused)",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.dsn, args.requests, args.batches, args.warmup)
    from wsgi_pgconn.tooling.bench.database import DatabaseRefused

    try:
        return parent(args)
    except DatabaseRefused as exc:
        print(f"cpu: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
