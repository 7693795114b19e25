"""The database the benchmark runs against.

With ``DATABASE_URL`` unset (the default) a throwaway cluster from
:mod:`wsgi_pgconn.tooling.tempdb` is started: TCP with scram-sha-256 and a unix
socket with trust.  ``DATABASE_URL`` names a database the benchmark did not
create: it is used only when the caller says so (``--use-database-url``), and
then only the variants its connection string allows are run.  The benchmark
creates one table there (:data:`PAGE_TABLE`), refuses to touch one that is
already there, and drops it when done, also after Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2.extensions import make_dsn, parse_dsn

from wsgi_pgconn.tooling.bench.apps import PAGE_ROWS, PAGE_TABLE

MONITOR_NAME = "wsgi_pgconn_bench_monitor"
USE_DATABASE_URL_FLAG = "--use-database-url"


class DatabaseRefused(RuntimeError):
    """The benchmark will not run against this database (the message says why and what to do)."""


def masked(dsn: str) -> str:
    """``dsn`` as a libpq key=value string with any password replaced by ``********``."""
    try:
        params = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "<a connection string libpq cannot parse>"
    for secret in ("password", "sslpassword"):
        if secret in params:
            params[secret] = "********"
    result: str = make_dsn(**params)
    return result


def with_params(dsn: str, **params: str) -> str:
    """``dsn`` (key=value or URL) with ``params`` added, as a key=value string."""
    result: str = make_dsn(dsn, **params)
    return result


def is_unix(dsn: str) -> bool:
    host = str(parse_dsn(dsn).get("host", ""))
    return host == "" or host.startswith("/")


def server_address(dsn: str) -> tuple[str, int] | str:
    """Where ``dsn`` connects: ``(host, port)``, or the path of a unix socket.

    For the latency relay, which connects there in the client's stead.
    Raises ValueError for what a relay cannot stand in for (several hosts, a
    socket without a host naming its directory).
    """
    params = parse_dsn(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "")
    port = str(params.get("port") or "5432")
    if "," in host or "," in port or not port.isdigit():
        raise ValueError(f"--rtt needs a connection string with one host and port, not {host!r}")
    if host == "" or host.startswith("/"):
        if not host:
            raise ValueError("--rtt needs the host (socket directory) in the connection string")
        return f"{host}/.s.PGSQL.{port}"
    return host, int(port)


class BenchDatabase:
    """Connection strings for the variants, plus a monitor connection."""

    def __init__(
        self, tcp_dsn: str | None, unix_dsn: str | None, origin: str, cluster: Any = None
    ) -> None:
        self.tcp_dsn = tcp_dsn  # password authentication over TCP, or None
        self.unix_dsn = unix_dsn  # trust over the unix socket, or None
        self.origin = origin
        self.cluster = cluster
        self.created: list[str] = []  # tables this run created (and drops)
        self._monitor: psycopg2.extensions.connection | None = None

    @property
    def admin_dsn(self) -> str:
        dsn = self.unix_dsn or self.tcp_dsn
        assert dsn is not None
        return dsn

    @property
    def app_dsn(self) -> str:
        """What the persistent-connection variants use (TCP when there is one)."""
        return self.tcp_dsn or self.admin_dsn

    @property
    def os_user(self) -> str | None:
        """The OS user the throwaway cluster runs as (can enter its socket folder)."""
        user: str | None = getattr(self.cluster, "os_user", None)
        return user

    @property
    def target(self) -> str:
        """What is benchmarked, for people: the origin and the masked connection string."""
        return f"{self.origin}: {masked(self.admin_dsn)}"

    def prepare(self) -> None:
        """Create and fill the page's table; refuse a table of that name that is already there."""
        conn = psycopg2.connect(self.admin_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass(%s)", (PAGE_TABLE,))
                row = cur.fetchone()
                if row is not None and row[0] is not None:
                    raise DatabaseRefused(
                        f"the table {PAGE_TABLE} already exists in {self.target}; the benchmark "
                        "creates it and drops it when done, and does not touch one it did not "
                        f"create. If an earlier run left it behind: DROP TABLE {PAGE_TABLE}"
                    )
                cur.execute(
                    f"CREATE TABLE {PAGE_TABLE} (id integer PRIMARY KEY, name text NOT NULL)"
                )
                cur.execute(
                    f"INSERT INTO {PAGE_TABLE}"
                    " SELECT i, 'item ' || i FROM generate_series(1, %s) i",
                    (PAGE_ROWS,),
                )
            self.created.append(PAGE_TABLE)  # before COMMIT: an interrupt cannot lose it
            conn.commit()
        finally:
            conn.close()

    def drop_created(self) -> None:
        """Drop what :meth:`prepare` created (a fresh connection: the monitor may be gone)."""
        if not self.created:
            return
        conn = psycopg2.connect(with_params(self.admin_dsn, application_name=MONITOR_NAME))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for table in reversed(self.created):
                    cur.execute(f"DROP TABLE IF EXISTS {table}")
            self.created.clear()
        finally:
            conn.close()

    def server_version(self) -> str:
        """PostgreSQL's ``server_version``, e.g. ``15.14 (Debian 15.14-0+deb12u1)``."""
        conn = psycopg2.connect(with_params(self.admin_dsn, application_name=MONITOR_NAME))
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                row = cur.fetchone()
        finally:
            conn.close()
        return str(row[0]) if row else "unknown"

    def server_connections(self, application_name: str) -> int:
        """Client backends tagged ``application_name`` now connected to the database."""
        if self._monitor is None or self._monitor.closed:
            self._monitor = psycopg2.connect(
                with_params(self.admin_dsn, application_name=MONITOR_NAME)
            )
            self._monitor.autocommit = True
        with self._monitor.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND backend_type = 'client backend' AND datname = current_database()",
                (application_name,),
            )
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None


