#!/usr/bin/env bash
# Install the real servers and tools used by tests/servers/ and by
# `python -m wsgi_pgconn.bench`.  Idempotent: safe to run again.
#
#   Debian packages: apache2 apache2-dev (for mod_wsgi), wrk, pgbouncer,
#   python3-dev python3-venv
#   A virtualenv built from the distribution's /usr/bin/python3 (Python 3.11
#   on Debian 12; WSGI_PGCONN_SERVER_PYTHON names another) in a world-readable
#   place (default /opt/wsgi-pgconn-servers, override with
#   WSGI_PGCONN_SERVER_VENV) holding mod_wsgi, gunicorn, uWSGI, waitress,
#   gevent and psycogreen (and packaging, which gunicorn's gevent worker imports), flask, both drivers (psycopg2-binary, psycopg[binary]
#   and psycopg-pool), sqlalchemy, flask-sqlalchemy, django and prometheus-client.
#
# Why a separate venv: mod_wsgi-express run as root must drop to an
# unprivileged user (--user/--group), and that user cannot read a Python
# installed under /root (pyenv, mode 700).  wsgi_pgconn itself is NOT
# installed in the venv: the tests and the benchmark copy the working tree's
# package into a world-readable temporary folder and put it on the server's
# Python path, so they always exercise the code being tested.  The servers
# thus run on this venv's Python whatever Python runs the tests or the
# benchmark; the benchmark's header says which.
#
# The tests and the benchmark find the venv at $WSGI_PGCONN_SERVER_VENV, or
# at /opt/wsgi-pgconn-servers when that variable is unset.
set -euo pipefail

VENV="${WSGI_PGCONN_SERVER_VENV:-/opt/wsgi-pgconn-servers}"
PY="${WSGI_PGCONN_SERVER_PYTHON:-/usr/bin/python3}"
PIP_PACKAGES=(mod_wsgi gunicorn flask psycopg2-binary "psycopg[binary]>=3.2,<3.4" "psycopg-pool>=3.2"
              sqlalchemy flask-sqlalchemy django gevent psycogreen waitress uwsgi prometheus-client
              packaging)
APT_PACKAGES=(apache2 apache2-dev wrk pgbouncer python3-dev python3-venv)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-servers: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    # The tests and the benchmark start their own Apache and PgBouncer on
    # private ports; the distribution's services are not needed.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "install-servers: creating venv $VENV from $PY"
    $SUDO mkdir -p "$(dirname "$VENV")"
    $SUDO "$PY" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import mod_wsgi, gunicorn, flask, psycopg2, psycopg, psycopg_pool, sqlalchemy, flask_sqlalchemy, django, gevent, psycogreen, waitress, prometheus_client, packaging" 2>/dev/null \
   || [ ! -x "$VENV/bin/mod_wsgi-express" ] || [ ! -x "$VENV/bin/uwsgi" ]; then
    echo "install-servers: pip install ${PIP_PACKAGES[*]} into $VENV"
    # --no-cache-dir: a mod_wsgi that pip built earlier for another Python
    # (pyenv's, say) must not be reused: it is linked against that Python.
    $SUDO "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi

# The daemon user (www-data) must be able to read and run everything.
$SUDO chmod -R a+rX "$VENV"

echo "install-servers: ready: $VENV/bin/mod_wsgi-express, $VENV/bin/gunicorn, $(command -v wrk), $(command -v pgbouncer)"
echo "export WSGI_PGCONN_SERVER_VENV=$VENV"
