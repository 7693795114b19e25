"""Metrics (issue 12): stats() of the pool, the observer hook, the Prometheus exporter in-process.

The exporter under gunicorn with two workers (prometheus_client's multiprocess
mode, a scrape that adds up both processes) is tests/servers/test_metrics_server.py.
Requests are held inside the application with events (Gate), never with sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from test_core_helpers import (  # noqa: F401 - the *_fixture names are pytest fixtures
    WAIT,
    Gate,
    backends,
    call,
    clean_env_fixture,
    deadline_poll,
    get_connection,
    log_records,
    query,
    stack,
    threads_fixture,
    wait_backends_gone,
    webtest,
)

from wsgi_pgconn import PgConnMiddleware, prometheus
from wsgi_pgconn.scopes import base

pytestmark = pytest.mark.usefixtures("clean_env")

HDRS = [("Content-Type", "text/plain")]


class App:
    """``/`` one query; ``/fail`` one query and a 500; ``/hold/<name>`` waits at a gate."""

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        self.lock = threading.Lock()

    def gate(self, name: str) -> Gate:
        with self.lock:
            return self.gates.setdefault(name, Gate())

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/nodb":
            start_response("200 OK", HDRS)
            return [b"no query"]
        with get_connection(environ).cursor() as cur:
            cur.execute("SELECT 1")
        if path.startswith("/hold/"):
            self.gate(path.rsplit("/", 1)[1]).pass_through()
        start_response("500 Internal Server Error" if path == "/fail" else "200 OK", HDRS)
        return [b"done"]


@pytest.fixture
def metrics() -> Iterator[tuple[prometheus.PrometheusObserver, CollectorRegistry]]:
    """The exporter's metrics on a registry of their own, reported to by every registry."""
    registry = CollectorRegistry()
    observer = prometheus.PrometheusObserver(registry)
    base.set_observer(observer)
    try:
        yield observer, registry
    finally:
        base.set_observer(None)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return found


# -- stats() ------------------------------------------------------------------------------------


def test_stats_report_the_pool_maximum_and_the_requests_waiting(make_mw: Any, threads: Any) -> None:
    app = App()
    outer, mw = stack(make_mw, app, scope="pool", pool_size=1, pool_timeout=30)
    pool = threads(3)
    holding = pool.submit(0, lambda: call(outer, "/hold/a"))
    assert app.gate("a").entered.wait(WAIT)
    assert (mw.stats()["pool_max"], mw.stats()["waiting"]) == (1, 0)
    waiters = [pool.submit(i, lambda: call(outer, "/")) for i in (1, 2)]
    deadline_poll(lambda: mw.stats()["waiting"] == 2, "two requests waiting")
    app.gate("a").go.set()
    assert [f.result(WAIT).status for f in (holding, *waiters)] == ["200 OK"] * 3
    stats = mw.stats()
    assert (stats["waiting"], stats["pool_waits"], stats["connect_backoffs"]) == (0, 2, 0)


@pytest.mark.parametrize("scope", ["thread", "process"])
def test_stats_of_other_scopes_have_no_pool_maximum(make_mw: Any, scope: str) -> None:
    outer, mw = stack(make_mw, App(), scope=scope)
    call(outer, "/", multithread=scope == "thread")
    assert (mw.stats()["pool_max"], mw.stats()["waiting"]) == (None, 0)


# -- the observer hook ---------------------------------------------------------------------------


def test_without_an_observer_the_registry_methods_are_its_own(make_mw: Any) -> None:
    """Nothing is added to a request's path unless an observer is installed."""
    outer, mw = stack(make_mw, App())
    call(outer, "/")
    registry = mw.registry
    assert "checkout" not in vars(registry)
    assert "checkin" not in vars(registry)
    base.set_observer(prometheus.PrometheusObserver(CollectorRegistry()))
    try:
        assert {"checkout", "checkin"} <= set(vars(registry))
        assert call(outer, "/").status == "200 OK"
    finally:
        base.set_observer(None)
    assert "checkout" not in vars(registry)
    assert registry.stats_counter.registry is None