@contextlib.contextmanager
def open_database(
    log: Callable[[str], None],
    settings: dict[str, str] | None = None,
    *,
    use_database_url: bool = False,
) -> Iterator[BenchDatabase]:
    """Yield a prepared :class:`BenchDatabase`; ``log`` takes progress messages.

    ``settings`` are extra ``postgresql.conf`` settings of the throwaway cluster.
    ``DATABASE_URL`` is used only with ``use_database_url`` (else
    :class:`DatabaseRefused`); what the run created there is dropped on the
    way out, whatever the way out is.
    """
    url = os.environ.get("DATABASE_URL")
    cluster = None
    if url:
        if is_unix(url):
            db = BenchDatabase(None, url, "DATABASE_URL (unix socket)")
        else:
            db = BenchDatabase(url, None, "DATABASE_URL")
        if not use_database_url:
            raise DatabaseRefused(
                f"DATABASE_URL is set ({masked(url)}). The benchmark loads that server and "
                f"creates (then drops) a table {PAGE_TABLE} in that database; pass "
                f"{USE_DATABASE_URL_FLAG} to benchmark it, or unset DATABASE_URL to let the "
                "benchmark start a throwaway PostgreSQL of its own"
            )
        log(f"benchmarking {db.target} ({USE_DATABASE_URL_FLAG})")
    else:
        from wsgi_pgconn.tooling.tempdb import TemporaryCluster

        log("DATABASE_URL is unset: starting a throwaway PostgreSQL cluster")
        cluster = TemporaryCluster(settings=settings).start()
        db = BenchDatabase(
            cluster.dsn(tcp=True), cluster.dsn(tcp=False), "throwaway cluster", cluster
        )
    try:
        try:
            db.prepare()
            yield db
        finally:
            db.close()
            if cluster is None and db.created:
                db.drop_created()
                log(f"dropped {PAGE_TABLE} again")
    finally:
        if cluster is not None:
            cluster.cleanup()
