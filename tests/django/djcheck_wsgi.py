"""WSGI applications for the system-check tests (tests/django/test_django_checks.py).

Each is built the way a wsgi.py would build it; none opens a connection.
"""

from __future__ import annotations

from typing import Any

from django.core.wsgi import get_wsgi_application as django_application

from wsgi_pgconn import PgConnMiddleware
from wsgi_pgconn.django import DjangoPgConnMiddleware, get_wsgi_application

#: Django's stock handler: the ORM autocommits, nothing is all-or-nothing.
stock = django_application()
#: The adapter's get_wsgi_application (alias "default").
wrapped = get_wsgi_application()
#: The plain middleware around Django (binds "default" too).
plain = PgConnMiddleware(django_application())
#: Both aliases of the test settings, one middleware each.
both = DjangoPgConnMiddleware(DjangoPgConnMiddleware(django_application()), alias="other")


class Outer:
    """A WSGI middleware of somebody else's (WhiteNoise keeps ``self.application``)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.application(environ, start_response)


#: The adapter's middleware inside another middleware.
outer = Outer(wrapped)


def function(environ: Any, start_response: Any) -> Any:
    """A plain function wrapping the adapter's middleware."""
    return wrapped(environ, start_response)


def _closure() -> Any:
    inner = get_wsgi_application(alias="other")

    def application(environ: Any, start_response: Any) -> Any:
        return inner(environ, start_response)

    return application


#: A function that closes over the adapter's middleware (alias "other" only).
closure = _closure()
