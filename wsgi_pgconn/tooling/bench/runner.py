"""``python -m wsgi_pgconn.bench``: serve the page once per variant, load it, print one table."""

from __future__ import annotations

import argparse
import fnmatch
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
from wsgi_pgconn.tooling.bench.apps import DRIVER_IN_PAGE
from wsgi_pgconn.tooling.bench.database import DatabaseRefused
from wsgi_pgconn.tooling.bench.variants import (
    BASELINE,
    BY_NAME,
    TARGETS,
    VARIANTS,
    Target,
    Variant,
    package_has,
)
from wsgi_pgconn.tooling.relay import RelayStats, parse_duration

if TYPE_CHECKING:
    from wsgi_pgconn.tooling.bench.database import BenchDatabase
    from wsgi_pgconn.tooling.bench.pgbouncer import PgBouncer
    from wsgi_pgconn.tooling.relay import RelayProcess

UNIX_UNDER_RTT = (
    "a unix socket has no network to delay: with --rtt every row reaches PostgreSQL over "
    "TCP through the relay"
)

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
    #: --rtt: turns (round trips) per request and the relay's CPU share, as the relay measured
    trips: list[float] = field(default_factory=list)
    relay_cpu: list[float] = field(default_factory=list)
    relay_late_p99_us: list[float] = field(default_factory=list)
    driver: str | None = None  # the driver the page said served it
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
            "driver": self.driver,
            "rps": self.median(self.rps),
            "rps_min": min(self.rps) if self.rps else None,
            "rps_max": max(self.rps) if self.rps else None,
            "p50_ms": self.median(self.p50),
            "p99_ms": self.median(self.p99),
            "server_connections": max(self.conns) if self.conns else None,
            "round_trips_per_request": self.median(self.trips),
            "relay_cpu_share": self.median(self.relay_cpu),
            "runs": {
                "rps": self.rps,
                "p50_ms": self.p50,
                "p99_ms": self.p99,
                "server_connections": self.conns,
                "round_trips_per_request": self.trips,
                "relay_cpu_share": self.relay_cpu,
                "relay_late_p99_us": self.relay_late_p99_us,
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
        self.rtt: float = args.rtt
        self.relay: RelayProcess | None = None
        self.relay_final: RelayStats | None = None
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
        driver = [variant.driver] if variant.driver else []
        for module in (*driver, *variant.needs):
            if not self.server_has(module):
                if self.server_python == servers.venv_python():
                    venv = servers.server_venv()
                    return f"{venv}/bin/pip install {module} (or {servers.INSTALL_HINT})"
                return f"pip install {module}"
        if variant.server == "gunicorn-gevent" and not servers.gunicorn_python():
            return f"gunicorn not found: run {servers.INSTALL_HINT}"
        if variant.server == "waitress" and not servers.venv_tool("waitress-serve"):
            return (
                f"waitress-serve not found in {servers.server_venv()}: run {servers.INSTALL_HINT}"
            )
        if variant.threads == 1 and self.server_kind == "werkzeug":
            return "needs one thread per process; werkzeug's server starts a thread per request"
        if variant.name.startswith("connect") and variant.dsn == "tcp" and not self.db.tcp_dsn:
            return "needs a TCP DATABASE_URL with a password (or unset DATABASE_URL)"
        if variant.dsn == "unix" and self.rtt:
            return UNIX_UNDER_RTT
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
        return with_params(self.relayed(base), application_name=application_name)

    def relayed(self, dsn: str) -> str:
        """``dsn`` through the latency relay (with --rtt), else ``dsn`` itself."""
        from wsgi_pgconn.tooling.bench.database import with_params

        if self.relay is None:
            return dsn
        return with_params(dsn, host=self.relay.host, port=str(self.relay.port))

    def make_server(self, variant: Variant, application_name: str) -> servers.Server:
        threads = variant.threads or self.args.threads
        # The run's WSGI_PGCONN_DRIVER reaches a row that has no driver of its own.
        env = {
            key: value
            for key, value in os.environ.items()
            if key != "DATABASE_URL"
            and (not key.startswith("WSGI_PGCONN_") or key == "WSGI_PGCONN_DRIVER")
        }
        env.update(variant.env)
        if variant.driver:
            env["WSGI_PGCONN_DRIVER"] = variant.driver
        env["WSGI_PGCONN_BENCH_DSN"] = self.variant_dsn(variant, application_name)
        env["WSGI_PGCONN_BENCH_POOL_SIZE"] = str(self.args.pool_size or threads)
        name = "bench-" + variant.name
        if variant.server == "gunicorn-gevent":
            return servers.gunicorn_server(
                variant.module + ":application",
                workers=self.args.processes,
                worker_class="gevent",
                python_path=[self.stage],
                env=env,
                name=name,
            )
        if variant.server == "waitress":
            return servers.waitress_server(
                variant.module + ":application",
                threads=threads,
                python_path=[self.stage],
                env=env,
                name=name,
            )
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
        if variant.dsn == "pgbouncer":
            # What PostgreSQL sees: PgBouncer's server connections.
            assert self.bouncer is not None
            application_name = self.bouncer.application_name
        server = self.make_server(variant, application_name)
        try:
            try:
                server.start(ready_path="/", ready_status=200, timeout=60)
            except servers.ServerError as exc:
                outcome.failed = str(exc).splitlines()[0]
                log(f"{variant.name} failed to start:\n{exc}")
                return
            wrong = self.check_driver(variant, server, outcome)
            if wrong:
                outcome.failed = wrong
                log(f"{variant.name}: {wrong}")
                return
            url = f"http://127.0.0.1:{server.port}/"
            if self.args.warmup > 0:
                loadgen.run_load(url, self.connections, self.args.warmup, self.load_tool)
            sampler = Sampler(self.db, application_name)
            sampler.start()
            relay_before = self.relay.stats() if self.relay is not None else None
            try:
                result = loadgen.run_load(url, self.connections, self.args.duration, self.load_tool)
            finally:
                sampler.finish()
            relayed = (
                self.relay.stats().since(relay_before)
                if self.relay is not None and relay_before is not None
                else None
            )
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
        trips = ""
        if relayed is not None and result.requests:
            outcome.trips.append(relayed.turns / result.requests)
            outcome.relay_cpu.append(relayed.cpu_share)
            outcome.relay_late_p99_us.append(relayed.late_percentile(0.99))
            trips = (
                f"  {outcome.trips[-1]:.2f} round trips/request"
                f"  relay CPU {relayed.cpu_share * 100:.0f}%"
            )
        if variant.dsn != "pgbouncer":
            self.wait_drained(application_name)
        log(
            f"{variant.name:<24} {result.rps:8.1f} req/s  p50 {result.p50_ms:6.2f} ms"
            f"  p99 {result.p99_ms:6.2f} ms  {held} server connections"
            + trips
            + (f"  ({bad} errors)" if bad else "")
        )

    def check_driver(self, variant: Variant, server: servers.Server, outcome: Outcome) -> str:
        """'' when the page says it was served by the row's driver, else what went wrong."""
        try:
            status, _, body = servers.http_get(server.port, "/", timeout=30)
        except OSError as exc:
            return f"GET / failed: {exc}"
        match = DRIVER_IN_PAGE.search(body)
        if status != 200 or match is None:
            return f"GET / answered {status} without naming its driver: {body[:200]!r}"
        outcome.driver = match.group(1).decode("ascii")
        if variant.driver and outcome.driver != variant.driver:
            return f"the page was served by {outcome.driver}, not by the row's {variant.driver}"
        return ""

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
                if self.rtt:
                    self.start_relay()
                self.environment = self.collect_environment(db, load_at_start, runnable)
                for line in self.environment.lines():
                    log(line)
                if any(BY_NAME[name].dsn == "pgbouncer" for name in runnable):
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
                if self.relay is not None:
                    self.relay_final = self.relay.close()
                    self.relay = None
                    log(self.relay_final.summary())
                shutil.rmtree(self.stage, ignore_errors=True)
                self._db = None
        return outcomes

    def start_relay(self) -> None:
        """The latency relay, in a process of its own, in front of the database."""
        from wsgi_pgconn.tooling.bench.database import server_address
        from wsgi_pgconn.tooling.ports import free_port
        from wsgi_pgconn.tooling.relay import RelayProcess

        try:
            target = server_address(self.db.app_dsn)
        except ValueError as exc:
            raise SystemExit(f"bench: {exc}") from None
        self.relay = RelayProcess(target, listen=("127.0.0.1", free_port()), rtt=self.rtt)
        where = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
        log(
            f"relay: pid {self.relay.pid} on {self.relay.address}, {self.rtt * 1e3:g} ms "
            f"round-trip time to {where}"
        )

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
                envinfo.pgbouncer_version(pgbouncer_path())
                if any(BY_NAME[name].dsn == "pgbouncer" for name in runnable)
                else None
            ),
            postgresql=db.server_version(),
            database=database,
            cpus=envinfo.cpu_counts(),
            load=load,
        )

    def start_pgbouncer(self) -> None:
        from wsgi_pgconn.tooling.bench.database import with_params
        from wsgi_pgconn.tooling.bench.pgbouncer import PgBouncer

        # PgBouncer on the application's machine: with --rtt the network (the
        # relay) lies between PgBouncer and PostgreSQL.
        target = self.relayed(self.db.app_dsn) if self.relay is not None else self.db.admin_dsn
        self.bouncer = PgBouncer(
            with_params(target, application_name="bench_pgbouncer"),
            pool_size=self.args.processes * self.args.threads,
            application_name="bench_pgbouncer",
            os_user=self.db.os_user,
        )
        self.bouncer.start()


