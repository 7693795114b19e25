"""``python -m wsgi_pgconn check`` behind the real poolers: telling that one is in between.

PgBouncer hands its client a backend pid of its own making (its cancel key),
which is not the pid of the server process that runs the client's queries
(``pg_backend_pid()``); pgpool-II answers ``SHOW pool_version`` itself,
which PostgreSQL refuses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from scaling_names import APP_DB, CLIENT_USER, PGPOOL_ROLE
from test_check import check_env, line, run_check

pytestmark = pytest.mark.cluster_only("puts PgBouncer and pgpool-II in front of the cluster")


def test_pgbouncer_is_told_apart(bouncer_tx: Any) -> None:
    env = check_env(DATABASE_URL=bouncer_tx.dsn(APP_DB, CLIENT_USER))
    result = run_check("--processes", "4", "--threads", "8", env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert line(out, "pooler in between").startswith("PgBouncer, or another pooler")
    assert re.search(r"announced backend pid -?\d+, the server runs it in \d+", out)
    assert "WARNING: a pooler is in between (PgBouncer, or another pooler) and " \
        "WSGI_PGCONN_POOLER is none" in out
    assert line(out, "behind PgBouncer").startswith("these 32 are client connections")
    # Told that it is there, the check has nothing to say.
    result = run_check("--processes", "4", "--threads", "8", "--pooler", "transaction", env=env)
    assert result.returncode == 0
    assert result.stdout.endswith("\nVerdict\n  OK\n"), result.stdout


def test_pgpool_is_told_apart(pgpool: Any, test_db: str) -> None:
    env = check_env(DATABASE_URL=pgpool.dsn(test_db, PGPOOL_ROLE))
    result = run_check("--processes", "2", "--threads", "2", "--pooler", "session", env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.fullmatch(
        r"pgpool-II( \d+\.\d+\.\d+)? \(it answers SHOW pool_version\)",
        line(out, "pooler in between"),
    )
    assert line(out, "behind pgpool-II").startswith("each of the 4 keeps a pgpool child")


def test_a_direct_connection_is_not_mistaken_for_a_pooler(pg: Any, test_db: str) -> None:
    env = check_env(DATABASE_URL=pg.url(dbname=test_db))
    result = run_check("--pooler", "transaction", env=env)
    assert line(result.stdout, "pooler in between") == "none detected"
    assert "WSGI_PGCONN_POOLER=transaction, but no pooler was detected" in result.stdout


def test_quick_through_pgbouncer(bouncer_tx: Any) -> None:
    env = check_env(DATABASE_URL=bouncer_tx.dsn(APP_DB, CLIENT_USER))
    result = subprocess.run(
        [sys.executable, "-m", "wsgi_pgconn", "check", "--quick"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("ok: connected in ")
