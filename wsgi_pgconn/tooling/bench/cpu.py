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

Round trips are counted on the wire: more children per variant run through
a latency relay (:mod:`wsgi_pgconn.tooling.relay`, 2 ms round-trip time, so
that a turn is counted only when the client waited for the answer), which
counts client/server *turns*: for the first request (connection setup
included) and per request once the connection is warm (psycopg 3 prepares a
statement after its fifth execution, at a turn of its own, once per
connection: the warm-up requests take those). It also counts the protocol
messages the client sent per request (``Q`` simple query; ``P``/``B``/``E``/``S``
extended protocol).

Each variant runs on its driver (the ``-pg2``/``-pg3`` of its name, set as
``WSGI_PGCONN_DRIVER`` in its child); a variant without one takes the
``WSGI_PGCONN_DRIVER`` of the caller's environment.
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
    "handheld-pg2",
    "pgconn-thread-pg2",
    "django-maxage-pg2",
    "django-maxage-atomic-pg2",
    "django-pgconn-pg2",
    "handheld-pg3",
    "pgconn-thread-pg3",
    "django-maxage-pg3",
    "django-maxage-atomic-pg3",
    "django-pgconn-pg3",
)
#: The relay's round-trip time while counting: long enough that an answer never
#: overtakes what the client is still writing (see tests/test_round_trips.py).
COUNTING_RTT = 0.002
#: Requests before the turns per request are counted (connection set-up, prepared statements).
COUNTING_WARMUP = 10


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


def _page(app: Any, template: dict[str, Any]) -> bytes:
    """One request; returns the body."""
    environ = dict(template)
    body: Iterable[bytes] = app(environ, _start_response)
    try:
        return b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


def child(variant_name: str, dsn: str, requests: int, batches: int, warmup: int) -> int:
    """Import the variant's application, call it; print one JSON line of µs per request."""
    variant = BY_NAME[variant_name]
    os.environ.update(variant.env)
    if variant.driver:
        os.environ["WSGI_PGCONN_DRIVER"] = variant.driver
    os.environ["WSGI_PGCONN_BENCH_DSN"] = dsn
    os.environ["WSGI_PGCONN_BENCH_POOL_SIZE"] = "4"
    app = importlib.import_module(variant.module).application
    from wsgi_pgconn.tooling.bench.apps import DRIVER_IN_PAGE  # after: it keeps a driver out

    template = _environ()
    # The first request (of the warm-up) checks the page's driver.
    match = DRIVER_IN_PAGE.search(_page(app, template))
    driver = match.group(1).decode("ascii") if match else None
    if variant.driver and driver != variant.driver:
        raise RuntimeError(f"{variant_name} was served by {driver}, not {variant.driver}")
    for _ in range(warmup - 1):
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
    result = {
        "variant": variant_name,
        "driver": driver,
        "cpu_us": cpu,
        "sys_us": sys_,
        "wall_us": wall,
    }
    print(json.dumps(result), flush=True)
    return 0


def _run_child(variant: str, dsn: str, requests: int, batches: int, warmup: int) -> dict[str, Any]:
    # The caller's WSGI_PGCONN_DRIVER reaches a variant that has no driver of its own.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WSGI_PGCONN_") or k == "WSGI_PGCONN_DRIVER"
    }
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


