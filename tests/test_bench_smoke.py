"""Smoke test of ``python -m wsgi_pgconn.bench``: about a second of load on two cheap variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(
    pg: Any,
    tmp_path: Path,
    *extra: str,
    variants: str = "handheld,pgconn-thread,django-pgconn",
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env["DATABASE_URL"] = pg.dsn(tcp=True)
    env["PYTHONPATH"] = str(REPO)
    if "WSGI_PGCONN_SERVER_VENV" in os.environ:  # where the real servers are
        env["WSGI_PGCONN_SERVER_VENV"] = os.environ["WSGI_PGCONN_SERVER_VENV"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_pgconn.bench",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--repeat",
            "1",
            "--variants",
            variants,
            "--json",
            str(out),
            *extra,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def check(pg: Any, proc: subprocess.CompletedProcess[str], data: dict[str, Any]) -> None:
    rows = {r["variant"]: r for r in data["results"]}
    for name in ("handheld", "pgconn-thread"):
        row = rows[name]
        assert row["failed"] is None, row
        assert row["skipped"] is None, row
        assert row["rps"] > 0, row
        assert row["errors"] == 0, row
        assert row["p50_ms"] > 0, row
        assert row["p99_ms"] >= row["p50_ms"], row
        assert row["server_connections"] >= 1, row
    # the table: a header, a rule and one line per variant
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert "req/s" in lines[header]
    assert "x hand-held" in lines[header]
    table = {line.split()[0]: line for line in lines[header + 2 :] if line.strip()}
    assert set(table) == {"handheld", "pgconn-thread", "django-pgconn"}
    assert table["handheld"].rstrip().endswith("1.00")  # its own ratio
    if rows["django-pgconn"]["skipped"]:
        assert "skipped: " in table["django-pgconn"]
    # the password in DATABASE_URL is never printed
    password = getattr(pg, "password", "")
    if password:
        assert password not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_bench_fallbacks_werkzeug_python_load(pg: Any, tmp_path: Path) -> None:
    """The fallbacks that need nothing installed: werkzeug and the Python load generator."""
    proc, data = run_bench(pg, tmp_path, "--server", "werkzeug", "--load", "python")
    assert data["server"] == "werkzeug"
    assert data["load"] == "python"
    assert "a thread per request" in proc.stdout
    check(pg, proc, data)


@pytest.mark.slow
def test_bench_default_server_and_load(pg: Any, tmp_path: Path) -> None:
    """Whatever is installed (mod_wsgi-express and wrk in CI)."""
    proc, data = run_bench(pg, tmp_path)
    if os.environ.get("CI"):
        assert data["server"] == "mod_wsgi", "run bash .ci/install-servers.sh"
        assert data["load"] == "wrk", "run bash .ci/install-servers.sh"
    check(pg, proc, data)


@pytest.mark.slow
def test_bench_pgbouncer_over_its_unix_socket(pg: Any, tmp_path: Path) -> None:
    """The servers' unprivileged user connects to PgBouncer's socket (trust) per request."""
    from wsgi_pgconn.tooling.bench.pgbouncer import INSTALL_HINT, pgbouncer_path

    if pgbouncer_path() is None:
        pytest.skip(INSTALL_HINT)
    proc, data = run_bench(pg, tmp_path, variants="pgbouncer")
    (row,) = data["results"]
    assert row["failed"] is None, proc.stderr
    assert row["skipped"] is None, row
    assert row["errors"] == 0, proc.stderr
    assert row["rps"] > 0, row
    assert "unix socket" in row["label"]


@pytest.mark.slow
def test_cpu_per_request_and_round_trips(tmp_path: Path) -> None:
    """``python -m wsgi_pgconn.tooling.bench.cpu`` on its own throwaway cluster, a few requests."""
    out = tmp_path / "cpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env.pop("DATABASE_URL", None)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsgi_pgconn.tooling.bench.cpu",
            "--variants",
            "django-maxage,django-pgconn",
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
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    for name in ("django-maxage", "django-pgconn"):
        assert len(data["results"][name]["cpu"]) == 2
        assert all(us > 0 for us in data["results"][name]["cpu"])
    trips = data["round_trips"]
    # Django in autocommit: the three queries. The adapter: BEGIN, the three, COMMIT,
    # and no setup statement once the connection is prepared.
    assert trips["django-maxage"]["per_request"] == 3
    assert trips["django-pgconn"]["per_request"] == 5
    last = trips["django-pgconn"]["last_request"]
    assert last[0] == "BEGIN"
    assert last[-1] == "COMMIT"
    assert "django-pgconn" in proc.stdout
