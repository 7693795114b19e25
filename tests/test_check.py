"""``python -m wsgi_pgconn check`` (issue 12), run as an operator runs it: a subprocess,
with an environment of its own, against the run's server.

The pooler tell (PgBouncer, pgpool-II) is tested against the real poolers in
tests/scaling/test_scaling_check.py, the standby in tests/scaling/test_scaling_failover.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
from test_core_helpers import query

from wsgi_pgconn.tooling.ports import free_port

SECRET_PARTS = ("Sw0rd", "f1sh-check")


def check_env(**extra: str) -> dict[str, str]:
    """Our environment without database settings (the run's driver kept), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WSGI_PGCONN_", "PG", "PYTEST_")) and k != "DATABASE_URL"
    }
    driver = os.environ.get("WSGI_PGCONN_DRIVER")
    if driver:
        env["WSGI_PGCONN_DRIVER"] = driver
    env.update(extra)
    return env


def run_check(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsgi_pgconn", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def line(output: str, label: str) -> str:
    """The value (and its [note]) of the line labelled ``label``."""
    match = re.search(rf"^  {re.escape(label)} +(.*)$", output, re.MULTILINE)
    assert match is not None, f"no {label!r} line in:\n{output}"
    return match.group(1)


@pytest.fixture
def server_facts(admin: Any) -> dict[str, Any]:
    (row,) = query(
        admin,
        "SELECT current_setting('server_version'), current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int",
    )
    version, max_connections, reserved = row
    return {"version": version, "max": max_connections, "available": max_connections - reserved}


@pytest.fixture
def limited_role(pg: Any, test_db: str) -> Iterator[tuple[str, str]]:
    """A role with a password and CONNECTION LIMIT 2: (name, password)."""
    name = "check_" + uuid.uuid4().hex[:8]
    password = "".join(SECRET_PARTS)
    conn = psycopg2.connect(pg.dsn(dbname=test_db))
    conn.autocommit = True
    try:
        query(conn, f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 2 PASSWORD '{password}'")
        yield name, password
        query(conn, f"DROP ROLE {name}")
    finally:
        conn.close()


def test_settings_sources_and_the_server(
    pg: Any, test_db: str, limited_role: tuple[str, str], server_facts: dict[str, Any]
) -> None:
    user, password = limited_role
    env = check_env(
        DATABASE_URL=pg.url(dbname=test_db, user=user, password=password),
        WSGI_PGCONN_STATEMENT_TIMEOUT="010",
        WSGI_PGCONN_MAX_AGE="10min",
    )
    result = run_check("--scope", "pool", "--pool-size", "2", "--processes", "1", env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert password not in out + result.stderr
    # Settings: the effective values, and where each came from.
    dsn = line(out, "dsn")
    assert "password=********" in dsn
    assert dsn.endswith("[environment (DATABASE_URL)]")
    assert line(out, "statement_timeout") == "10 ms   [environment (WSGI_PGCONN_STATEMENT_TIMEOUT)]"
    assert line(out, "max_age") == "600 s   [environment (WSGI_PGCONN_MAX_AGE)]"
    assert line(out, "scope") == "pool   [argument]"
    assert line(out, "pool_size") == "2   [argument]"
    assert line(out, "reset") == "rollback   [default]"
    # The server, as it reports itself.
    assert line(out, "server") == f"PostgreSQL {server_facts['version']}"
    assert line(out, "role, database") == f"{user}, {test_db}"
    assert line(out, "standby") == "no"
    assert line(out, "connections").startswith(
        f"max_connections {server_facts['max']} - "
    )
    assert f"= {server_facts['available']} for applications" in line(out, "connections")
    assert line(out, "connection limits") == f"role {user}: 2"
    assert line(out, "pooler in between") == "none detected"
    connect = line(out, "connect")
    assert re.fullmatch(r"[0-9.]+ ms   \[as the middleware opens a connection\]", connect)
    assert re.fullmatch(r"[0-9.]+ ms   \[SELECT 1\]", line(out, "round trip"))
    # Sizing: 1 process x pool_size 2 x 1 host, within the role's limit of 2.
    assert line(out, "connections needed").startswith("1 process(es) x 2 x 1 host(s) = 2")
    assert out.endswith("\nVerdict\n  OK\n")


def test_a_role_connection_limit_fails_the_sizing(
    pg: Any, test_db: str, limited_role: tuple[str, str]
) -> None:
    user, password = limited_role
    env = check_env(DATABASE_URL=pg.url(dbname=test_db, user=user, password=password))
    result = run_check("--processes", "2", "--threads", "2", env=env)
    assert result.returncode == 1, result.stdout
    assert f"FAIL: 4 connections needed, but role {user}'s CONNECTION LIMIT is 2" in result.stdout


def test_too_many_connections_fail_with_the_advice(
    pg: Any, test_db: str, server_facts: dict[str, Any]
) -> None:
    available = server_facts["available"]
    env = check_env(DATABASE_URL=pg.url(dbname=test_db))
    result = run_check("--processes", str(available), "--threads", "2", "--hosts", "1", env=env)
    assert result.returncode == 1, result.stdout
    out = result.stdout
    need = available * 2
    assert f"FAIL: {need} connections needed, but the server has {available} for" in out
    assert "put PgBouncer in front in transaction mode" in out
    assert line(out, "verdict") == f"{need} of {available}: does not fit"


def test_no_room_for_a_deploy_is_a_warning(
    pg: Any, test_db: str, server_facts: dict[str, Any]
) -> None:
    available = server_facts["available"]
    processes = available // 2 + 1  # fits once, not twice
    env = check_env(DATABASE_URL=pg.url(dbname=test_db))
    result = run_check("--processes", str(processes), "--threads", "1", env=env)
    assert result.returncode == 0, result.stdout
    assert "WARNING: " in result.stdout
    assert "during a deploy old and new processes overlap" in result.stdout
    verdict = f"{processes} of {available}: fits, but not twice (deploys)"
    assert line(result.stdout, "verdict") == verdict


def test_process_scope_with_threads_fails(pg: Any, test_db: str) -> None:
    """The middleware refuses scope=process on a multithreaded server: so does the check."""
    env = check_env(DATABASE_URL=pg.url(dbname=test_db), WSGI_PGCONN_SCOPE="process")
    result = run_check("--threads", "4", env=env)
    assert result.returncode == 1, result.stdout
    assert "FAIL: scope process with 4 threads per process" in result.stdout
    assert "set WSGI_PGCONN_SCOPE=thread (or pool)" in result.stdout
    assert line(result.stdout, "assumed").endswith(": give --processes")
    assert run_check("--threads", "1", "--processes", "2", env=env).returncode == 0


def test_processes_from_web_concurrency(pg: Any, test_db: str) -> None:
    env = check_env(DATABASE_URL=pg.url(dbname=test_db), WEB_CONCURRENCY="3")
    result = run_check("--threads", "2", env=env)
    assert line(result.stdout, "connections needed").startswith("3 process(es) x 2 x 1 host(s) = 6")
    assert line(result.stdout, "assumed").startswith("processes from WEB_CONCURRENCY")


def test_without_database_url_the_pg_variables_are_shown_masked(pg: Any, test_db: str) -> None:
    env = check_env(
        PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user, PGPASSWORD=pg.password,
        PGDATABASE=test_db,
    )  # fmt: skip
    result = run_check("--processes", "1", "--threads", "1", env=env)
    assert result.returncode == 0, result.stdout
    dsn = line(result.stdout, "dsn")
    assert dsn.startswith("(unset: libpq's PG* variables: PGHOST=")
    assert "PGPASSWORD=********" in dsn
    assert pg.password not in result.stdout
    assert line(result.stdout, "role, database").endswith(f", {test_db}")


# -- failures ------------------------------------------------------------------------------------


def test_configuration_errors_fail_naming_the_variable() -> None:
    env = check_env(DATABASE_URL="postgresql+psycopg2://app:x@db/app")
    result = run_check(env=env)
    assert result.returncode == 1
    assert "FAIL: configuration: DATABASE_URL uses the URL scheme postgresql+psycopg2://" in (
        result.stdout
    )
    env = check_env(WSGI_PGCONN_POOL_TIMEOUT="soon")
    result = run_check("--quick", env=env)
    assert (result.returncode, result.stdout.count("\n")) == (1, 1)
    assert result.stdout.startswith("FAIL: configuration: WSGI_PGCONN_POOL_TIMEOUT='soon'")


def test_unknown_names_warn_and_strict_fails(pg: Any, test_db: str) -> None:
    misspelt = "WSGI_PGCONN_" + "POOLSIZE"
    env = check_env(DATABASE_URL=pg.url(dbname=test_db), **{misspelt: "8"})
    result = run_check("--processes", "1", "--threads", "1", env=env)
    assert result.returncode == 0
    assert f"WARNING: unknown wsgi_pgconn setting(s), ignored: {misspelt} (did you mean " \
        "WSGI_PGCONN_POOL_SIZE?)" in result.stdout
    result = run_check("--strict", "on", env=env)
    assert result.returncode == 1
    assert f"FAIL: configuration: unknown wsgi_pgconn setting(s): {misspelt}" in result.stdout


def test_quick_is_a_readiness_probe(pg: Any, test_db: str) -> None:
    result = run_check("--quick", env=check_env(DATABASE_URL=pg.url(dbname=test_db)))
    assert result.returncode == 0, result.stdout
    assert re.fullmatch(r"ok: connected in [0-9.]+ ms, SELECT 1 in [0-9.]+ ms\n", result.stdout)
    secret = "".join(SECRET_PARTS)
    result = run_check(
        "--quick", env=check_env(DATABASE_URL=pg.url(dbname=test_db, password=secret))
    )
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL: cannot connect: ")
    assert "password authentication failed" in result.stdout
    assert secret not in result.stdout + result.stderr
    down = f"postgresql://u:{secret}@127.0.0.1:{free_port()}/db?connect_timeout=2"
    result = run_check("--quick", env=check_env(DATABASE_URL=down))
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL: cannot connect: ")
    assert secret not in result.stdout + result.stderr


def test_a_full_check_that_cannot_connect_fails(pg: Any, test_db: str) -> None:
    secret = "".join(SECRET_PARTS)
    env = check_env(DATABASE_URL=pg.url(dbname=test_db, password=secret))
    result = run_check(env=env)
    assert result.returncode == 1
    assert line(result.stdout, "connect") == "failed"
    assert "FAIL: cannot connect: " in result.stdout
    assert "Sizing" not in result.stdout
    assert secret not in result.stdout + result.stderr


def test_usage_errors_exit_2() -> None:
    result = run_check("--processes", "0", env=check_env())
    assert result.returncode == 2
    assert "must be 1 or more" in result.stderr
