"""The Prometheus exporter under gunicorn with two sync workers (prometheus_client's
multiprocess mode): one scrape, answered by either worker, adds up both.

One worker is kept busy inside PostgreSQL (a request waiting for an advisory
lock the test holds), so that every other request goes to the other worker;
then the lock is released. Each worker has thus served a known share of the
requests, and no worker alone has the totals the scrape must show.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from _serverkit import server_env
from prometheus_client.parser import text_string_to_metric_families

from wsgi_pgconn.tooling.bench import servers

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
GUNICORN_CONF = """\
from wsgi_pgconn.prometheus import gunicorn_child_exit as child_exit  # noqa: F401
"""


@pytest.fixture(scope="module")
def metrics_tree() -> Iterator[str]:
    """The package, the application and a gunicorn configuration file, world-readable."""
    root = servers.stage([servers.package_dir(), str(HERE / "metrics_app.py")])
    Path(root, "gunicorn_conf.py").write_text(GUNICORN_CONF)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def multiproc_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="wsgi-pgconn-prometheus-")
    os.chmod(path, 0o777)  # noqa: S103 - the workers write their metric files there
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def scrape(port: int) -> dict[str, float]:
    """The samples of one scrape: ``name{label="v"}`` -> value."""
    status, headers, body = servers.http_get(port, "/metrics", timeout=30)
    assert status == 200, body[:300]
    assert headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def test_a_scrape_adds_up_both_workers(
    gunicorn_available: None,
    metrics_tree: str,
    multiproc_dir: str,
    app_dsn: Any,
    probe: Any,
    run_server: Any,
    pending: Any,
    pg: Any,
    servers_db: str,
) -> None:
    app_name = "metrics-" + os.urandom(4).hex()
    # PYTHONPATH: gunicorn reads its configuration file before it applies --pythonpath.
    extra = {"PROMETHEUS_MULTIPROC_DIR": multiproc_dir, "PYTHONPATH": metrics_tree}
    driver = os.environ.get("WSGI_PGCONN_DRIVER")
    if driver:
        extra["WSGI_PGCONN_DRIVER"] = driver
    server = run_server(
        servers.gunicorn_server(
            "metrics_app:application",
            workers=2,
            python_path=[metrics_tree],
            env=server_env(app_dsn(app_name), **extra),
            extra_args=["--config", str(Path(metrics_tree, "gunicorn_conf.py"))],
            name="gunicorn-metrics",
        ),
        app_name,
    )
    port = server.port
    locker = psycopg2.connect(pg.dsn(tcp=False, dbname=servers_db, application_name="locker"))
    locker.autocommit = True
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(4242)")
        blocked = pending(port)
        blocked.send("/block")
        probe.wait_for("a worker blocked on the lock", lambda: probe.waiting_on_lock(app_name) == 1)
        # The other worker serves everything else, one request at a time.
        answers = [servers.http_get(port, path, timeout=30) for path in ["/"] * 6 + ["/fail"] * 2]
        assert [status for status, _, _ in answers] == [200] * 6 + [500] * 2
        other = {body for _, _, body in answers}
        with locker.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(4242)")
        assert blocked.finish() == [200]
    finally:
        locker.close()
    (busy,) = {body_of(raw) for raw in blocked.done}
    assert len(other) == 1
    assert busy not in other  # two workers served: 1 request and 8 requests
    for _ in range(2):  # whichever worker answers, the same totals
        samples = scrape(port)
        assert samples["wsgi_pgconn_commits_total"] == 7
        assert samples["wsgi_pgconn_rollbacks_total"] == 2
        assert samples["wsgi_pgconn_commit_vetoes_total"] == 2
        assert samples["wsgi_pgconn_connections_opened_total"] == 2
        assert samples["wsgi_pgconn_connections_reused_total"] == 7
        assert samples["wsgi_pgconn_transaction_seconds_count"] == 9
        assert samples['wsgi_pgconn_connections_discarded_total{reason="dead"}'] == 0
        assert samples["wsgi_pgconn_connections_idle"] == 2  # livesum: one per worker
        assert samples["wsgi_pgconn_connections_in_use"] == 0
    assert probe.count(app_name) == 2
    server.stop()
    # Each worker removed its live gauges when it exited; the counters stay.
    left = sorted(os.listdir(multiproc_dir))
    assert not [name for name in left if name.startswith("gauge_livesum_")], left
    assert [name for name in left if name.startswith("counter_")], left
