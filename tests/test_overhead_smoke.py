"""Smoke test of ``benchmarks/overhead.py``: a few requests per cell, on the run's driver.

With valgrind installed the instruction counts run too (one child Python under
callgrind: tens of seconds, most of it Python starting under valgrind).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wsgi_pgconn import drivers

REPO = Path(__file__).resolve().parents[1]
DRIVER = drivers.resolve("auto")  # the run's driver (conftest.py)


@pytest.mark.slow
def test_overhead_benchmark_runs_and_counts(pg: Any, test_db: str, tmp_path: Path) -> None:
    out = tmp_path / "overhead.json"
    callgrind = shutil.which("valgrind") is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_PGCONN_")}
    env["DATABASE_URL"] = pg.dsn(dbname=test_db)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "overhead.py"),
            "--driver",
            DRIVER,
            "--requests",
            "100",
            "--repeat",
            "2",
            "--callgrind-requests",
            "10",
            "--json",
            str(out),
            *([] if callgrind else ["--no-callgrind"]),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: a target not met
    assert "How to read" in proc.stdout
    data = json.loads(out.read_text())
    assert data["driver"] == DRIVER
    assert data["round_trips"] == {
        "no query": {"bare": 0, "middleware": 0},
        "one query": {"bare": 3, "middleware": 2},  # BEGIN rides with the query
        "three queries": {"bare": 5, "middleware": 4},
    }
    for cell in data["wall_us"].values():
        assert len(cell["bare"]) == len(cell["middleware"]) == 2
    if not callgrind:
        assert data["instructions"] is None
        return
    counts = data["instructions"]
    assert counts is not None, data["callgrind"]
    # A request that queries runs the driver and libpq: many more instructions than one
    # that does not; three queries more than one; the middleware adds something.
    assert 0 < counts["no query"]["bare"] < counts["one query"]["bare"]
    assert counts["one query"]["bare"] < counts["three queries"]["bare"]
    for label in counts:
        assert counts[label]["middleware"] > counts[label]["bare"]
    assert "instructions added (three queries)" in proc.stdout
