"""Smoke tests of ``python -m wsgi_pgconn.bench``: about a second of load on cheap variants.

Each test benchmarks a database of its own on the run's server, named by
DATABASE_URL with ``--use-database-url``, and checks that the benchmark left
nothing behind there. Every row fixes its driver (``-pg2``/``-pg3``); the
tests take the rows of the run's driver (WSGI_PGCONN_DRIVER), and the test of
the rows that exist for one driver only runs on the psycopg 3 leg.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from wsgi_pgconn import drivers
from wsgi_pgconn.tooling import TOOLING_ENVIRONMENT

REPO = Path(__file__).resolve().parents[1]
PAGE_TABLE = "wsgi_pgconn_bench_item"
# servers' venv, ports, bindir; and the run's driver
KEPT = (set(TOOLING_ENVIRONMENT) - {"WSGI_PGCONN_TEST_DSN"}) | {"WSGI_PGCONN_DRIVER"}
#: The driver of this run, and the suffix of its rows.
DRIVER = drivers.resolve(os.environ.get("WSGI_PGCONN_DRIVER") or "auto")
PG = {"psycopg2": "pg2", "psycopg": "pg3"}[DRIVER]
HANDHELD = f"handheld-{PG}"
THREAD = f"pgconn-thread-{PG}"
DJANGO_PGCONN = f"django-pgconn-{PG}"


@pytest.fixture
def bench_db(pg: Any) -> Iterator[str]:
    """A fresh database for one benchmark run; dropped afterwards."""
    name = "bench_smoke_" + uuid.uuid4().hex[:8]
    pg.create_database(name)
    try:
        yield name
    finally:
        admin(pg, None, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def admin(pg: Any, dbname: str | None, statement: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(pg.dsn(tcp=True, dbname=dbname, application_name="bench-smoke"))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def table_exists(pg: Any, dbname: str) -> bool:
    return admin(pg, dbname, f"SELECT to_regclass('{PAGE_TABLE}')") != [(None,)]


def bench_env(pg: Any, dbname: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_") or k in KEPT}
    env["DATABASE_URL"] = pg.dsn(tcp=True, dbname=dbname)
    env["PYTHONPATH"] = str(REPO)
    return env


def bench_argv(*extra: str, variants: str, duration: str = "1") -> list[str]:
    return [
        sys.executable,
        "-m",
        "wsgi_pgconn.bench",
        "--duration",
        duration,
        "--warmup",
        "0.3",
        "--variants",
        variants,
        *extra,
    ]


def run_bench(
    pg: Any,
    dbname: str,
    tmp_path: Path,
    *extra: str,
    variants: str = f"{HANDHELD},{THREAD},{DJANGO_PGCONN}",
    repeat: int = 1,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    argv = bench_argv(
        "--use-database-url", "--repeat", str(repeat), "--json", str(out), *extra, variants=variants
    )
    proc = subprocess.run(
        argv,
        cwd=REPO,
        env=bench_env(pg, dbname),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not table_exists(pg, dbname), "the benchmark left its table behind"
    return proc, json.loads(out.read_text())


def table_rows(stdout: str) -> dict[str, str]:
    """The table's lines by variant: after the header and its rule, up to the blank line."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert "req/s" in lines[header]
    assert "min-max" in lines[header]
    assert "x hand-held" in lines[header]
    rows: dict[str, str] = {}
    for line in lines[header + 2 :]:
        if not line.strip():
            break
        rows[line.split()[0]] = line
    return rows


