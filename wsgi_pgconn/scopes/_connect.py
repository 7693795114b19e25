"""What to log about failed connects: the first of a run, a change, a reminder; not every one.

A run of failed connects (a server that is down or full, a wrong password)
would otherwise log one line per attempt. :class:`FailureLog` decides, for the
registry's back-off, which failures are worth a line: the first of a run, one
whose message differs from the last logged, and a reminder every
:data:`REMIND_EVERY` seconds while the run lasts (with the count of attempts and
of requests answered 503 meanwhile); the others go to DEBUG.

A **permanent** failure, one that retrying cannot cure until someone changes
the configuration or the server (a wrong password, a missing database or role,
no pg_hba.conf entry, no DSN and no ``PG*`` variable at all), is logged at
ERROR with the fix. libpq reports no SQLSTATE for a failed connect, so the
server's message text is matched (PostgreSQL's English messages,
``lc_messages`` ``C`` or ``en_*``); anything else counts as transient. Messages
never hold the password (libpq's and the server's never do).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import first_line

if TYPE_CHECKING:
    from ..config import Settings

__all__ = ["REMIND_EVERY", "FailureLog", "permanent_failure"]

#: Seconds between reminders while connects keep failing.
REMIND_EVERY = 60.0

# (text in the server's message, SQLSTATE, what to check), first match wins.
_PERMANENT: tuple[tuple[str, str | None, str], ...] = (
    ("password authentication failed", "28P01", "the user name and password"),
    ("no password supplied", "28P01", "the password (the server asks for one)"),
    ("authentication failed for user", "28000", "the user name and pg_hba.conf"),
    ("no pg_hba.conf entry", "28000", "the host, user and database against pg_hba.conf"),
    ("is not permitted to log in", "28000", "the role (it lacks LOGIN)"),
    ('database "', "3D000", "the database name"),  # 'database "x" does not exist'
    ('role "', "28000", "the user name"),  # 'role "x" does not exist'
    ("permission denied for database", "42501", "the role's CONNECT privilege"),
    # libpq's own refusals of a parameter's value (no server involved, no SQLSTATE).
    ("for connection option", None, "the parameter's value"),  # invalid integer value ...
    ("invalid connection option", None, "the parameter names"),
    ("invalid sslmode value", None, "sslmode"),
    ("invalid port number", None, "the port"),
    ("invalid target_session_attrs value", None, "target_session_attrs"),
)


def _server_text(message: str) -> str:
    """The server's own words in a libpq connect error (after ``FATAL:``), else the message."""
    _, sep, rest = message.partition("FATAL:")
    return rest.strip() if sep else message.strip()


def permanent_failure(message: str, settings: Settings, environ: Mapping[str, str]) -> str | None:
    """The fix for a connect failure that retrying cannot cure, or None (transient).

    ``message`` is the first line of the driver's error; ``environ`` is the
    process environment libpq reads.
    """
    configured = bool(settings.dsn) or any(name.startswith("PG") for name in environ)
    if not configured:
        return (
            "no database is configured: DATABASE_URL is not set and neither is any of "
            "libpq's PG* variables (PGHOST, PGDATABASE, PGUSER, ...), so libpq tried its "
            f"defaults and failed ({message}). Set DATABASE_URL, e.g. "
            "postgresql://USER:PASSWORD@HOST:5432/DBNAME"
        )
    text = _server_text(message)
    for needle, sqlstate, what in _PERMANENT:
        if needle in text and (not needle.endswith('"') or "does not exist" in text):
            where = "DATABASE_URL" if settings.dsn else "the PG* variables"
            code = f"SQLSTATE {sqlstate}; " if sqlstate else ""
            return f"check {where}: {text} ({code}check {what})"
    return None


class FailureLog:
    """Which connect failures of a run to log, and at what level. Not thread-safe:
    the registry calls it under its connect lock."""

    def __init__(self) -> None:
        #: The first line of the last failure's message.
        self.last = ""
        self._logged: str | None = None  # the message last logged above DEBUG
        self._level = logging.WARNING
        self._logged_at = 0.0
        self._attempts = 0  # failed attempts since the last line above DEBUG
        self._backoffs = 0  # requests answered at once meanwhile

    def backed_off(self) -> None:
        """A request was refused during the back-off (no attempt)."""
        self._backoffs += 1

    def failed(
        self, exc: BaseException, settings: Settings, environ: Mapping[str, str]
    ) -> tuple[int, str]:
        """A connect failed: ``(level, text)`` to log."""
        message = first_line(exc)
        self.last = message
        now = time.monotonic()
        if message != self._logged:
            fix = permanent_failure(message, settings, environ)
            self._logged, self._logged_at = message, now
            self._attempts = self._backoffs = 0
            if fix is not None:
                self._level = logging.ERROR
                return (
                    logging.ERROR,
                    f"cannot connect to PostgreSQL, and retrying will not help: {fix}. "
                    "Answering 503 (with a back-off between attempts) until it is fixed",
                )
            self._level = logging.WARNING
            return (
                logging.WARNING,
                f"cannot connect to PostgreSQL: {message} (answering 503; trying again "
                "after a back-off)",
            )
        self._attempts += 1
        if now - self._logged_at >= REMIND_EVERY:
            summary = (
                f"{self._attempts} more failed attempt(s) and {self._backoffs} request(s) "
                f"answered 503 during the back-off in the last {now - self._logged_at:.0f}s"
            )
            self._logged_at = now
            self._attempts = self._backoffs = 0
            return (self._level, f"still cannot connect to PostgreSQL ({summary}): {message}")
        return (logging.DEBUG, f"cannot connect to PostgreSQL (again): {message}")

    def recovered(self, failures: int) -> tuple[int, str]:
        """A connect succeeded after ``failures`` failed ones: ``(level, text)`` to log."""
        self._logged = None
        return (logging.INFO, f"connected to PostgreSQL again after {failures} failed attempt(s)")
