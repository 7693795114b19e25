"""Settings of ``manage.py check`` run as a subprocess by test_django_checks.py.

The test settings, with the adapter's app installed (so its checks are
registered before Django runs them) and a few values from the environment.
"""

import os
import sys

if os.environ.get("WSGI_PGCONN_DRIVER") == "psycopg2":
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # as tests/conftest.py does

from djtest_settings import *  # noqa: F403
from djtest_settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "wsgi_pgconn.django"]
WSGI_APPLICATION = os.environ.get("DJCHECK_WSGI") or None
if os.environ.get("DJCHECK_CONN_MAX_AGE"):
    DATABASES["default"]["CONN_MAX_AGE"] = int(os.environ["DJCHECK_CONN_MAX_AGE"])
if os.environ.get("DJCHECK_POOL"):
    DATABASES["default"]["OPTIONS"] = {"pool": True}