def check(pg: Any, proc: subprocess.CompletedProcess[str], data: dict[str, Any]) -> None:
    rows = {r["variant"]: r for r in data["results"]}
    for name in (HANDHELD, THREAD):
        row = rows[name]
        assert row["failed"] is None, row
        assert row["skipped"] is None, row
        assert row["driver"] == DRIVER, row  # what the page said served it
        assert row["rps"] > 0, row
        assert row["errors"] == 0, row
        assert row["p50_ms"] > 0, row
        assert row["p99_ms"] >= row["p50_ms"], row
        assert row["server_connections"] >= 1, row
        assert row["rps_min"] <= row["rps"] <= row["rps_max"], row
    # the header says what was measured on
    out = proc.stdout
    assert f"client:   Python {data['environment']['client_python']['version']} " in out
    assert f"({sys.executable})" in out
    server = data["environment"]["server_python"]
    assert "servers:  " in out
    if server["executable"] != sys.executable:
        assert f"Python {server['version']} ({server['executable']})" in out
    assert "database: PostgreSQL " in out
    assert "(not created by the benchmark)" in out  # DATABASE_URL, said so
    machine = next(line for line in out.splitlines() if line.startswith("machine:  "))
    assert " CPUs" in machine
    assert "load average" in machine
    if data["server"] == "mod_wsgi":
        assert f"mod_wsgi {server['packages']['mod_wsgi']}" in out
    # the table: a header, a rule and one line per variant
    table = table_rows(out)
    assert set(table) == {HANDHELD, THREAD, DJANGO_PGCONN}
    assert table[HANDHELD].rstrip().endswith("1.00")  # its own ratio, never noise
    if rows[DJANGO_PGCONN]["skipped"]:
        assert "skipped: " in table[DJANGO_PGCONN]
    else:
        assert rows[DJANGO_PGCONN]["driver"] == DRIVER, rows[DJANGO_PGCONN]
    # the password in DATABASE_URL is never printed; the masked target is
    password = getattr(pg, "password", "")
    if password:
        assert password not in proc.stdout + proc.stderr
        assert "password=********" in proc.stderr


