"""Helpers of the adapter's tests (a module of its own: ``conftest`` is ambiguous on sys.path)."""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import psycopg2.extensions

with warnings.catch_warnings():
    # WebOb (under webtest) imports the stdlib cgi module, deprecated since 3.11.
    warnings.filterwarnings("ignore", "'cgi' is deprecated", DeprecationWarning)
    from webtest import TestApp

__all__ = ["TestApp", "keys", "new_key", "query"]


def query(conn: psycopg2.extensions.connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, args or None)
        return cur.fetchall() if cur.description else []


def keys(conn: psycopg2.extensions.connection, prefix: str) -> list[str]:
    """The committed Item keys that start with ``prefix``, sorted."""
    return [
        key
        for (key,) in query(
            conn, "SELECT key FROM djtest_app_item WHERE key LIKE %s ORDER BY key", prefix + "%"
        )
    ]


def new_key() -> str:
    return "k" + uuid.uuid4().hex[:10]
