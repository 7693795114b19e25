"""Soak test: many requests through PgConnMiddleware, faults at random, and a ledger.

Usage::

    python scripts/soak.py                      # 100,000 requests (a few minutes)
    python scripts/soak.py --requests 20000     # a shorter run
    python scripts/soak.py --scope pool --pool-size 3 --seed 7

Options: ``--requests N`` (default 100000), ``--clients N`` client threads (8),
``--workers N`` server worker threads (4), ``--scope thread|pool`` (thread),
``--pool-size N`` (4), ``--fault-every N`` mean answered requests between two
faults (250), ``--stream-percent P`` requests that stream and are reset by the
client mid-body (2), ``--retry-after-ms MS`` how long a client pauses after a
503 (50), ``--seed N``, ``--time-limit SECONDS`` (3600), ``--dsn DSN`` to use
an existing server (superuser; no restarts then).

It starts a throwaway PostgreSQL cluster (``wsgi_pgconn.tooling.tempdb``; needs the
server binaries, see docs/testing.md), serves ``PgConnMiddleware`` on the fault
tests' fixed-pool WSGI server (``tests/faults/_faultkit.py``, 127.0.0.1, a free
port in ``WSGI_PGCONN_PORT_RANGE``, 20000-29999 unless set) and drives it with
client threads. Every request writes one uniquely keyed row (``/write``), or
streams and writes while streaming (``/stream``, then the client resets the
connection). Every ``--fault-every`` answers (on average) one fault is
injected at random:

* ``terminate`` (weight 6): ``pg_terminate_backend`` on a random backend of the
  application (idle or busy), waiting until it is gone;
* ``restart-fast`` / ``restart-immediate`` (weight 1 each): ``pg_ctl restart``.

The ledger connections use ``synchronous_commit=on``, so an acknowledged
COMMIT survives an immediate shutdown. At the end it checks and prints:

* ledger: each 2xx has its row exactly once (``lost``, ``duplicated``), each
  5xx or reset request has none (``phantom``), except a 500 saying its COMMIT
  is in doubt (the connection died between COMMIT and its answer, e.g. an
  immediate shutdown): those are counted (``in_doubt_commits``) with how many
  did commit (``in_doubt_that_committed``);
* ``stale``: requests handed a connection whose backend had been terminated
  before the request entered the middleware;
* ``failed_when_quiet``: requests that failed although they entered after the
  last fault had ended and finished before the next one began;
* no connection idle in a transaction, no backend left after closing.

Exit status 0 when all of these are zero, 1 otherwise.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import logging
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "faults")]

import _faultkit as kit  # noqa: E402
import psycopg2.extensions  # noqa: E402

from wsgi_pgconn import PgConnMiddleware  # noqa: E402
from wsgi_pgconn.tooling.tempdb import TemporaryCluster  # noqa: E402

DB = "wsgi_pgconn_soak"
APP_NAME = "wsgi_pgconn_soak"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--scope", choices=("thread", "pool"), default="thread")
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--fault-every", type=int, default=250)
    parser.add_argument("--stream-percent", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--time-limit", type=float, default=3600)
    parser.add_argument("--retry-after-ms", type=float, default=50)
    parser.add_argument("--dsn", help="existing server (superuser DSN); disables restarts")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)  # noqa: S311 - not for secrets
    rng = random.Random(seed)  # noqa: S311 - reproducible fault schedule
    kit.RECORD_RESPONSES = False
    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s %(message)s")
    # Failed requests and COMMITs are expected here; they are counted, not logged.
    logging.getLogger("faults.server").setLevel(logging.CRITICAL)
    logging.getLogger("wsgi_pgconn").setLevel(logging.CRITICAL)

    cluster = None
    if args.dsn:
        base_dsn = args.dsn
    else:
        cluster = TemporaryCluster().start()
        base_dsn = cluster.dsn()
    try:
        return _run(args, rng, seed, cluster, base_dsn)
    finally:
        if cluster is not None:
            cluster.cleanup()


def _run(args: Any, rng: random.Random, seed: int, cluster: Any, base_dsn: str) -> int:
    setup = kit.Admin(base_dsn)
    setup.rows(f"DROP DATABASE IF EXISTS {DB}")
    setup.rows(f"CREATE DATABASE {DB}")
    setup.close()
    make = psycopg2.extensions.make_dsn
    admin = kit.Admin(make(base_dsn, dbname=DB, application_name="soak-admin"))
    table = "ledger"
    admin.rows(
        f"CREATE TABLE {table} (id bigserial PRIMARY KEY, k text NOT NULL, "
        "pid int NOT NULL DEFAULT pg_backend_pid(), pos int NOT NULL DEFAULT 0)"
    )
    app_dsn = make(
        base_dsn, dbname=DB, application_name=APP_NAME, options="-c synchronous_commit=on"
    )
    side = kit.Side()
    mw = PgConnMiddleware(
        kit.ledger_app(table, side),
        dsn=app_dsn,
        scope=args.scope,
        pool_size=args.pool_size,
        connect_timeout=2,
    )
    server = kit.PoolServer(kit.entry_recorder(mw, side), workers=args.workers)
    ledger = kit.Ledger("soak")
    client_rng = random.Random(rng.random())  # noqa: S311
    rng_lock = threading.Lock()
    streaming = {i for i in range(args.requests) if client_rng.random() * 100 < args.stream_percent}

    def perform(i: int) -> kit.Outcome:
        key = f"s{seed}-{i}"
        start = time.monotonic()
        try:
            if i in streaming:
                status, _ = kit.stream_then_reset(
                    server.port,
                    f"/stream?k={key}",
                    before_reset=lambda: kit.deadline_wait(
                        lambda: key in side.inserted or key in side.closed, 10, "the stream"
                    ),
                )
                if status != 200:
                    return kit.Outcome(key, status, start, time.monotonic(), kind="stream")
                return kit.Outcome(key, None, start, time.monotonic(), kind="stream-reset")
            resp = kit.http(server.port, f"/write?k={key}")
            if resp.status == 503:  # a client honouring Retry-After, scaled down
                load.stop_event.wait(args.retry_after_ms / 1000)
            return kit.Outcome(key, resp.status, start, time.monotonic(), resp.body[:200].decode())
        except OSError as exc:
            return kit.Outcome(key, None, start, time.monotonic(), repr(exc))

    faults: list[tuple[str, float, float]] = []  # (kind, began, ended)
    gone: dict[int, float] = {}
    killer = kit.Admin(make(base_dsn, dbname=DB, application_name="soak-killer"))
    weights = [("terminate", 6), ("restart-fast", 1), ("restart-immediate", 1)]
    if cluster is None:
        weights = weights[:1]
    kinds = [kind for kind, weight in weights for _ in range(weight)]
    began = time.monotonic()
    print(
        f"soak: {args.requests} requests, seed {seed}, scope {args.scope}, "
        f"{args.clients} clients, {args.workers} server threads, port {server.port}"
    )
    next_report = args.requests // 10
    with kit.Load(
        server.port,
        ledger,
        perform=perform,
        clients=args.clients,
        max_requests=args.requests,
        time_limit=args.time_limit,
        timeout=60,
    ) as load:
        threshold = 0
        while True:
            with rng_lock:
                threshold += rng.randint(max(1, args.fault_every // 2), args.fault_every * 3 // 2)
            try:
                target = min(threshold, args.requests)
                ledger.wait_for(
                    lambda target=target: len(ledger.outcomes) >= target or load.done,
                    args.time_limit,
                    "progress",
                )
            except AssertionError:
                break
            answered = len(ledger.outcomes)
            if answered >= args.requests or load.done:
                break
            while answered >= next_report:
                print(
                    f"  {answered} answered, {len(faults)} faults, {time.monotonic() - began:.0f}s",
                    flush=True,
                )
                next_report += args.requests // 10
            kind = rng.choice(kinds)
            start = time.monotonic()
            try:
                if kind == "terminate":
                    victims = killer.backends(APP_NAME)
                    if not victims:
                        continue
                    pid, _ = rng.choice(victims)
                    if killer.rows("SELECT pg_terminate_backend(%s, 5000)", pid)[0][0]:
                        gone[pid] = time.monotonic()
                else:
                    cluster.restart(kind.split("-")[1])
            except Exception as exc:  # the fault injector must not end the run
                print(f"  fault {kind} failed: {exc!r}")
            faults.append((kind, start, time.monotonic()))
        load.join(args.time_limit)
    elapsed = time.monotonic() - began
    killer.close()

    report = ledger.check(admin.keys(table))
    outcomes = ledger.snapshot()
    stale = sum(
        1
        for key, pid in side.pids.items()
        if pid in gone and side.entered.get(key, 0.0) > gone[pid]
    )
    starts = [f[1] for f in faults]  # faults run one after another: sorted, disjoint
    ends = [f[2] for f in faults]
    failed_when_quiet = 0
    for o in outcomes:
        if o.kind == "stream-reset" or (o.status is not None and 200 <= o.status < 300):
            continue
        entered = side.entered.get(o.key, o.started)
        i = bisect.bisect_right(starts, entered)  # faults[i - 1] began last before it entered
        after_last = i == 0 or ends[i - 1] < entered
        before_next = i == len(starts) or o.finished < starts[i]
        if after_last and before_next:
            failed_when_quiet += 1
    idle_in_tx = [r for r in admin.idle_in_transaction() if r[1] == APP_NAME]
    stats = mw.stats()
    server.close()
    mw.close()
    try:
        kit.deadline_wait(lambda: not admin.backends(APP_NAME), 15, "backends to go")
        leaked = 0
    except AssertionError:
        leaked = len(admin.backends(APP_NAME))
    admin.close()

    fault_counts = collections.Counter(kind for kind, _, _ in faults)
    totals = {
        "requests": report["requests"],
        "seconds": round(elapsed, 1),
        "requests_per_second": round(report["requests"] / elapsed, 1),
        "ok": report["ok"],
        "errors_5xx": report["errors"],
        "statuses": report["status"],
        "client_resets_mid_stream": sum(1 for o in outcomes if o.kind == "stream-reset"),
        "cut_off_otherwise": sum(
            1 for o in outcomes if o.status is None and o.kind != "stream-reset"
        ),
        "lost": report["lost"],
        "duplicated": report["duplicated"],
        "phantom": report["phantom"],
        "in_doubt_commits": report["in_doubt"],
        "in_doubt_that_committed": report["in_doubt_committed"],
        "unknown_rows": report["unknown_rows"],
        "stale": stale,
        "failed_when_quiet": failed_when_quiet,
        "idle_in_transaction": len(idle_in_tx),
        "leaked_backends": leaked,
        "faults": dict(fault_counts),
        "middleware_stats": stats,
    }
    print(json.dumps(totals, indent=2, default=str))
    by_key = {o.key: o for o in outcomes}
    labels = ("lost_keys", "duplicated_keys", "phantom_keys", "in_doubt_committed_keys")
    for label in labels:
        for key in report[label]:
            o = by_key.get(key)
            if o is None:
                continue
            entered = side.entered.get(key, o.started)
            i = bisect.bisect_right(starts, entered)
            near = [
                f"{faults[j][0]} {faults[j][1] - entered:+.3f}s..{faults[j][2] - entered:+.3f}s"
                for j in (i - 1, i)
                if 0 <= j < len(faults)
            ]
            print(
                f"{label[:-5]}: {key} answered {o.status} after {o.finished - o.started:.3f}s "
                f"({o.detail.strip()[:120]!r}), backend pid {side.pids.get(key)}, "
                f"faults around its entry: {near}"
            )
    bad = [
        k
        for k in (
            "lost",
            "duplicated",
            "phantom",
            "unknown_rows",
            "stale",
            "failed_when_quiet",
            "idle_in_transaction",
            "leaked_backends",
            "cut_off_otherwise",
        )
        if totals[k]
    ]
    print("soak: OK" if not bad else f"soak: FAILED ({', '.join(bad)})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