class Failing:
    """An observer that raises everywhere: requests must not notice."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any) -> None:
            raise RuntimeError(f"observer {name} broke")

        return fail


def test_a_failing_observer_is_logged_and_ignored(make_mw: Any) -> None:
    outer, mw = stack(make_mw, App())
    base.set_observer(Failing())  # type: ignore[arg-type]
    try:
        with log_records() as records:
            assert [call(outer, p).status for p in ("/", "/fail", "/")] == [
                "200 OK",
                "500 Internal Server Error",
                "200 OK",
            ]
    finally:
        base.set_observer(None)
    assert (mw.stats()["commits"], mw.stats()["rollbacks"]) == (2, 1)
    failed = [r.getMessage() for r in records if "observer" in r.getMessage()]
    assert failed, "the observer's failures were not logged"
    assert all(" failed in " in m for m in failed)


# -- the Prometheus exporter, one process -----------------------------------------------------


def test_counters_follow_the_requests(
    metrics: Any, make_mw: Any, admin: Any, app_name: str
) -> None:
    _, registry = metrics
    outer, mw = stack(make_mw, App())
    for path in ("/", "/", "/fail", "/nodb", "/"):
        call(outer, path)
    (pid,) = [pid for pid, _ in backends(admin, app_name)]
    query(admin, "SELECT pg_terminate_backend(%s)", pid)
    wait_backends_gone(admin, [pid])
    call(outer, "/")  # finds its connection dead, opens another
    stats = mw.stats()
    assert (stats["commits"], stats["rollbacks"], stats["vetoes"]) == (4, 1, 1)
    seen = {
        name: value(registry, f"wsgi_pgconn_{name}_total")
        for name in (
            "commits",
            "rollbacks",
            "commit_vetoes",
            "connections_opened",
            "connections_reused",
        )
    }
    assert seen == {
        "commits": 4,
        "rollbacks": 1,
        "commit_vetoes": 1,
        "connections_opened": stats["opened"],
        "connections_reused": stats["reused"],
    }
    assert (stats["opened"], stats["reused"]) == (2, 4)
    discarded = "wsgi_pgconn_connections_discarded_total"
    assert value(registry, discarded, reason="dead") == 1
    assert value(registry, discarded, reason="too_old") == 0  # every reason is there
    assert value(registry, "wsgi_pgconn_transaction_seconds_count") == 5  # not /nodb
    assert value(registry, "wsgi_pgconn_transaction_seconds_sum") > 0
    assert value(registry, "wsgi_pgconn_connections_in_use") == 0
    assert value(registry, "wsgi_pgconn_connections_idle") == 1


def test_gauges_and_pool_waits(metrics: Any, make_mw: Any, threads: Any) -> None:
    _, registry = metrics
    app = App()
    outer, _ = stack(make_mw, app, scope="pool", pool_size=2, pool_timeout=0.3)
    pool = threads(3)
    held = [pool.submit(i, lambda i=i: call(outer, f"/hold/{i}")) for i in (0, 1)]
    for i in (0, 1):
        assert app.gate(str(i)).entered.wait(WAIT)
    assert value(registry, "wsgi_pgconn_connections_in_use") == 2
    assert value(registry, "wsgi_pgconn_pool_max") == 2
    # A third request waits, is counted as waiting, and times out (503).
    third = pool.submit(2, lambda: call(outer, "/"))
    deadline_poll(lambda: value(registry, "wsgi_pgconn_requests_waiting") == 1, "a waiting request")
    assert third.result(WAIT).status.startswith("503")
    assert value(registry, "wsgi_pgconn_requests_waiting") == 0
    assert value(registry, "wsgi_pgconn_pool_timeouts_total") == 1
    assert value(registry, "wsgi_pgconn_pool_wait_seconds_count") == 1
    assert value(registry, "wsgi_pgconn_pool_wait_seconds_sum") >= 0.3
    for i in (0, 1):
        app.gate(str(i)).go.set()
    assert [f.result(WAIT).status for f in held] == ["200 OK", "200 OK"]
    assert value(registry, "wsgi_pgconn_connections_in_use") == 0
    assert value(registry, "wsgi_pgconn_connections_idle") == 2


def test_mount_answers_the_metrics_outside_the_middleware(metrics: Any, make_mw: Any) -> None:
    _, registry = metrics
    mw = make_mw(App())
    wsgi = prometheus.mount(mw, "/internal/metrics", metrics=prometheus.metrics_app(registry))
    client = webtest.TestApp(wsgi)
    assert client.get("/").text == "done"
    text = client.get("/internal/metrics").text
    assert "wsgi_pgconn_commits_total 1.0" in text
    assert "wsgi_pgconn_connections_idle 1.0" in text
    client.get("/internal/metrics")
    assert mw.stats()["opened"] + mw.stats()["reused"] == 1  # scrapes took no connection
    assert client.get("/internal/metrics/x").text == "done"  # only the exact path
    with pytest.raises(ValueError, match="must start with '/'"):
        prometheus.mount(mw, "metrics")


def test_middleware_built_after_install_reports_too(metrics: Any, dsn: str) -> None:
    _, registry = metrics
    mw = PgConnMiddleware(App(), dsn=dsn, scope="pool", pool_size=3)
    try:
        call(mw, "/")
        assert value(registry, "wsgi_pgconn_commits_total") == 1
        assert value(registry, "wsgi_pgconn_pool_max") == 3
    finally:
        mw.close()


def test_install_once_per_process_and_uninstall(make_mw: Any) -> None:
    first = prometheus.install()
    try:
        assert prometheus.install() is first
        assert base._observer is first
        outer, mw = stack(make_mw, App())
        call(outer, "/")
        assert mw.registry.observer is first
    finally:
        prometheus.uninstall()
    assert mw.registry.observer is None
    assert "checkin" not in vars(mw.registry)