def _median_rps(outcomes: dict[str, Outcome], name: str) -> float | None:
    o = outcomes.get(name)
    if o is None or o.failed or o.skipped:
        return None
    return Outcome.median(o.rps)


def format_table(outcomes: dict[str, Outcome], names: Sequence[str], rtt: float = 0.0) -> str:
    """The results as a plain-text table (medians over the repeats).

    ``x hand-held`` compares each row with the hand-held connection of its
    own driver. With ``rtt`` (a relay between the servers and PostgreSQL) two
    more columns: round trips per request and the relay's CPU, as the relay
    measured them.
    """

    def ratio(value: float | None, base: float | None, noise: bool) -> str:
        if value is None or not base:
            return "-"
        return f"{value / base:.2f}" + (" ~" if noise else "  ")

    base = outcomes.get(BASELINE)
    base_rps = _median_rps(outcomes, BASELINE)
    header: tuple[str, ...] = (
        "variant",
        "description",
        "req/s",
        "min-max",
        "p50 ms",
        "p99 ms",
        "conns",
    )
    if rtt:
        header += ("trips/req", "relay cpu")
    header += ("x connect-tcp", "x hand-held")
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
        upper_name = BY_NAME[name].upper_bound
        upper = outcomes.get(upper_name)
        row: tuple[str, ...] = (
            name,
            BY_NAME[name].label,
            f"{rps:.1f}",
            f"{spread[0]:.0f}-{spread[1]:.0f}" if spread else "-",
            f"{Outcome.median(o.p50):.2f}",
            f"{Outcome.median(o.p99):.2f}",
            str(max(o.conns)),
        )
        if rtt:
            trips, cpu = Outcome.median(o.trips), Outcome.median(o.relay_cpu)
            row += (
                f"{trips:.2f}" if trips is not None else "-",
                f"{cpu * 100:.0f}%" if cpu is not None else "-",
            )
        row += (
            ratio(rps, base_rps, base is not None and o.within_spread_of(base)),
            ratio(
                rps,
                _median_rps(outcomes, upper_name),
                upper is not None and o.within_spread_of(upper),
            ),
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
    lines.append("")
    lines.append(
        "x hand-held: against the hand-held connection of the row's own driver "
        "(-pg2 psycopg2, -pg3 psycopg 3)",
    )
    lines.append(
        "and server (gevent-* and waitress-* rows run under servers of their own, named in"
        " their description)."
    )
    if rtt:
        lines += [
            "trips/req: client/server turns per request, counted by the relay (the round trips",
            "that wait for the network); relay cpu: the relay's CPU use during the run, in % of",
            "one core (it shares the machine with the servers and PostgreSQL).",
        ]
    if any(outcomes[n].spread() for n in names):
        lines += [
            "min-max: the lowest and highest requests/s over the repeats. A ratio marked ~ is",
            "inside the spread: the two variants' min-max ranges overlap, so that difference",
            "is noise, not a measured difference.",
        ]
    else:
        lines += ["one run per variant: no spread, so no difference can be called noise or not"]
    targets = format_targets(outcomes, rtt)
    if targets:
        lines += ["", *targets]
    return "\n".join(lines)


def target_ratio(outcomes: dict[str, Outcome], target: Target) -> tuple[float, str, bool] | None:
    """(ratio, the row it is over, noise) of ``target``, or None when not measured."""
    rps = _median_rps(outcomes, target.row)
    over = [(r, n) for n in target.over if (r := _median_rps(outcomes, n)) is not None]
    if rps is None or not over or len(over) < len(target.over):
        return None
    best, best_name = max(over)
    if not best:
        return None
    noise = outcomes[target.row].within_spread_of(outcomes[best_name])
    return rps / best, best_name, noise


def applicable_targets(rtt: float) -> list[Target]:
    return [t for t in TARGETS if t.latency is None or t.latency == bool(rtt)]


def format_targets(outcomes: dict[str, Outcome], rtt: float) -> list[str]:
    """The project's targets that this run measured, with the ratios it found."""
    rows: list[tuple[str, str, str]] = []
    for target in applicable_targets(rtt):
        found = target_ratio(outcomes, target)
        if found is None:
            continue
        value, over, noise = found
        what = f"{target.row} / {over}"
        if len(target.over) > 1:
            what += " (the faster of " + ", ".join(target.over) + ")"
        # three decimals: 1.147 must not read as a met 1.15
        measured = f"{value:.3f}" + (" ~" if noise else "  ")
        if target.minimum is None:
            verdict = target.note or "reported"
        elif target.latency and rtt and abs(rtt - 0.001) > 1e-9:
            verdict = f"(the target >= {target.minimum:.2f} is for --rtt 1ms)"
        else:
            verdict = f"target >= {target.minimum:.2f}: " + (
                "met" if value >= target.minimum else "NOT met"
            )
        rows.append((what, measured, verdict))
    if not rows:
        return []
    width = max(len(r[0]) for r in rows)
    return [
        "targets (requests/s, ratio of medians; ~ inside the spread):",
        *(f"  {what.ljust(width)}  {measured:>8}  {verdict}" for what, measured, verdict in rows),
    ]


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
        help=(
            "comma-separated variant names or patterns ('*-pg3', 'django-*'), or 'all' "
            "(default); see --list"
        ),
    )
    parser.add_argument(
        "--rtt",
        default="0",
        metavar="TIME",
        help=(
            "network round-trip time to add between the servers (and PgBouncer) and PostgreSQL, "
            "e.g. 1ms or 0.5ms: a relay in its own process holds every chunk rtt/2 each way and "
            "counts the round trips per request (default 0: loopback, no relay)"
        ),
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
    try:
        args.rtt = parse_duration(args.rtt)
    except ValueError as exc:
        parser.error(f"--rtt: {exc}")
    if args.duration <= 0 or args.repeat < 1 or args.processes < 1 or args.threads < 1:
        parser.error("--duration, --repeat, --processes and --threads must be positive")
    return args


def select_variants(spec: str) -> tuple[list[str], list[str]]:
    """(the variants ``spec`` names, in the order of :data:`VARIANTS`; what matched none)."""
    if spec.strip() == "all":
        return [v.name for v in VARIANTS], []
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [w for w in wanted if not fnmatch.filter(BY_NAME, w)]
    chosen = {name for w in wanted for name in fnmatch.filter(BY_NAME, w)}
    if all(w in BY_NAME for w in wanted):  # plain names: in the order given
        return list(dict.fromkeys(wanted)), unknown
    return [v.name for v in VARIANTS if v.name in chosen], unknown


def _terminate(signum: int, frame: object) -> NoReturn:
    sys.exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        width = max(len(v.name) for v in VARIANTS)
        for v in VARIANTS:
            print(f"{v.name:<{width}}  {v.label}")
        return 0
    names, unknown = select_variants(args.variants)
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
    network = (
        f"; rtt {args.rtt * 1e3:g} ms (relay)" if args.rtt else "; loopback (no added latency)"
    )
    print(
        f"{describe_server(bench.server_kind, args.processes, args.threads)}; {load_name}; "
        f"{bench.connections} connections; {args.duration} s x {args.repeat} repeat(s), medians"
        + network
    )
    if bench.environment is not None:
        for line in bench.environment.lines():
            print(line)
    if bench.relay_final is not None:
        print("network:  " + bench.relay_final.summary())
    if bench.server_kind == "werkzeug":
        print("note: " + WERKZEUG_NOTE)
    print(format_table(outcomes, names, args.rtt))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "server": bench.server_kind,
                    "load": bench.load_tool,
                    "connections": bench.connections,
                    "duration": args.duration,
                    "repeat": args.repeat,
                    "rtt_ms": args.rtt * 1e3,
                    "relay": (
                        bench.relay_final.as_dict() if bench.relay_final is not None else None
                    ),
                    "targets": [
                        {
                            "row": t.row,
                            "over": found[1],
                            "ratio": found[0],
                            "noise": found[2],
                            "minimum": t.minimum,
                        }
                        for t in applicable_targets(args.rtt)
                        if (found := target_ratio(outcomes, t)) is not None
                    ],
                    "environment": (
                        bench.environment.as_dict() if bench.environment is not None else None
                    ),
                    "results": [outcomes[n].as_dict() for n in names],
                },
                f,
                indent=2,
            )
    return 1 if any(outcomes[n].failed for n in names) else 0
