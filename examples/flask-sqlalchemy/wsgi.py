"""WSGI entry point of the Flask-SQLAlchemy example, for real servers.

    gunicorn --chdir examples/flask-sqlalchemy --worker-class gthread --threads 4 wsgi:application
    mod_wsgi-express start-server examples/flask-sqlalchemy/wsgi.py ...

Configuration comes from the environment (DATABASE_URL, WSGI_PGCONN_SCOPE,
...). Create the table once first: ``flask --app examples/flask-sqlalchemy/app.py init-db``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import create_app

application = create_app()

__all__ = ["application"]
