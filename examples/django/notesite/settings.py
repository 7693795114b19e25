"""Settings of the notes example, from environment variables.

DATABASE_URL            postgresql://user:password@host:port/dbname (required)
DJANGO_SECRET_KEY       required unless DJANGO_DEBUG=1
DJANGO_DEBUG            1 for debug mode
DJANGO_ALLOWED_HOSTS    comma-separated, default "localhost,127.0.0.1"
WSGI_PGCONN_*           the middleware's settings (scope, pool size, ...), read by wsgi_pgconn
"""

import os

from django.core.exceptions import ImproperlyConfigured
from psycopg2.extensions import parse_dsn


def database_from_url(url: str) -> dict[str, object]:
    """DATABASES entry for a postgresql:// URL (or a libpq key=value string)."""
    params = parse_dsn(url)
    return {
        # Django's postgresql backend, joined to the request's connection and
        # transaction while wsgi_pgconn's middleware serves a request.
        "ENGINE": "wsgi_pgconn.django",
        "NAME": params.pop("dbname", ""),
        "USER": params.pop("user", ""),
        "PASSWORD": params.pop("password", ""),
        "HOST": params.pop("host", ""),
        "PORT": params.pop("port", ""),
        "OPTIONS": params,  # sslmode, application_name, ...: passed to libpq
    }


try:
    DATABASES = {"default": database_from_url(os.environ["DATABASE_URL"])}
except KeyError:
    raise ImproperlyConfigured(
        "set DATABASE_URL, e.g. postgresql://notes:secret@localhost/notes"
    ) from None

DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "insecure-development-key" if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("set DJANGO_SECRET_KEY (or DJANGO_DEBUG=1 for development)")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1").split(",")

# "wsgi_pgconn.django": the adapter's system checks (manage.py check) run.
INSTALLED_APPS = ["notes", "wsgi_pgconn.django"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "notesite.urls"
WSGI_APPLICATION = "notesite.wsgi.application"  # also what `manage.py runserver` serves
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django.request": {"handlers": ["console"], "level": "ERROR", "propagate": False},
        "notes": {"handlers": ["console"], "level": "INFO"},
        "wsgi_pgconn": {"handlers": ["console"], "level": "WARNING"},
    },
}
