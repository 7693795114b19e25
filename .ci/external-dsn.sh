#!/usr/bin/env bash
# The test suite against "the user's own server" (WSGI_PGCONN_TEST_DSN), twice.
#
#   bash .ci/external-dsn.sh                 # the whole suite, then a short second run
#   bash .ci/external-dsn.sh tests/test_config.py ...   # these, twice
#
# Stands in for the user's server with a PostgreSQL started by hand
# (python -m wsgi_pgconn.tempdb, without pg_stat_statements, as a plain
# server would be). Checks that the runs pass (the tests that need the suite's
# own cluster skip, saying why), that the second run works after the first
# (no database left behind to collide with), and that no database or role of
# the suite is left on the server at the end. Uses the virtualenv of ./dev.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "external-dsn: run ./dev setup first" >&2
    exit 1
fi
if [ $# -gt 0 ]; then
    first=("$@")
    second=("$@")
else
    first=(tests)
    # What creates and drops the suite's databases and roles, and what skips.
    second=(tests/test_middleware.py tests/test_liveness.py tests/test_config.py
            tests/servers/test_real_servers.py tests/django/test_django_lifecycle.py)
fi

work="$(mktemp -d)"
"$PY" -m wsgi_pgconn.tempdb >"$work/url" 2>"$work/log" &
cluster=$!
cleanup() {
    kill -INT "$cluster" 2>/dev/null || true  # it stops and deletes the cluster
    wait "$cluster" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

for _ in $(seq 1 600); do  # the cluster prints its URL within a few seconds
    if grep -q '^DATABASE_URL=' "$work/url"; then break; fi
    if ! kill -0 "$cluster" 2>/dev/null; then cat "$work/log" >&2; exit 1; fi
    sleep 0.1
done
url="$(sed -n 's/^DATABASE_URL=//p' "$work/url")"
if [ -z "$url" ]; then
    echo "external-dsn: the cluster did not start:" >&2
    cat "$work/log" >&2
    exit 1
fi

run() {
    local what="$1"
    shift
    echo "external-dsn: $what: WSGI_PGCONN_TEST_DSN=<a server started by hand> python -m pytest $*"
    WSGI_PGCONN_TEST_DSN="$url" "$PY" -m pytest -q -p no:cacheprovider -rs "$@" | tee "$work/out"
    if ! grep -q "WSGI_PGCONN_TEST_DSN is set" "$work/out"; then
        echo "external-dsn: no test said it skipped because of WSGI_PGCONN_TEST_DSN" >&2
        return 1
    fi
}
run "first run" "${first[@]}"
run "second run" "${second[@]}"

left="$("$PY" - "$url" <<'EOF'
import sys

import psycopg2

conn = psycopg2.connect(sys.argv[1])
with conn.cursor() as cur:
    cur.execute(
        "SELECT 'database ' || datname FROM pg_database"
        " WHERE datname NOT IN ('postgres', 'template0', 'template1')"
        " UNION ALL SELECT 'role ' || rolname FROM pg_roles"
        " WHERE rolname <> 'postgres' AND rolname NOT LIKE 'pg\\_%'"
    )
    print(", ".join(row[0] for row in cur.fetchall()))
conn.close()
EOF
)"
if [ -n "$left" ]; then
    echo "external-dsn: left behind on the server: $left" >&2
    exit 1
fi
echo "external-dsn: both runs passed; nothing left behind on the server"