@pytest.mark.slow
def test_bench_fallbacks_werkzeug_python_load(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """The fallbacks that need nothing installed: werkzeug and the Python load generator."""
    proc, data = run_bench(pg, bench_db, tmp_path, "--server", "werkzeug", "--load", "python")
    assert data["server"] == "werkzeug"
    assert data["load"] == "python"
    assert "a thread per request" in proc.stdout
    assert "servers:  the client's Python; werkzeug " in proc.stdout
    assert "one run per variant: no spread" in proc.stdout
    check(pg, proc, data)


@pytest.mark.slow
def test_bench_default_server_and_load(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """Whatever is installed (mod_wsgi-express and wrk in CI); two repeats, so a spread."""
    proc, data = run_bench(pg, bench_db, tmp_path, repeat=2)
    if os.environ.get("CI"):
        assert data["server"] == "mod_wsgi", "run bash .ci/install-servers.sh"
        assert data["load"] == "wrk", "run bash .ci/install-servers.sh"
    check(pg, proc, data)
    rows = {r["variant"]: r for r in data["results"]}
    table = table_rows(proc.stdout)
    for name in (HANDHELD, THREAD):
        low, high = rows[name]["rps_min"], rows[name]["rps_max"]
        assert f"  {low:.0f}-{high:.0f}  " in table[name]
    hand, thread = rows[HANDHELD], rows[THREAD]
    overlap = thread["rps_min"] <= hand["rps_max"] and hand["rps_min"] <= thread["rps_max"]
    assert table[THREAD].rstrip().endswith(" ~") == overlap
    assert "A ratio marked ~ is" in proc.stdout


@pytest.mark.slow
def test_bench_pgbouncer_over_its_unix_socket(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """The servers' unprivileged user connects to PgBouncer's socket (trust) per request."""
    from wsgi_pgconn.tooling.bench.pgbouncer import INSTALL_HINT, pgbouncer_path

    if pgbouncer_path() is None:
        pytest.skip(INSTALL_HINT)
    proc, data = run_bench(pg, bench_db, tmp_path, variants="pgbouncer-pg2")
    (row,) = data["results"]
    assert row["failed"] is None, proc.stderr
    assert row["skipped"] is None, row
    assert row["errors"] == 0, proc.stderr
    assert row["rps"] > 0, row
    assert "unix socket" in row["label"]
    assert "PgBouncer " in proc.stdout  # its version, in the header


def test_database_url_needs_the_flag(pg: Any, bench_db: str) -> None:
    """A DATABASE_URL the benchmark did not create is named (masked) and refused."""
    proc = subprocess.run(
        bench_argv(variants=HANDHELD),
        cwd=REPO,
        env=bench_env(pg, bench_db),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "DATABASE_URL is set (" in proc.stderr
    assert f"dbname={bench_db}" in proc.stderr
    assert "--use-database-url" in proc.stderr
    assert proc.stdout == ""
    password = getattr(pg, "password", "")
    if password:
        assert password not in proc.stderr
        assert "password=********" in proc.stderr
    assert not table_exists(pg, bench_db)


def test_a_table_already_there_is_left_alone(pg: Any, bench_db: str) -> None:
    admin(pg, bench_db, f"CREATE TABLE {PAGE_TABLE} (mine text)")
    admin(pg, bench_db, f"INSERT INTO {PAGE_TABLE} VALUES ('keep me')")
    proc = subprocess.run(
        bench_argv("--use-database-url", variants=HANDHELD),
        cwd=REPO,
        env=bench_env(pg, bench_db),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"the table {PAGE_TABLE} already exists" in proc.stderr
    assert admin(pg, bench_db, f"SELECT mine FROM {PAGE_TABLE}") == [("keep me",)]


@pytest.mark.slow
def test_ctrl_c_drops_the_table_and_stops_the_servers(pg: Any, bench_db: str) -> None:
    """SIGINT in the middle of a run: exit 130, the table dropped, no server left connected."""
    proc = subprocess.Popen(
        bench_argv(
            "--use-database-url",
            "--server",
            "werkzeug",
            "--load",
            "python",
            variants=HANDHELD,
            duration="60",
        ),
        cwd=REPO,
        env=bench_env(pg, bench_db),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait until the page is being served under load: the server holds a connection.
        deadline = time.monotonic() + 90
        while not admin(
            pg,
            bench_db,
            f"SELECT 1 FROM pg_stat_activity WHERE application_name = 'bench_handheld_{PG}'",
        ):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the benchmark never started serving"
            time.sleep(0.1)
        assert table_exists(pg, bench_db)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr
    assert not table_exists(pg, bench_db)
    # The server was stopped: its backends leave as soon as they notice (poll, bounded).
    left = f"SELECT pid FROM pg_stat_activity WHERE application_name = 'bench_handheld_{PG}'"
    deadline = time.monotonic() + 15
    while admin(pg, bench_db, left):
        assert time.monotonic() < deadline, "the server's connections were left behind"
        time.sleep(0.05)


@pytest.mark.slow
def test_cpu_per_request_and_round_trips(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """``python -m wsgi_pgconn.tooling.bench.cpu``, a few requests; round trips through the relay.

    On the run's driver: the hand-held connection sends BEGIN, the three
    queries and COMMIT one at a time (5 turns); wsgi_pgconn and its Django
    adapter send BEGIN with the first query (4); Django in autocommit sends
    the three queries alone (3).
    """
    out = tmp_path / "cpu.json"
    names = [HANDHELD, THREAD, f"django-maxage-{PG}", DJANGO_PGCONN]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_pgconn.tooling.bench.cpu",
            "--use-database-url",
            "--variants",
            ",".join(names),
            "--requests",
            "30",
            "--batches",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "5",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=bench_env(pg, bench_db),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not table_exists(pg, bench_db), "the benchmark left its table behind"
    data = json.loads(out.read_text())
    for name in names:
        assert len(data["results"][name]["cpu"]) == 2
        assert all(us > 0 for us in data["results"][name]["cpu"])
        assert data["results"][name]["driver"] == DRIVER
        assert name in proc.stdout
    trips = {name: data["round_trips"][name]["per_request"] for name in names}
    assert trips == {HANDHELD: 5, THREAD: 4, f"django-maxage-{PG}": 3, DJANGO_PGCONN: 4}
    for name in names:
        first = data["round_trips"][name]["first"]
        assert first > trips[name], "the first request connects: startup and authentication"
        if DRIVER == "psycopg2":  # one simple-protocol query message per turn
            assert data["round_trips"][name]["messages_per_request"] == {"Q": trips[name]}


# -- the rows of issues 10 and 13, and --rtt ----------------------------------------------------

#: Rows that exist for one driver only, or fix another driver than the run's.
NEW_ROWS = (
    "psycopg-pool-pg3",
    "django-pool-atomic-pg3",
    "django-maxage-pg2",  # Django on psycopg2 although the servers have psycopg 3
    "fsa-pgconn-pg2",
    "gevent-pool-pg3",  # servers of their own: gunicorn's gevent worker, waitress
    "waitress-thread-pg2",
)


@pytest.mark.slow
def test_bench_rows_of_both_drivers(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """psycopg_pool, Django's pool, Django kept on psycopg2, Flask-SQLAlchemy, gevent, waitress.

    The rows fix their own drivers, so this runs once (on the psycopg 3 leg).
    A row whose server lacks a package is skipped with the install command.
    """
    if DRIVER != "psycopg":
        pytest.skip("the rows fix their own drivers: checked once, on the psycopg 3 leg")
    proc, data = run_bench(pg, bench_db, tmp_path, variants=",".join(NEW_ROWS))
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == list(NEW_ROWS)
    table = table_rows(proc.stdout)
    for name, row in rows.items():
        if row["skipped"]:
            assert "pip install" in row["skipped"] or "not found" in row["skipped"], row
            continue
        assert row["failed"] is None, proc.stderr
        assert row["errors"] == 0, proc.stderr
        assert row["rps"] > 0, row
        # what served the page: the row's driver (psycopg 3 kept out of the -pg2 servers)
        assert row["driver"] == {"pg2": "psycopg2", "pg3": "psycopg"}[name[-3:]], row
        assert table[name].split()[-1] == "-"  # no hand-held row of its driver in this run


@pytest.mark.slow
def test_bench_with_network_latency(pg: Any, bench_db: str, tmp_path: Path) -> None:
    """--rtt 1ms: the relay counts the round trips per request, and the latency is real."""
    variants = f"{HANDHELD},{THREAD},connect-unix-pg2"
    proc, data = run_bench(pg, bench_db, tmp_path, "--rtt", "1ms", variants=variants)
    assert data["rtt_ms"] == 1.0
    rows = {r["variant"]: r for r in data["results"]}
    assert "with --rtt every row reaches PostgreSQL over TCP" in rows["connect-unix-pg2"]["skipped"]
    for name, trips in ((HANDHELD, 5), (THREAD, 4)):
        row = rows[name]
        assert row["failed"] is None, proc.stderr
        assert row["errors"] == 0, proc.stderr
        # measured on the wire; requests cut by the end of the run blur it a little
        assert row["round_trips_per_request"] == pytest.approx(trips, abs=0.2), row
        assert row["p50_ms"] >= trips * 1.0, row  # each round trip waits 1 ms at least
        assert 0 < row["relay_cpu_share"] < 2, row
    relay = data["relay"]
    assert relay["rtt"] == 0.001
    assert relay["turns"] > 0
    assert relay["cpu_seconds"] > 0
    out = proc.stdout
    assert "rtt 1 ms (relay)" in out
    assert "network:  relay (rtt 1 ms): " in out
    header = next(line for line in out.splitlines() if line.startswith("variant "))
    assert "trips/req" in header
    assert "relay cpu" in header
    assert f"{THREAD} / {HANDHELD}" in out
    assert "target >= 1.15" in out
    targets = {(t["row"], t["over"]): t for t in data["targets"]}
    ratio = targets[(THREAD, HANDHELD)]["ratio"]
    assert ratio == pytest.approx(rows[THREAD]["rps"] / rows[HANDHELD]["rps"])
