"""The application of test_metrics_server.py: wsgi_pgconn with the Prometheus exporter.

``/metrics`` the exporter (mounted outside the middleware); ``/health`` exempt,
no connection; ``/`` one query, committed; ``/fail`` one query and a 500
(rolled back); ``/block`` waits for advisory lock 4242 (held by the test).
Every response of the middleware's requests is the pid of the worker.
"""

from __future__ import annotations

import os
from typing import Any

from wsgi_pgconn import PgConnMiddleware, get_connection, prometheus

BLOCKING_LOCK = 4242


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path == "/health":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    with get_connection(environ).cursor() as cur:
        if path == "/block":
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (BLOCKING_LOCK,))
        else:
            cur.execute("SELECT 1")
    status = "500 Internal Server Error" if path == "/fail" else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


application = prometheus.mount(PgConnMiddleware(app, exempt_paths="/health"), "/metrics")