def count_round_trips(target: tuple[str, int] | str, dsn: str, variant: str) -> dict[str, Any]:
    """Turns ``variant`` makes through a relay: its first request, then per warm request.

    ``target`` is the database's address (the relay connects there), ``dsn``
    how the child would reach it directly. Each count is a child of its own:
    1 request, :data:`COUNTING_WARMUP` requests, and that plus 20; turns per
    request are the difference of the last two over 20.
    """
    from wsgi_pgconn.tooling.bench.database import with_params
    from wsgi_pgconn.tooling.relay import Relay

    extra = 20
    turns: list[int] = []
    sent: dict[str, int] = {}
    with Relay(target, rtt=COUNTING_RTT, handshake=False) as relay:
        relayed = with_params(
            dsn,
            host=relay.host,
            port=str(relay.port),
            application_name=f"cpu_{variant.replace('-', '_')}",
        )
        for n in (1, COUNTING_WARMUP, COUNTING_WARMUP + extra):
            before = relay.stats()
            _run_child(variant, relayed, 0, 0, n)  # n requests: the warm-up only
            done = relay.stats().since(before)
            turns.append(done.turns)
            if n > 1:
                for kind, count in done.to_server.types.items():
                    sent[kind] = sent.get(kind, 0) + count * (1 if n > COUNTING_WARMUP else -1)
    return {
        "first": turns[0],
        "per_request": (turns[2] - turns[1]) / extra,
        "messages_per_request": {k: v / extra for k, v in sorted(sent.items()) if v},
    }


def parent(args: argparse.Namespace) -> int:
    from wsgi_pgconn.tooling.bench.database import open_database, server_address, with_params
    from wsgi_pgconn.tooling.bench.runner import select_variants

    names, unknown = select_variants(args.variants)
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {n: {"cpu": [], "wall": []} for n in names}
    trips: dict[str, dict[str, Any]] = {}

    def log(message: str) -> None:
        print("cpu: " + message, file=sys.stderr, flush=True)

    with open_database(log, use_database_url=args.use_database_url) as db:
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                dsn = with_params(db.app_dsn, application_name="cpu_" + name.replace("-", "_"))
                out = _run_child(name, dsn, args.requests, args.batches, args.warmup)
                results[name]["cpu"] += out["cpu_us"]
                results[name]["wall"] += out["wall_us"]
                results[name]["driver"] = out["driver"]
                log(
                    f"round {rnd + 1}: {name:<21} cpu {min(out['cpu_us']):7.1f} µs"
                    f"  wall {min(out['wall_us']):7.1f} µs"
                )
        if not args.no_round_trips:
            target = server_address(db.app_dsn)
            for name in names:
                trips[name] = count_round_trips(target, db.app_dsn, name)
                log(f"{name}: {trips[name]['per_request']:.2f} round trips per request")
    print(format_results(names, results, trips, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"results": results, "round_trips": trips}, f, indent=2)
    return 0


def format_results(
    names: Sequence[str],
    results: dict[str, dict[str, Any]],
    trips: dict[str, dict[str, Any]],
    args: argparse.Namespace,
) -> str:
    width = max(len("variant"), *(len(n) for n in names)) + 2
    lines = [
        f"µs per request in one thread; {args.rounds} rounds x {args.batches} batches x "
        f"{args.requests} requests per variant (best / median batch); round trips counted "
        "by a relay",
        f"{'variant':<{width}}{'driver':<10}{'cpu best':>10}{'cpu med':>10}{'wall best':>11}"
        f"{'wall med':>10}{'trips 1st':>11}{'trips/req':>11}",
    ]
    for name in names:
        cpu, wall = results[name]["cpu"], results[name]["wall"]
        trip = trips.get(name)
        lines.append(
            f"{name:<{width}}{results[name].get('driver') or '?':<10}"
            f"{min(cpu):10.1f}{statistics.median(cpu):10.1f}"
            f"{min(wall):11.1f}{statistics.median(wall):10.1f}"
            + (f"{trip['first']:11d}{trip['per_request']:11.2f}" if trip else "")
        )
    if trips:
        lines += [
            "",
            "trips 1st: turns of the first request (connecting included); trips/req: per request",
            "once warm. Protocol messages the client sends per warm request (Q simple query;",
            "P/B/E/S parse/bind/execute/sync; D describe; X terminate):",
        ]
        for name in names:
            trip = trips.get(name)
            if trip:
                sent = ", ".join(
                    f"{kind} {count:g}" for kind, count in trip["messages_per_request"].items()
                )
                lines.append(f"  {name:<{width}}{sent}")
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
