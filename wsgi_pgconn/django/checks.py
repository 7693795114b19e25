"""Django system checks of the adapter (``manage.py check``; runserver and migrate run them too).

========================  ==========================================================
``wsgi_pgconn.E001``      ``OPTIONS["pool"]`` on an alias with ENGINE
                          ``"wsgi_pgconn.django"``: Django's pool would fight the
                          middleware's (the wrapper refuses to be built, too)
``wsgi_pgconn.W001``      ENGINE ``"wsgi_pgconn.django"``, but the application of
                          ``WSGI_APPLICATION`` is not wrapped by the middleware for
                          that alias: requests lose the all-or-nothing transaction
``wsgi_pgconn.W002``      ``CONN_MAX_AGE`` set on such an alias: it does not govern
                          the requests' connections
``wsgi_pgconn.W003``      ``CONN_HEALTH_CHECKS`` on such an alias: the same
``wsgi_pgconn.W004``      ``WSGI_APPLICATION`` unset or not importable: W001 cannot
                          be checked
========================  ==========================================================

They are registered when :mod:`wsgi_pgconn.django` is imported. Put
``"wsgi_pgconn.django"`` in ``INSTALLED_APPS`` so that it is imported before
Django runs its checks (the ENGINE alone is imported later, when a connection
is first needed). Tag: ``wsgi_pgconn`` (``manage.py check --tag wsgi_pgconn``).
The checks read ``settings.DATABASES``; they never open a connection.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core import checks
from django.utils.module_loading import import_string

from ..middleware import PgConnMiddleware
from .base import pool_refusal

__all__ = ["ENGINE", "TAG", "check_database_settings", "check_wsgi_application"]

#: The ENGINE of the adapter.
ENGINE = "wsgi_pgconn.django"
#: The tag of these checks.
TAG = "wsgi_pgconn"
#: Attributes through which WSGI middlewares commonly keep the application they wrap.
_WRAPPED_ATTRIBUTES = ("app", "application", "wsgi_app", "wrapped", "_app", "__wrapped__")
_DEPTH = 12


def _our_aliases() -> list[str]:
    databases: dict[str, Any] = getattr(settings, "DATABASES", {}) or {}
    return [alias for alias, entry in databases.items() if entry.get("ENGINE") == ENGINE]


def check_database_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001, W002, W003: Django's own connection handling set on a wsgi_pgconn alias."""
    messages: list[checks.CheckMessage] = []
    for alias in _our_aliases():
        entry = settings.DATABASES[alias]
        where = f"DATABASES[{alias!r}]"
        if (entry.get("OPTIONS") or {}).get("pool"):
            problem, fix = pool_refusal(alias)
            messages.append(
                checks.Error(
                    problem + " No connection can be opened for it.",
                    hint=fix,
                    obj=where,
                    id="wsgi_pgconn.E001",
                )
            )
        max_age = entry.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            messages.append(
                checks.Warning(
                    f"{where}['CONN_MAX_AGE'] = {max_age!r} does not govern the connections of "
                    "requests: wsgi_pgconn's middleware keeps those open across requests and "
                    "replaces them after WSGI_PGCONN_MAX_AGE (and WSGI_PGCONN_MAX_IDLE).",
                    hint="Remove CONN_MAX_AGE, and set WSGI_PGCONN_MAX_AGE if connections should "
                    "be replaced; it applies here only to Django's own connections outside "
                    "requests (management commands). If that is what you want, add "
                    "'wsgi_pgconn.W002' to SILENCED_SYSTEM_CHECKS.",
                    obj=where,
                    id="wsgi_pgconn.W002",
                )
            )
        if entry.get("CONN_HEALTH_CHECKS"):
            messages.append(
                checks.Warning(
                    f"{where}['CONN_HEALTH_CHECKS'] does not govern the connections of "
                    "requests: wsgi_pgconn's middleware checks each one at checkout, as "
                    "WSGI_PGCONN_CHECK says (socket: without a round trip; query: SELECT 1).",
                    hint="Remove CONN_HEALTH_CHECKS; it applies here only to Django's own "
                    "connections outside requests. If that is what you want, add "
                    "'wsgi_pgconn.W003' to SILENCED_SYSTEM_CHECKS.",
                    obj=where,
                    id="wsgi_pgconn.W003",
                )
            )
    return messages


