"""``INSTALLED_APPS = [..., "wsgi_pgconn.django"]``: the adapter's system checks run.

The app has no models; listing it only makes Django import the adapter (and
so register its checks, :mod:`wsgi_pgconn.django.checks`) before it runs
its checks.
"""

from __future__ import annotations

from django.apps import AppConfig

__all__ = ["WsgiPgconnConfig"]


class WsgiPgconnConfig(AppConfig):  # type: ignore[misc]
    name = "wsgi_pgconn.django"
    label = "wsgi_pgconn"
    verbose_name = "wsgi_pgconn"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the checks
