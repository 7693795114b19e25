"""The launchers' own rules: a missing pooler fails under CI (naming the install script)."""

from __future__ import annotations

import pytest
import scaling_servers


@pytest.mark.parametrize("ci", ["1", ""])
def test_missing_pooler_fails_under_ci_else_skips(monkeypatch: pytest.MonkeyPatch, ci: str) -> None:
    monkeypatch.setattr(scaling_servers, "find_program", lambda name: None)
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match=r"bash \.ci/install-scaling\.sh"):
        scaling_servers.require_program("pgbouncer", "pgbouncer")


def test_free_ports_are_in_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSGI_PGCONN_PORT_RANGE", "24000-24009")
    ports = {scaling_servers.free_port() for _ in range(20)}
    assert ports <= set(range(24000, 24010))


def test_poll_gives_up_at_its_deadline() -> None:
    calls: list[int] = []
    with pytest.raises(TimeoutError, match="never"):
        scaling_servers.poll("never", lambda: calls.append(1), timeout=0.1, interval=0.01)
    assert 2 <= len(calls) <= 20
