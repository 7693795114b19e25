#!/usr/bin/env bash
# The Django adapter's tests (tests/django) on the Django lines that the main
# venv does not run: Django 6.x needs Python 3.12+.  Each line gets a venv of
# its own with this checkout (editable) with both drivers, Django and the test
# tools: Django's backend (and so the adapter) runs on psycopg 3 there.
#
#   bash .ci/django-matrix.sh                  # every line below
#   WSGI_PGCONN_DJANGO_LINES="3.13:django>=6.0,<6.1" bash .ci/django-matrix.sh
#
# A line is PYTHON_VERSION:REQUIREMENT.  The interpreter is found under pyenv
# ($PYENV_ROOT/versions/<version>.*) or as python<version> on PATH; a missing
# one fails the run.  The venvs live outside the checkout (so that ruff and
# pytest never look into them), in $WSGI_PGCONN_DJANGO_VENVS (default
# ~/.cache/wsgi_pgconn/django-venvs), and are reused when already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

LINES="${WSGI_PGCONN_DJANGO_LINES:-3.12:django>=6.0,<7}"
VENVS="${WSGI_PGCONN_DJANGO_VENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/wsgi_pgconn/django-venvs}"
TEST_DEPS=(pytest webtest werkzeug)

find_python() {
    local version="$1" candidate
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python"$version" \
        "$(command -v "python$version" || true)"; do
        # (a pyenv shim on PATH exists but may refuse to run: try it)
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" -c "import sys" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

status=0
for line in $LINES; do
    version="${line%%:*}"
    requirement="${line#*:}"
    if ! python="$(find_python "$version")"; then
        echo "django-matrix: python$version not found (PATH or pyenv)" >&2
        exit 1
    fi
    venv="$VENVS/py$version"
    if [ ! -x "$venv/bin/python" ]; then
        echo "django-matrix: creating $venv from $python"
        "$python" -m venv "$venv"
    fi
    echo "django-matrix: installing '$requirement' and the test tools into $venv"
    "$venv/bin/pip" install -q -e '.[psycopg,psycopg2]' "$requirement" "${TEST_DEPS[@]}"
    "$venv/bin/python" -c "import django, sys; print('django-matrix: Python', sys.version.split()[0], 'Django', django.__version__)"
    "$venv/bin/python" -m pytest tests/django -q -p no:cacheprovider || status=$?
done
exit "$status"