def check_wsgi_application(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """W001, W004: is the application of WSGI_APPLICATION wrapped for every wsgi_pgconn alias?"""
    aliases = _our_aliases()
    if not aliases:
        return []
    path = getattr(settings, "WSGI_APPLICATION", None)
    if not path:
        return [
            checks.Warning(
                "WSGI_APPLICATION is not set, so it cannot be checked that the WSGI application "
                "is wrapped by wsgi_pgconn's middleware (ENGINE 'wsgi_pgconn.django' needs it); "
                "runserver then serves Django's own handler, without it.",
                hint="Set WSGI_APPLICATION to the application of your wsgi.py "
                "('mysite.wsgi.application'), built with "
                "wsgi_pgconn.django.get_wsgi_application().",
                id="wsgi_pgconn.W004",
            )
        ]
    try:
        application = import_string(path)
    except Exception as exc:
        return [
            checks.Warning(
                f"WSGI_APPLICATION {path!r} could not be imported "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), so "
                "it cannot be checked that it is wrapped by wsgi_pgconn's middleware.",
                id="wsgi_pgconn.W004",
            )
        ]
    covered = set(_covered_aliases(application))
    messages: list[checks.CheckMessage] = []
    for alias in aliases:
        if alias in covered:
            continue
        messages.append(
            checks.Warning(
                f"DATABASES[{alias!r}] uses ENGINE 'wsgi_pgconn.django', but the WSGI "
                f"application {path!r} is not wrapped by wsgi_pgconn's middleware"
                + (f" for {alias!r}" if covered else "")
                + ": each ORM query then autocommits on Django's own connection, and a view "
                "that writes and then fails keeps what it wrote.",
                hint="In wsgi.py: 'from wsgi_pgconn.django import get_wsgi_application' and "
                "'application = get_wsgi_application("
                + ("" if alias == "default" else f"alias={alias!r}")
                + ")' (or wrap Django's application in PgConnMiddleware). If it is wrapped in "
                "a way this check cannot see, add 'wsgi_pgconn.W001' to SILENCED_SYSTEM_CHECKS.",
                obj=path,
                id="wsgi_pgconn.W001",
            )
        )
    return messages


def _covered_aliases(application: object) -> Iterator[str]:
    """The aliases whose requests a middleware in ``application``'s chain serves.

    Follows the attributes through which WSGI middlewares keep the application
    they wrap (``app``, ``application``, ...), the variables a wrapping
    function closes over and the middlewares it names as globals, a few
    levels deep.
    """
    from .wsgi import DjangoPgConnMiddleware

    seen: set[int] = set()
    todo: list[tuple[object, int]] = [(application, 0)]
    while todo:
        node, depth = todo.pop()
        if id(node) in seen or depth > _DEPTH:
            continue
        seen.add(id(node))
        if isinstance(node, DjangoPgConnMiddleware):
            yield node.alias
        elif isinstance(node, PgConnMiddleware):
            yield "default"  # a plain middleware binds the default alias
        for name in _WRAPPED_ATTRIBUTES:
            inner = None
            with contextlib.suppress(Exception):  # a property that fails: nothing to follow
                inner = getattr(node, name, None)
            if inner is not None and callable(inner):
                todo.append((inner, depth + 1))
        if isinstance(node, types.FunctionType):
            # A function that calls the middleware: through a variable it closes
            # over, or a global of its module.
            for cell in node.__closure__ or ():
                try:
                    inner = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if callable(inner):
                    todo.append((inner, depth + 1))
            for name in node.__code__.co_names:
                inner = node.__globals__.get(name)
                if isinstance(inner, (PgConnMiddleware, DjangoPgConnMiddleware)):
                    todo.append((inner, depth + 1))


checks.register(check_database_settings, TAG)
checks.register(check_wsgi_application, TAG)
