#!/usr/bin/env bash
# The test suite on Python 3.13 too (the main run uses the machine's python3).
#
#   bash .ci/python313.sh             # python3.13 from pyenv or PATH
#   bash .ci/python313.sh 3.12        # another line
#
# The core suite only: tests/servers, tests/scaling and the benchmark's smoke
# tests run the real servers and the poolers, whose Python is the servers'
# venv (.ci/install-servers.sh), not this one, and the main run covers them.
# The venv lives outside the checkout, in $XDG_CACHE_HOME/wsgi_pgconn/pyX.Y
# (~/.cache/...), and is reused.
#
# CPython 3.13.0 to 3.13.5 print "Exception ignored in: <function
# _DeleteDummyThreadOnDel.__del__ ...>" tracebacks at exit (gh-130522, fixed
# in 3.13.6); tests/conftest.py keeps them from appearing, and this script
# fails if one does.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${1:-3.13}"
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/wsgi_pgconn/py$VERSION"

find_python() {
    local candidate
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$VERSION".*/bin/python"$VERSION" \
        "$(command -v "python$VERSION" || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c "import sys" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! python="$(find_python)"; then
    echo "python$VERSION: not found (pyenv or PATH)" >&2
    exit 1
fi
echo "python$VERSION: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# One driver here (psycopg 3, what a new project uses); the main run covers both.
WSGI_PGCONN_DRIVER="${WSGI_PGCONN_DRIVER:-psycopg}" \
    ./dev --no-servers --python "$python" --venv "$VENV" test -q -p no:cacheprovider \
    --ignore=tests/servers --ignore=tests/scaling --ignore=tests/test_bench_smoke.py \
    2>&1 | tee "$log" || status=$?
if grep -q "_DeleteDummyThreadOnDel" "$log"; then
    echo "python$VERSION: the _DeleteDummyThreadOnDel tracebacks are back (see tests/conftest.py)" >&2
    status=1
fi
exit "$status"
