"""Django settings of the adapter's tests (tests/django); conftest.py fills in the server.

``NAME`` is the name the test runner derives the test databases from
(``test_wsgi_pgconn_django``...); the databases themselves are created and
dropped by Django's test runner in conftest.py.
"""

SECRET_KEY = "wsgi-pgconn-django-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django.contrib.contenttypes", "djtest_app"]
MIDDLEWARE = ["djtest_app.middleware.FaultMiddleware"]
ROOT_URLCONF = "djtest_app.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_SERVER = {"HOST": "", "PORT": "", "USER": "", "PASSWORD": ""}  # set by conftest.py

DATABASES = {
    # A connection time zone that no server defaults to, so the tests can see
    # that Django's per-connection setup ran on the middleware's connections.
    "default": {
        "ENGINE": "wsgi_pgconn.django",
        "NAME": "wsgi_pgconn_django",
        "TIME_ZONE": "Asia/Tokyo",
        **_SERVER,
    },
    # A second alias on the same backend: not the one bound to the middleware
    # unless a test builds a middleware for it.
    "other": {"ENGINE": "wsgi_pgconn.django", "NAME": "wsgi_pgconn_django_other", **_SERVER},
}
