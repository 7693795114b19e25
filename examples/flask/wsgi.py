"""WSGI entry point of the Flask example, for real servers.

    mod_wsgi-express start-server examples/flask/wsgi.py ...
    gunicorn --chdir examples/flask wsgi:application

Configuration comes from the environment (DATABASE_URL, WSGI_PGCONN_SCOPE,
WSGI_PGCONN_POOL_SIZE, ...) or, under mod_wsgi, from SetEnv / --setenv.
Create the table once first: ``flask --app examples/flask/app.py init-db``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import app as application

__all__ = ["application"]
