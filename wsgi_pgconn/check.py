"""``python -m wsgi_pgconn check``: the configuration, the server, and whether they fit.

Run it on an application host, with the environment the WSGI server gets::

    python -m wsgi_pgconn check --processes 4 --threads 8 --hosts 3
    python -m wsgi_pgconn check --quick          # readiness probe: one round trip, exit 0/1

It prints the effective settings (the password masked) and where each came
from (default, environment, argument); connects once, as the middleware
would, and reports the connect time, one round trip, the server's version,
whether it is a standby, ``max_connections`` and how many are in use, and
whether a pooler is in between; then the sizing verdict: processes x threads
(or x pool_size) x hosts against ``max_connections`` minus the reserved
slots (docs/scaling.md). Exit status 0 when all is well (warnings allowed),
1 with the reasons otherwise, 2 for a usage error.

Every setting can be given as an option (``--scope pool``, ``--pool-size
8``, ``--dsn ...``), which wins over the environment, as a keyword argument
of the middleware does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from . import __version__, config, connection, drivers
from .errors import ConfigurationError, DriverNotFound, first_line

__all__ = ["Report", "add_arguments", "main", "run"]

#: The libpq environment variables shown when DATABASE_URL is unset (values of secrets masked).
LIBPQ_ENVIRONMENT = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSSLMODE",
    "PGAPPNAME",
    "PGOPTIONS",
    "PGCONNECT_TIMEOUT",
)
_SECRET_ENVIRONMENT = ("PGPASSWORD",)
MASK = "********"

SERVER_QUERY = """
SELECT current_setting('server_version'),
       pg_is_in_recovery(),
       current_setting('default_transaction_read_only'),
       current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int,
       pg_backend_pid(),
       current_user,
       current_database(),
       (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
       (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
       (SELECT datconnlimit FROM pg_database WHERE datname = current_database())
"""


@dataclasses.dataclass
class Server:
    """What the check learnt from the server."""

    version: str
    standby: bool
    read_only: bool
    max_connections: int
    superuser_reserved: int
    reserved: int
    in_use: int
    backend_pid: int
    announced_pid: int
    user: str
    database: str
    role_limit: int
    superuser: bool
    database_limit: int
    pgpool: str | None = None

    @property
    def available(self) -> int:
        """Connections an ordinary role may open: max_connections minus the reserved slots."""
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def pooler(self) -> str | None:
        """The pooler in between, as far as can be told, or None."""
        if self.pgpool is not None:
            version = f" {self.pgpool}" if self.pgpool else ""
            return f"pgpool-II{version} (it answers SHOW pool_version)"
        if self.announced_pid != self.backend_pid:
            return (
                f"PgBouncer, or another pooler (the connection announced backend pid "
                f"{self.announced_pid}, the server runs it in {self.backend_pid})"
            )
        return None


@dataclasses.dataclass
class Report:
    """Lines to print, and the problems found (failures make the exit status 1)."""

    out: TextIO
    failures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def section(self, title: str) -> None:
        self.out.write(f"\n{title}\n")

    def line(self, label: str, value: object, note: str = "") -> None:
        text = f"  {label:<29} {value}"
        if note:
            text += f"   [{note}]"
        self.out.write(text.rstrip() + "\n")

    def fail(self, reason: str) -> None:
        self.failures.append(reason)

    def warn(self, reason: str) -> None:
        self.warnings.append(reason)

    def finish(self) -> int:
        self.section("Verdict")
        for reason in self.failures:
            self.out.write(f"  FAIL: {reason}\n")
        for reason in self.warnings:
            self.out.write(f"  WARNING: {reason}\n")
        if not self.failures:
            self.out.write("  OK" + (" (with warnings)" if self.warnings else "") + "\n")
        return 1 if self.failures else 0


# -- arguments -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``check``: one per setting, and the deployment's shape."""
    parser.add_argument(
        "--quick",
        action="store_true",
        help="readiness probe: connect, one round trip, exit 0 or 1 (one line of output)",
    )
    shape = parser.add_argument_group("the deployment (for the sizing verdict)")
    shape.add_argument(
        "--processes",
        type=_positive,
        help="WSGI server processes per host (default: $WEB_CONCURRENCY, else 1)",
    )
    shape.add_argument("--threads", type=_positive, help="threads per process (default 1)")
    shape.add_argument("--hosts", type=_positive, default=1, help="application hosts (default 1)")
    settings = parser.add_argument_group(
        "settings (each wins over its environment variable, as a keyword argument does)"
    )
    for name, (var, _) in config.SETTINGS.items():
        settings.add_argument(
            "--" + name.replace("_", "-"), dest="setting_" + name, metavar="VALUE", help=var
        )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        name: value
        for name in config.SETTINGS
        if (value := getattr(args, "setting_" + name, None)) is not None
    }


# -- the check -------------------------------------------------------------------------------


def run(
    args: argparse.Namespace,
    environ: dict[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Run the check (``--quick``: the probe); the exit status."""
    environ = dict(os.environ) if environ is None else environ
    out = sys.stdout if out is None else out
    overrides = _overrides(args)
    if args.quick:
        return _quick(environ, overrides, out)
    report = Report(out)
    out.write(
        f"wsgi_pgconn {__version__} check, Python {sys.version.split()[0]}\n"
    )
    try:
        settings = config.parse(environ, **overrides)
        driver = drivers.load(settings.driver)
    except (ConfigurationError, DriverNotFound) as exc:
        report.fail(f"configuration: {exc}")
        return report.finish()
    _print_settings(report, settings, environ, overrides, driver)
    server = _server(report, settings, environ, driver)
    if server is not None:
        _sizing(report, settings, server, args, environ)
    return report.finish()


def _quick(environ: dict[str, str], overrides: dict[str, object], out: TextIO) -> int:
    try:
        settings = config.parse(environ, **overrides)
        driver = drivers.load(settings.driver)
        connect_ms, conn = _connect(settings, environ, driver)
    except (ConfigurationError, DriverNotFound) as exc:
        out.write(f"FAIL: configuration: {exc}\n")
        return 1
    except Exception as exc:  # the driver's errors: anything libpq says
        out.write(f"FAIL: cannot connect: {first_line(exc)}\n")
        return 1
    try:
        round_trip_ms = _round_trip(conn)
    except Exception as exc:
        out.write(f"FAIL: connected, but SELECT 1 failed: {first_line(exc)}\n")
        return 1
    finally:
        driver.close(conn)
    out.write(f"ok: connected in {connect_ms:.1f} ms, SELECT 1 in {round_trip_ms:.2f} ms\n")
    return 0


def _connect(
    settings: config.Settings, environ: dict[str, str], driver: drivers.Driver
) -> tuple[float, Any]:
    """A connection opened as the middleware opens one, and the milliseconds it took."""
    conninfo = connection.connect_params(settings, environ, driver)
    started = time.perf_counter()
    conn = driver.connect(conninfo, settings, None)
    return (time.perf_counter() - started) * 1000, conn


def _round_trip(conn: Any) -> float:
    """One ``SELECT 1``, in milliseconds (the connection is in autocommit outside requests)."""
    with conn.cursor() as cur:
        started = time.perf_counter()
        cur.execute("SELECT 1")
        cur.fetchone()
        return (time.perf_counter() - started) * 1000


def _show(name: str, value: object) -> str:
    """A setting's value for people: durations with their unit."""
    unit = config.DURATION_UNITS.get(name)
    if value is None:
        if name in ("statement_timeout", "idle_in_transaction_timeout", "isolation_level"):
            return "(the server's)"
        return "none"
    if unit == "s":
        return f"{value:g} s"
    if unit == "ms":
        return f"{value} ms" + (" (no timeout)" if value == 0 else "")
    if name == "exempt_paths":
        return ", ".join(value) if value else "none"  # type: ignore[arg-type]
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _print_settings(
    report: Report,
    settings: config.Settings,
    environ: dict[str, str],
    overrides: dict[str, object],
    driver: drivers.Driver,
) -> None:
    report.out.write(f"driver: {driver.version()}\n")
    report.section("Settings")
    sources = config.sources(environ, **overrides)
    for name in config.SETTINGS:
        if name == "dsn":
            if settings.dsn:
                value = settings.masked_dsn
            else:
                given = [
                    f"{var}={MASK if var in _SECRET_ENVIRONMENT else environ[var]}"
                    for var in LIBPQ_ENVIRONMENT
                    if environ.get(var)
                ]
                value = "(unset: libpq's PG* variables" + (
                    ": " + " ".join(given) + ")" if given else ", none of which is set)"
                )
        else:
            value = _show(name, getattr(settings, name))
        report.line(name, value, sources[name])
    unknown = config.unknown_variables(environ)
    if unknown:
        report.warn(
            "unknown wsgi_pgconn setting(s), ignored: "
            + config.describe_unknown(unknown)
            + f" (set {config.ENV_PREFIX}STRICT=on to refuse them)"
        )


def _server(
    report: Report, settings: config.Settings, environ: dict[str, str], driver: drivers.Driver
) -> Server | None:
    report.section("Server")
    try:
        connect_ms, conn = _connect(settings, environ, driver)
    except Exception as exc:  # the driver's errors: anything libpq says
        report.line("connect", "failed")
        report.fail(f"cannot connect: {first_line(exc)}")
        return None
    try:
        round_trip_ms = _round_trip(conn)
        with conn.cursor() as cur:
            cur.execute(SERVER_QUERY)
            row = cur.fetchone()
        server = None
        if row is not None:
            (version, standby, read_only, max_connections, superuser_reserved, reserved,
             in_use, backend_pid, user, database, role_limit, superuser, database_limit) = row
            server = Server(
                version=version,
                standby=standby,
                read_only=read_only == "on",
                max_connections=max_connections,
                superuser_reserved=superuser_reserved,
                reserved=reserved,
                in_use=in_use,
                backend_pid=backend_pid,
                announced_pid=driver.backend_pid(conn),
                user=user,
                database=database,
                role_limit=role_limit,
                superuser=superuser,
                database_limit=database_limit,
                pgpool=_pgpool_version(conn, driver),
            )
    except Exception as exc:
        report.fail(f"connected, but the server's details could not be read: {first_line(exc)}")
        return None
    finally:
        driver.close(conn)
    if server is None:
        return None
    report.line("connect", f"{connect_ms:.1f} ms", "as the middleware opens a connection")
    report.line("round trip", f"{round_trip_ms:.2f} ms", "SELECT 1")
    report.line("server", f"PostgreSQL {server.version}")
    role = server.user + (" (superuser)" if server.superuser else "")
    report.line("role, database", f"{role}, {server.database}")
    standby = "yes (in recovery)" if server.standby else "no"
    if server.read_only and not server.standby:
        standby = "no, but read-only (default_transaction_read_only = on)"
    report.line("standby", standby)
    reserved = f"{server.superuser_reserved} superuser_reserved_connections"
    if server.reserved:
        reserved += f" + {server.reserved} reserved_connections"
    report.line(
        "connections",
        f"max_connections {server.max_connections} - {reserved} = {server.available} "
        f"for applications; {server.in_use} in use now (this check's own included)",
    )
    limits = []
    if server.role_limit >= 0:
        limits.append(f"role {server.user}: {server.role_limit}")
    if server.database_limit >= 0:
        limits.append(f"database {server.database}: {server.database_limit}")
    if limits:
        report.line("connection limits", ", ".join(limits))
    pooler = server.pooler
    report.line("pooler in between", pooler or "none detected")
    if server.standby or server.read_only:
        report.warn(
            "the server is read-only (a standby, or fenced): every write will fail with "
            "SQLSTATE 25006; if the application writes, list every server in DATABASE_URL "
            "with target_session_attrs=read-write (docs/scaling.md, Failover)"
        )
    if pooler is not None and settings.pooler == "none":
        report.warn(
            f"a pooler is in between ({pooler.split(' (')[0]}) and {config.ENV_PREFIX}POOLER is "
            "none: set it to transaction if it pools by transaction (PgBouncer's pool_mode = "
            "transaction), to session otherwise (docs/scaling.md)"
        )
    if pooler is None and settings.pooler == "transaction":
        report.warn(
            f"{config.ENV_PREFIX}POOLER=transaction, but no pooler was detected: the timeouts "
            "then cost one set_config per transaction, which a direct connection does not need"
        )
    return server


def _pgpool_version(conn: Any, driver: drivers.Driver) -> str | None:
    """pgpool-II's version ("" if it does not say), or None: no pgpool-II in between.

    pgpool-II answers ``SHOW pool_version`` itself; PostgreSQL refuses it
    (42704). Over the extended query protocol (psycopg 3) pgpool-II 4.3
    answers with no row: then only its presence is known.
    """
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW pool_version")
            row = cur.fetchone() if cur.description else None
    except driver.Error:
        return None
    return str(row[0]).split()[0] if row else ""


def _sizing(
    report: Report,
    settings: config.Settings,
    server: Server,
    args: argparse.Namespace,
    environ: dict[str, str],
) -> None:
    report.section("Sizing")
    assumed = []
    processes = args.processes
    if processes is None:
        concurrency = environ.get("WEB_CONCURRENCY", "")
        processes = int(concurrency) if concurrency.isdigit() and int(concurrency) > 0 else 1
        assumed.append(
            "processes" + (" from WEB_CONCURRENCY" if concurrency.isdigit() else " = 1")
        )
    threads = args.threads
    if threads is None:
        threads = 1
        if settings.scope == "thread":
            assumed.append("threads = 1")
    per_process = {"thread": threads, "process": 1, "pool": settings.pool_size}[settings.scope]
    why = {
        "thread": f"{threads} thread(s) per process, one connection each",
        "process": "one connection per process",
        "pool": f"pool_size {settings.pool_size} per process",
    }[settings.scope]
    need = processes * per_process * args.hosts
    report.line(
        "connections needed",
        f"{processes} process(es) x {per_process} x {args.hosts} host(s) = {need}",
        f"scope {settings.scope}: {why}",
    )
    if assumed:
        missing = " and ".join(
            f"--{name}" for name in ("processes", "threads") if getattr(args, name) is None
        )
        report.line("assumed", ", ".join(assumed) + f": give {missing}")
    if settings.scope == "process" and threads > 1:
        report.fail(
            f"scope process with {threads} threads per process: the middleware refuses it (every "
            "request would answer 500): set WSGI_PGCONN_SCOPE=thread (or pool)"
        )
    if settings.scope == "pool" and args.threads is not None and settings.pool_size > threads:
        report.line(
            "note", f"pool_size {settings.pool_size} > {threads} threads: at most {threads} used"
        )
    available = server.available
    pgbouncer = server.pooler is not None and server.pgpool is None
    if pgbouncer:
        report.line(
            "behind PgBouncer",
            f"these {need} are client connections: they must fit PgBouncer's max_client_conn; "
            f"its pools (default_pool_size per database and user, plus reserve_pool_size) "
            f"must fit the server's {available}",
        )
        return
    for limit, what in (
        (server.role_limit, f"role {server.user}'s CONNECTION LIMIT"),
        (server.database_limit, f"database {server.database}'s CONNECTION LIMIT"),
    ):
        if 0 <= limit < need:
            report.fail(
                f"{need} connections needed, but {what} is {limit} (pg_roles.rolconnlimit, "
                "pg_database.datconnlimit): raise it, or use fewer connections"
            )
    if server.pgpool is not None:
        report.line(
            "behind pgpool-II",
            f"each of the {need} keeps a pgpool child and its backend: num_init_children must "
            "be at least that",
        )
    advice = (
        "put PgBouncer in front in transaction mode (docs/scaling.md, When to put PgBouncer "
        "in front), or use scope=pool with a smaller pool_size, fewer processes or threads, "
        "or raise max_connections"
    )
    if need > available:
        report.fail(
            f"{need} connections needed, but the server has {available} for applications "
            f"(max_connections {server.max_connections} minus {server.max_connections - available}"
            f" reserved): {advice}"
        )
        verdict = "does not fit"
    elif 2 * need > available:
        report.warn(
            f"{need} of {available} fit, but during a deploy old and new processes overlap: "
            f"{2 * need} would not; leave room (migrations, cron jobs, admin sessions too), or "
            + advice
        )
        verdict = "fits, but not twice (deploys)"
    else:
        verdict = "fits, twice over (deploys)"
        if need + server.in_use > available:
            report.warn(
                f"{server.in_use} connections are in use now (some may be this deployment's "
                f"own): with {need} more the server would have none left"
            )
    report.line("verdict", f"{need} of {available}: {verdict}")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """``python -m wsgi_pgconn check [options]``; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m wsgi_pgconn",
        description="wsgi_pgconn's command line",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    check = commands.add_parser(
        "check",
        help="check the configuration, the server, and the sizing",
        description=(__doc__ or "").split("\n\n")[0],
    )
    add_arguments(check)
    check.set_defaults(run=run)
    args = parser.parse_args(argv)
    runner: Callable[..., int] = args.run
    return runner(args, out=out)
