"""The benchmark's rows, without running it: names, drivers, targets and the driver guard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsgi_pgconn.tooling.bench.runner import (
    Outcome,
    applicable_targets,
    format_table,
    select_variants,
)
from wsgi_pgconn.tooling.bench.variants import BY_NAME, TARGETS, VARIANTS

REPO = Path(__file__).resolve().parents[1]


def test_every_row_names_its_driver() -> None:
    for variant in VARIANTS:
        assert variant.driver in ("psycopg2", "psycopg"), variant
        assert variant.name.endswith({"psycopg2": "-pg2", "psycopg": "-pg3"}[variant.driver])
        if variant.server is None:
            assert BY_NAME[variant.upper_bound].driver == variant.driver
        elif variant.upper_bound in BY_NAME:  # a hand-held row under the same server
            assert BY_NAME[variant.upper_bound].server == variant.server
    for target in TARGETS:
        assert {target.row, *target.over} <= set(BY_NAME), target


def test_select_variants_by_name_and_pattern() -> None:
    assert select_variants("pgconn-thread-pg3,handheld-pg3") == (
        ["pgconn-thread-pg3", "handheld-pg3"],
        [],
    )
    names, unknown = select_variants("handheld-*,django-pool*")
    assert names == ["handheld-pg2", "handheld-pg3", "django-pool-pg3", "django-pool-atomic-pg3"]
    assert unknown == []
    assert select_variants("nothing-*,handheld-pg2")[1] == ["nothing-*"]
    assert select_variants("all")[0] == [v.name for v in VARIANTS]


def outcome(name: str, *rps: float) -> Outcome:
    o = Outcome(name, rps=list(rps), p50=[1.0] * len(rps), p99=[2.0] * len(rps))
    o.conns = [8] * len(rps)
    return o


def test_ratios_against_the_hand_held_row_of_the_same_driver_and_the_targets() -> None:
    outcomes = {
        "handheld-pg2": outcome("handheld-pg2", 1000, 1100, 1200),
        "handheld-pg3": outcome("handheld-pg3", 500, 510, 520),
        "pgconn-thread-pg2": outcome("pgconn-thread-pg2", 1300, 1320, 1400),
        "pgconn-thread-pg3": outcome("pgconn-thread-pg3", 480, 490, 530),
    }
    names = list(outcomes)
    loopback = format_table(outcomes, names).splitlines()
    row = next(line for line in loopback if line.startswith("pgconn-thread-pg3 "))
    assert row.endswith(f"{490 / 510:.2f} ~")  # against handheld-pg3, spreads overlap
    row = next(line for line in loopback if line.startswith("pgconn-thread-pg2 "))
    assert row.endswith(f"{1320 / 1100:.2f}")  # no overlap: a measured difference
    assert "  pgconn-thread-pg3 / handheld-pg3   0.961 ~  target >= 0.97: NOT met" in loopback
    assert "  pgconn-thread-pg2 / handheld-pg2   1.200    target >= 0.97: met" in loopback
    assert not any("1.15" in line for line in loopback)  # the latency targets: --rtt only
    latency = format_table(outcomes, names, rtt=0.001).splitlines()
    assert "  pgconn-thread-pg2 / handheld-pg2   1.200    target >= 1.15: met" in latency
    assert "  pgconn-thread-pg3 / handheld-pg3   0.961 ~  target >= 1.15: NOT met" in latency
    half = format_table(outcomes, names, rtt=0.0005)
    assert "(the target >= 1.15 is for --rtt 1ms)" in half
    assert all(t.latency is not False for t in applicable_targets(0.001))


def guard(driver: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WSGI_PGCONN_DRIVER": driver, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize(("driver", "other"), [("psycopg2", "psycopg"), ("psycopg", "psycopg2")])
def test_a_row_keeps_the_other_driver_out_of_its_process(driver: str, other: str) -> None:
    """What keeps Django on psycopg2 in a psycopg2 row although psycopg 3 is installed."""
    # In a process of its own: the psycopg2 leg of the suite hides psycopg 3 in this one.
    if guard("auto", "import psycopg, psycopg2").returncode:
        pytest.skip("needs both drivers installed")
    proc = guard(
        driver,
        "from wsgi_pgconn.tooling.bench.rowdriver import isolate\n"
        "print(isolate())\n"
        f"import {other}\n",
    )
    assert proc.stdout.strip() == driver
    assert f"import of {other} halted" in proc.stderr
    # too late once the other driver is imported: refused, not silently mixed
    proc = guard(
        driver,
        f"import {other}\nfrom wsgi_pgconn.tooling.bench.rowdriver import isolate\nisolate()\n",
    )
    assert proc.returncode != 0
    assert f"DriverMixed: {other} is already imported" in proc.stderr
