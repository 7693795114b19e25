"""The database the benchmark runs against.

With ``DATABASE_URL`` unset (the default) a throwaway cluster from
:mod:`wsgi_pgconn.tooling.tempdb` is started: TCP with scram-sha-256 and a unix
socket with trust.  With ``DATABASE_URL`` set, that database is used and
only the variants its connection string allows are run.
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


def with_params(dsn: str, **params: str) -> str:
    """``dsn`` (key=value or URL) with ``params`` added, as a key=value string."""
    result: str = make_dsn(dsn, **params)
    return result


def is_unix(dsn: str) -> bool:
    host = str(parse_dsn(dsn).get("host", ""))
    return host == "" or host.startswith("/")


class BenchDatabase:
    """Connection strings for the variants, plus a monitor connection."""

    def __init__(
        self, tcp_dsn: str | None, unix_dsn: str | None, origin: str, cluster: Any = None
    ) -> None:
        self.tcp_dsn = tcp_dsn  # password authentication over TCP, or None
        self.unix_dsn = unix_dsn  # trust over the unix socket, or None
        self.origin = origin
        self.cluster = cluster
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

    def prepare(self) -> None:
        """Create and fill the page's table (idempotent)."""
        conn = psycopg2.connect(self.admin_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE TABLE IF NOT EXISTS {PAGE_TABLE}"
                    " (id integer PRIMARY KEY, name text NOT NULL)"
                )
                cur.execute(
                    f"INSERT INTO {PAGE_TABLE} SELECT i, 'item ' || i"
                    " FROM generate_series(1, %s) i ON CONFLICT (id) DO NOTHING",
                    (PAGE_ROWS,),
                )
            conn.commit()
        finally:
            conn.close()

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
    log: Callable[[str], None], settings: dict[str, str] | None = None
) -> Iterator[BenchDatabase]:
    """Yield a prepared :class:`BenchDatabase`; ``log`` takes progress messages.

    ``settings`` are extra ``postgresql.conf`` settings of the throwaway cluster.
    """
    url = os.environ.get("DATABASE_URL")
    cluster = None
    if url:
        if is_unix(url):
            db = BenchDatabase(None, url, "DATABASE_URL (unix socket)")
        else:
            db = BenchDatabase(url, None, "DATABASE_URL")
    else:
        from wsgi_pgconn.tooling.tempdb import TemporaryCluster

        log("DATABASE_URL is unset: starting a throwaway PostgreSQL cluster")
        cluster = TemporaryCluster(settings=settings).start()
        db = BenchDatabase(
            cluster.dsn(tcp=True), cluster.dsn(tcp=False), "throwaway cluster", cluster
        )
    try:
        db.prepare()
        yield db
    finally:
        db.close()
        if cluster is not None:
            cluster.cleanup()
