"""How accurate the latency relay is, and what it costs: ``SELECT 1`` direct and through it.

Usage::

    python benchmarks/relay_check.py [--rtt 0,0.5ms,1ms] [--queries 2000] [--rounds 3]
                                     [--clients 1] [--drivers psycopg2,psycopg]

For every driver installed, runs ``--queries`` ``SELECT 1`` on an open
connection (autocommit: one round trip each) from each of ``--clients``
threads, straight to PostgreSQL and through the relay
(:mod:`wsgi_pgconn.tooling.relay`, as a subprocess, as the benchmark runs it)
at each ``--rtt``. Rounds alternate the cells, the order reversed every other
round, and the table shows medians over rounds:

* p50 / p99: the latency of one query seen by the client, µs;
* added: p50 through the relay minus p50 direct: with an accurate relay,
  the rtt plus the cost of one more hop (the 0 row shows that cost);
* error: added minus rtt minus that hop;
* relay CPU: µs per turn, and the share of one core it used meanwhile;
* sent - due: when the relay passed data on, against when it was due (µs,
  p50 and p99; negative is early).

The database: DATABASE_URL if set; otherwise a throwaway cluster.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from wsgi_pgconn import drivers
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from wsgi_pgconn import drivers

from wsgi_pgconn.tooling.relay import RelayProcess, RelayStats, parse_duration


@contextmanager
def database() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL", "").strip()
    if url:
        yield url
        return
    from wsgi_pgconn.tempdb import TemporaryCluster

    with TemporaryCluster() as cluster:
        yield cluster.dsn()


def latencies(driver: str, dsn: str, queries: int, clients: int) -> list[float]:
    """Seconds per ``SELECT 1``, from ``clients`` threads with a connection each."""
    module = importlib.import_module(driver)
    conns = []
    for _ in range(clients):
        conn = module.connect(dsn)
        conn.autocommit = True
        conns.append(conn)
    results: list[list[float]] = [[] for _ in conns]
    start = threading.Barrier(len(conns))

    def run(conn: Any, out: list[float]) -> None:
        cur = conn.cursor()
        for _ in range(50):  # warm up (and past psycopg's prepare threshold)
            cur.execute("SELECT 1")
            cur.fetchone()
        start.wait()
        clock = time.perf_counter
        for _ in range(queries):
            t0 = clock()
            cur.execute("SELECT 1")
            cur.fetchone()
            out.append(clock() - t0)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(conns, results, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for conn in conns:
        conn.close()
    return [t for out in results for t in out]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rtt", default="0,0.5ms,1ms", help="comma-separated list")
    parser.add_argument("--queries", type=int, default=2000, help="per client and cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="threads, a connection each")
    parser.add_argument("--drivers", default=",".join(drivers.installed()))
    args = parser.parse_args(argv)
    rtts = [parse_duration(r) for r in args.rtt.split(",") if r.strip()]
    names = [d.strip() for d in args.drivers.split(",") if d.strip()]
    cells: list[tuple[str, float | None]] = [(d, r) for d in names for r in [None, *rtts]]
    p50: dict[tuple[str, float | None], list[float]] = {cell: [] for cell in cells}
    p99: dict[tuple[str, float | None], list[float]] = {cell: [] for cell in cells}
    relay_stats: dict[tuple[str, float | None], list[RelayStats]] = {cell: [] for cell in cells}

    with database() as dsn:
        params = drivers.parse_conninfo(dsn, names[0])
        target = (params.get("host") or "127.0.0.1", int(params.get("port") or 5432))
        for rnd in range(args.rounds):
            for driver, rtt in cells if rnd % 2 == 0 else cells[::-1]:
                load = drivers.load(driver)
                if rtt is None:
                    times = latencies(driver, dsn, args.queries, args.clients)
                else:
                    relay = RelayProcess(target, rtt=rtt)
                    try:
                        relayed = load.make_conninfo(dsn, host="127.0.0.1", port=str(relay.port))
                        before = relay.stats()
                        times = latencies(driver, relayed, args.queries, args.clients)
                        relay_stats[(driver, rtt)].append(relay.stats().since(before))
                    finally:
                        relay.close()
                p50[(driver, rtt)].append(percentile(times, 0.5) * 1e6)
                p99[(driver, rtt)].append(percentile(times, 0.99) * 1e6)
                print(
                    f"round {rnd + 1}: {driver:<9} "
                    f"{'direct' if rtt is None else f'rtt {rtt * 1e3:g} ms':<12}"
                    f" p50 {p50[(driver, rtt)][-1]:8.1f} µs",
                    file=sys.stderr,
                    flush=True,
                )

    print(
        f"SELECT 1, {args.clients} client(s) x {args.queries} queries per cell, "
        f"medians of {args.rounds} rounds; {os.cpu_count()} CPUs"
    )
    header = (
        f"{'driver':<9} {'path':<13} {'p50 µs':>8} {'p99 µs':>8} {'added µs':>9} {'error µs':>9}"
        f" {'relay CPU µs/turn':>18} {'% core':>7} {'sent-due p50/p99 µs':>20}"
    )
    print(header)
    print("-" * len(header))
    for driver in names:
        direct = statistics.median(p50[(driver, None)])
        hop = None
        for rtt in [None, *rtts]:
            cell = (driver, rtt)
            median50 = statistics.median(p50[cell])
            median99 = statistics.median(p99[cell])
            line = f"{driver:<9} {'direct' if rtt is None else f'relay {rtt * 1e3:g} ms':<13}"
            line += f" {median50:>8.1f} {median99:>8.1f}"
            if rtt is not None:
                added = median50 - direct
                if rtt == 0:
                    hop = added
                error = added - rtt * 1e6 - (hop or 0.0)
                stats = relay_stats[cell]
                cpu = statistics.median(s.cpu_us_per_turn for s in stats)
                share = statistics.median(s.cpu_share for s in stats) * 100
                late = (
                    f"{statistics.median(s.late_percentile(0.5) for s in stats):.0f}/"
                    f"{statistics.median(s.late_percentile(0.99) for s in stats):.0f}"
                    if rtt
                    else "-"
                )
                line += f" {added:>9.1f} {error if rtt else 0.0:>9.1f} {cpu:>18.1f}"
                line += f" {share:>7.1f} {late:>20}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
