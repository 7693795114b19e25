"""``python -m wsgi_pgconn.bench``: serve the page once per variant, load it, print one table."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from wsgi_pgconn.tooling.bench import environment as envinfo
from wsgi_pgconn.tooling.bench import load as loadgen
from wsgi_pgconn.tooling.bench import servers
from wsgi_pgconn.tooling.bench.database import DatabaseRefused
from wsgi_pgconn.tooling.bench.variants import (
    BASELINE,
    BY_NAME,
    UPPER_BOUND,
    VARIANTS,
    Variant,
    package_has,
)

if TYPE_CHECKING:
    from wsgi_pgconn.tooling.bench.database import BenchDatabase
    from wsgi_pgconn.tooling.bench.pgbouncer import PgBouncer

WERKZEUG_NOTE = (
    "werkzeug's threaded server starts a new thread for every request, so per-thread "
    "connections (wsgi_pgconn scope=thread, hand-held, Django) last one request there"
)


def log(message: str) -> None:
    print("bench: " + message, file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """What the runs of one variant measured."""

    variant: str
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    conns: list[int] = field(default_factory=list)
    errors: int = 0
    skipped: str | None = None
    failed: str | None = None

    @staticmethod
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def spread(self) -> tuple[float, float] | None:
        """(min, max) of requests/s over the repeats; None with fewer than two runs."""
        return (min(self.rps), max(self.rps)) if len(self.rps) >= 2 else None

    def within_spread_of(self, other: Outcome) -> bool:
        """True when the two variants' min-max ranges overlap: their difference is noise."""
        mine, theirs = self.spread(), other.spread()
        if mine is None or theirs is None or other is self:
            return False
        return mine[0] <= theirs[1] and theirs[0] <= mine[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "label": BY_NAME[self.variant].label,
            "rps": self.median(self.rps),
            "rps_min": min(self.rps) if self.rps else None,
            "rps_max": max(self.rps) if self.rps else None,
            "p50_ms": self.median(self.p50),
            "p99_ms": self.median(self.p99),
            "server_connections": max(self.conns) if self.conns else None,
            "runs": {
                "rps": self.rps,
                "p50_ms": self.p50,
                "p99_ms": self.p99,
                "server_connections": self.conns,
            },
            "errors": self.errors,
            "skipped": self.skipped,
            "failed": self.failed,
        }


class Sampler(threading.Thread):
    """Counts the server connections every ``interval`` seconds; keeps the maximum."""

    def __init__(self, db: BenchDatabase, application_name: str, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.application_name = application_name
        self.interval = interval
        self.maximum = 0
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                self.maximum = max(self.maximum, self.db.server_connections(self.application_name))
            except Exception as exc:
                self.error = exc
                return
            self._done.wait(self.interval)

    def finish(self) -> None:
        self._done.set()
        self.join()


def choose_server(requested: str) -> tuple[str, str, list[str]]:
    """(kind, the server's python, notes on what was missing) for ``--server``."""
    notes: list[str] = []
    if requested in ("auto", "mod_wsgi"):
        if servers.mod_wsgi_express():
            return "mod_wsgi", servers.venv_python() or sys.executable, notes
        if requested == "mod_wsgi":
            raise SystemExit(f"bench: mod_wsgi-express not found: run {servers.INSTALL_HINT}")
        notes.append(f"mod_wsgi-express not found ({servers.INSTALL_HINT})")
    if requested in ("auto", "gunicorn"):
        python = servers.gunicorn_python()
        if python:
            return "gunicorn", python, notes
        if requested == "gunicorn":
            raise SystemExit(f"bench: gunicorn not found: run {servers.INSTALL_HINT}")
        notes.append(f"gunicorn not found ({servers.INSTALL_HINT})")
    return "werkzeug", sys.executable, notes


def describe_server(kind: str, processes: int, threads: int) -> str:
    if kind == "mod_wsgi":
        return f"mod_wsgi-express daemon mode, {processes} processes x {threads} threads"
    if kind == "gunicorn":
        return f"gunicorn gthread, {processes} workers x {threads} threads"
    return "werkzeug threaded development server (1 process, a thread per request)"


class Bench:
    """One benchmark run: every variant, ``--repeat`` times."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server_kind, self.server_python, self.server_notes = choose_server(args.server)
        if args.load == "wrk" and not loadgen.wrk_path():
            raise SystemExit(f"bench: wrk not found: {loadgen.WRK_INSTALL}")
        use_wrk = args.load == "wrk" or (args.load == "auto" and loadgen.wrk_path())
        self.load_tool = "wrk" if use_wrk else "python"
        self.connections: int = args.connections or args.processes * args.threads
        self._db: BenchDatabase | None = None
        self.stage = ""
        self.bouncer: PgBouncer | None = None
        self._has_module: dict[str, bool] = {}
        self.environment: envinfo.Environment | None = None

    @property
    def db(self) -> BenchDatabase:
        assert self._db is not None
        return self._db

    # -- what can run ------------------------------------------------------------

    def server_has(self, module: str) -> bool:
        if module not in self._has_module:
            self._has_module[module] = servers.python_has(self.server_python, module)
        return self._has_module[module]

    def skip_reason(self, variant: Variant) -> str | None:
        for module in variant.needs_package:
            if not package_has(module):
                return f"{module} does not exist yet"
        for module in variant.needs:
            if not self.server_has(module):
                if self.server_python == servers.venv_python():
                    venv = servers.server_venv()
                    return f"{venv}/bin/pip install {module} (or {servers.INSTALL_HINT})"
                return f"pip install {module}"
        if variant.threads == 1 and self.server_kind == "werkzeug":
            return "needs one thread per process; werkzeug's server starts a thread per request"
        if variant.name.startswith("connect") and variant.dsn == "tcp" and not self.db.tcp_dsn:
            return "needs a TCP DATABASE_URL with a password (or unset DATABASE_URL)"
        if variant.dsn == "unix" and not self.db.unix_dsn:
            return (
                "needs a unix-socket connection (unset DATABASE_URL to use the throwaway cluster)"
            )
        if variant.dsn == "pgbouncer":
            from wsgi_pgconn.tooling.bench.pgbouncer import INSTALL_HINT, pgbouncer_path

            if not pgbouncer_path():
                return INSTALL_HINT
        return None

    # -- one measurement -----------------------------------------------------------

    def variant_dsn(self, variant: Variant, application_name: str) -> str:
        from wsgi_pgconn.tooling.bench.database import with_params

        if variant.dsn == "pgbouncer":
            assert self.bouncer is not None
            return self.bouncer.dsn()
        if variant.dsn == "unix":
            base = self.db.unix_dsn
        elif variant.name.startswith("connect"):
            base = self.db.tcp_dsn
        else:
            base = self.db.app_dsn
        assert base is not None
        return with_params(base, application_name=application_name)

    def make_server(self, variant: Variant, application_name: str) -> servers.Server:
        threads = variant.threads or self.args.threads
        env = {
            key: value
            for key, value in os.environ.items()
            if key != "DATABASE_URL" and not key.startswith("WSGI_PGCONN_")
        }
        env.update(variant.env)
        env["WSGI_PGCONN_BENCH_DSN"] = self.variant_dsn(variant, application_name)
        env["WSGI_PGCONN_BENCH_POOL_SIZE"] = str(self.args.pool_size or threads)
        name = "bench-" + variant.name
        if self.server_kind == "mod_wsgi":
            return servers.mod_wsgi_server(
                variant.module,
                application_type="module",
                processes=self.args.processes,
                threads=threads,
                python_path=[self.stage],
                env=env,
                user=self.db.os_user,
                name=name,
            )
        if self.server_kind == "gunicorn":
            return servers.gunicorn_server(
                variant.module + ":application",
                workers=self.args.processes,
                threads=threads,
                # gthread workers say wsgi.multithread even with one thread
                worker_class="gthread" if threads > 1 else "sync",
                python_path=[self.stage],
                env=env,
                name=name,
            )
        return servers.werkzeug_server(
            variant.module + ":application", python_path=[self.stage], env=env, name=name
        )

    def measure(self, variant: Variant, outcome: Outcome) -> None:
        application_name = "bench_" + variant.name.replace("-", "_")
        server = self.make_server(variant, application_name)
        try:
            try:
                server.start(ready_path="/", ready_status=200, timeout=60)
            except servers.ServerError as exc:
                outcome.failed = str(exc).splitlines()[0]
                log(f"{variant.name} failed to start:\n{exc}")
                return
            url = f"http://127.0.0.1:{server.port}/"
            if self.args.warmup > 0:
                loadgen.run_load(url, self.connections, self.args.warmup, self.load_tool)
            sampler = Sampler(self.db, application_name)
            sampler.start()
            try:
                result = loadgen.run_load(url, self.connections, self.args.duration, self.load_tool)
            finally:
                sampler.finish()
            held = max(sampler.maximum, self.db.server_connections(application_name))
            if not server.alive():
                outcome.failed = "the server died during the run"
                log(f"{variant.name}: the server died:\n{server.log_tail()}")
                return
            bad = result.errors + result.non2xx
            if bad:
                log(f"{variant.name}: {bad} errors or non-2xx responses:\n{server.log_tail(10)}")
        finally:
            server.cleanup()
        outcome.rps.append(result.rps)
        outcome.p50.append(result.p50_ms)
        outcome.p99.append(result.p99_ms)
        outcome.conns.append(held)
        outcome.errors += bad
        if variant.dsn != "pgbouncer":
            self.wait_drained(application_name)
        log(
            f"{variant.name:<15} {result.rps:8.1f} req/s  p50 {result.p50_ms:6.2f} ms"
            f"  p99 {result.p99_ms:6.2f} ms  {held} server connections"
            + (f"  ({bad} errors)" if bad else "")
        )

    def wait_drained(self, application_name: str, timeout: float = 15.0) -> None:
        """Poll until the stopped server's connections have left PostgreSQL."""
        deadline = time.monotonic() + timeout
        while self.db.server_connections(application_name) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- the whole run ---------------------------------------------------------------

    def run(self, names: Sequence[str]) -> dict[str, Outcome]:
        from wsgi_pgconn.tooling.bench.database import open_database

        outcomes = {name: Outcome(name) for name in names}
        load_at_start = envinfo.load_average()  # before this run adds its own load
        log("server: " + describe_server(self.server_kind, self.args.processes, self.args.threads))
        for note in self.server_notes:
            log("note: " + note)
        if self.server_kind == "werkzeug":
            log("note: " + WERKZEUG_NOTE)
        tool = (
            "wrk"
            if self.load_tool == "wrk"
            else f"Python load generator ({loadgen.WRK_INSTALL} for wrk)"
        )
        log(
            f"load: {tool}, {self.connections} connections, {self.args.duration} s per run"
            f" (+{self.args.warmup} s warm-up), {self.args.repeat} repeat(s)"
        )
        with open_database(log, use_database_url=self.args.use_database_url) as db:
            self._db = db
            self.stage = servers.stage([servers.package_dir()])
            try:
                runnable = []
                for name in names:
                    reason = self.skip_reason(BY_NAME[name])
                    if reason:
                        outcomes[name].skipped = reason
                    else:
                        runnable.append(name)
                self.environment = self.collect_environment(db, load_at_start, runnable)
                for line in self.environment.lines():
                    log(line)
                if "pgbouncer" in runnable:
                    self.start_pgbouncer()
                for repeat in range(self.args.repeat):
                    # Alternate the order so that drift (thermal, neighbours)
                    # does not favour the variants that run first.
                    order = runnable if repeat % 2 == 0 else runnable[::-1]
                    for name in order:
                        if outcomes[name].failed:
                            continue
                        log(f"repeat {repeat + 1}/{self.args.repeat}: {name}")
                        self.measure(BY_NAME[name], outcomes[name])
            finally:
                if self.bouncer is not None:
                    self.bouncer.cleanup()
                shutil.rmtree(self.stage, ignore_errors=True)
                self._db = None
        return outcomes

    def collect_environment(
        self,
        db: BenchDatabase,
        load: tuple[float, float, float] | None,
        runnable: Sequence[str],
    ) -> envinfo.Environment:
        from wsgi_pgconn.tooling.bench.apps import PAGE_TABLE
        from wsgi_pgconn.tooling.bench.pgbouncer import pgbouncer_path

        if db.cluster is not None:
            database = (
                f"a throwaway cluster started for this run on {db.cluster.host}:{db.cluster.port}"
                " and deleted at the end"
            )
        else:
            database = (
                f"{db.target} (not created by the benchmark); table {PAGE_TABLE} created"
                " for this run and dropped at the end"
            )
        return envinfo.Environment(
            client=envinfo.client_python(),
            server=envinfo.python_info(self.server_python, envinfo.server_packages()),
            server_kind=self.server_kind,
            apache=envinfo.apache_version() if self.server_kind == "mod_wsgi" else None,
            wrk=envinfo.wrk_version() if self.load_tool == "wrk" else None,
            pgbouncer=(
                envinfo.pgbouncer_version(pgbouncer_path()) if "pgbouncer" in runnable else None
            ),
            postgresql=db.server_version(),
            database=database,
            cpus=envinfo.cpu_counts(),
            load=load,
        )

    def start_pgbouncer(self) -> None:
        from wsgi_pgconn.tooling.bench.database import with_params
        from wsgi_pgconn.tooling.bench.pgbouncer import PgBouncer

        self.bouncer = PgBouncer(
            with_params(self.db.admin_dsn, application_name="bench_pgbouncer"),
            pool_size=self.args.processes * self.args.threads,
            application_name="bench_pgbouncer",
            os_user=self.db.os_user,
        )
        self.bouncer.start()


def format_table(outcomes: dict[str, Outcome], names: Sequence[str]) -> str:
    """The results as a plain-text table (medians over the repeats)."""

    def ratio(value: float | None, base: float | None, noise: bool) -> str:
        if value is None or not base:
            return "-"
        return f"{value / base:.2f}" + (" ~" if noise else "  ")

    base = outcomes.get(BASELINE)
    upper = outcomes.get(UPPER_BOUND)
    base_rps = Outcome.median(base.rps) if base else None
    upper_rps = Outcome.median(upper.rps) if upper else None
    header = (
        "variant",
        "description",
        "req/s",
        "min-max",
        "p50 ms",
        "p99 ms",
        "conns",
        "x connect-tcp",
        "x hand-held",
    )
    measured: list[tuple[str, ...]] = []
    other: dict[str, str] = {}
    for name in names:
        o = outcomes[name]
        if o.skipped or o.failed or not o.rps:
            other[name] = (
                f"skipped: {o.skipped}" if o.skipped else f"failed: {o.failed or 'no result'}"
            )
            continue
        rps = Outcome.median(o.rps)
        spread = o.spread()
        row: tuple[str, ...] = (
            name,
            BY_NAME[name].label,
            f"{rps:.1f}",
            f"{spread[0]:.0f}-{spread[1]:.0f}" if spread else "-",
            f"{Outcome.median(o.p50):.2f}",
            f"{Outcome.median(o.p99):.2f}",
            str(max(o.conns)),
            ratio(rps, base_rps, base is not None and o.within_spread_of(base)),
            ratio(rps, upper_rps, upper is not None and o.within_spread_of(upper)),
        )
        if o.errors:
            row = (*row, f"({o.errors} errors)")
        measured.append(row)
    widths = [len(h) for h in header]
    for row in measured:
        for i, cell in enumerate(row[: len(header)]):
            widths[i] = max(widths[i], len(cell))
    for name in other:
        widths[0] = max(widths[0], len(name))
        widths[1] = max(widths[1], len(BY_NAME[name].label))

    def fmt(row: Sequence[str]) -> str:
        cells = [
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
            for i, cell in enumerate(row[: len(header)])
        ]
        return "  ".join([*cells, *row[len(header) :]]).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    by_name = {row[0]: row for row in measured}
    for name in names:
        if name in by_name:
            lines.append(fmt(by_name[name]))
        else:
            lines.append(
                f"{name.ljust(widths[0])}  {BY_NAME[name].label.ljust(widths[1])}  {other[name]}"
            )
    if any(outcomes[n].spread() for n in names):
        lines += [
            "",
            "min-max: the lowest and highest requests/s over the repeats. A ratio marked ~ is",
            "inside the spread: the two variants' min-max ranges overlap, so that difference",
            "is noise, not a measured difference.",
        ]
    else:
        lines += ["", "one run per variant: no spread, so no difference can be called noise or not"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn.bench",
        description=(
            "Serve a page of three small queries once per connection-handling variant under a "
            "real WSGI server, load it, and print requests/s, p50/p99 latency, the server "
            "connections held and ratios. Starts a throwaway PostgreSQL cluster of its own; "
            "a database named by DATABASE_URL is used only with --use-database-url."
        ),
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of load per run (default 5)"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help="concurrent HTTP connections (default: processes x threads)",
    )
    parser.add_argument(
        "--variants",
        default="all",
        help="comma-separated variant names, or 'all' (default); see --list",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per variant, the order alternating between repeats; medians shown (default 3)",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of unmeasured load first (default 1)"
    )
    parser.add_argument(
        "--server", choices=("auto", "mod_wsgi", "gunicorn", "werkzeug"), default="auto"
    )
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--processes", type=int, default=2, help="server processes (default 2)")
    parser.add_argument(
        "--threads", type=int, default=4, help="threads per server process (default 4)"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=None,
        help="per-process pool size of pool variants (default: threads)",
    )
    parser.add_argument(
        "--use-database-url",
        action="store_true",
        help=(
            "benchmark the database named by DATABASE_URL (loads that server, creates a table "
            "wsgi_pgconn_bench_item there and drops it at the end); without this flag a set "
            "DATABASE_URL is refused"
        ),
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.repeat < 1 or args.processes < 1 or args.threads < 1:
        parser.error("--duration, --repeat, --processes and --threads must be positive")
    return args


def _terminate(signum: int, frame: object) -> NoReturn:
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for v in VARIANTS:
            print(f"{v.name:<15} {v.label}")
        return 0
    if args.variants == "all":
        names = [v.name for v in VARIANTS]
    else:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            print(f"bench: unknown variant(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
            return 2
    # SIGTERM -> SystemExit and Ctrl-C -> KeyboardInterrupt unwind through the
    # finally blocks: servers, PgBouncer, the cluster and the table are cleaned up.
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args)
    try:
        outcomes = bench.run(names)
    except DatabaseRefused as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; what it started and created is cleaned up", file=sys.stderr)
        return 130
    load_name = "wrk" if bench.load_tool == "wrk" else "Python load generator"
    print()
    print(
        f"{describe_server(bench.server_kind, args.processes, args.threads)}; {load_name}; "
        f"{bench.connections} connections; {args.duration} s x {args.repeat} repeat(s), medians"
    )
    if bench.environment is not None:
        for line in bench.environment.lines():
            print(line)
    if bench.server_kind == "werkzeug":
        print("note: " + WERKZEUG_NOTE)
    print(format_table(outcomes, names))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "server": bench.server_kind,
                    "load": bench.load_tool,
                    "connections": bench.connections,
                    "duration": args.duration,
                    "repeat": args.repeat,
                    "environment": (
                        bench.environment.as_dict() if bench.environment is not None else None
                    ),
                    "results": [outcomes[n].as_dict() for n in names],
                },
                f,
                indent=2,
            )
    return 1 if any(outcomes[n].failed for n in names) else 0
