"""What a connection is opened with, and what begins each of its transactions.

Decided here, from the settings, the same for both drivers: the libpq
parameters added to the DSN (application_name, TCP keepalives,
connect_timeout, server settings as startup ``options``) and the statements
that begin a request's transaction (BEGIN with the isolation level, and behind
a transaction pooler the server settings as transaction-local ``set_config``).
The drivers send them (:mod:`wsgi_pgconn.drivers`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings
    from .drivers import Driver

__all__ = ["KEEPALIVE_DEFAULTS", "begin_statements", "connect_params", "transaction_prelude"]

#: libpq parameters added when neither the DSN nor libpq's environment sets them.
#: Keepalives make a vanished server noticeable on an idle connection within
#: about a minute; tcp_user_timeout bounds how long sent data may stay unacknowledged.
KEEPALIVE_DEFAULTS = {
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}


def connect_params(
    settings: Settings, environ: Mapping[str, str], driver: Driver | None = None
) -> str:
    """The connection string to open: the DSN plus wsgi_pgconn's defaults.

    ``environ`` is the process environment that libpq itself reads (PGAPPNAME,
    PGCONNECT_TIMEOUT, PGOPTIONS): a default never overrides what the user
    set there or in the DSN. The default application_name carries the pid of
    the process that computes it: call this in the process that connects.
    """
    if driver is None:
        from .drivers import load

        driver = load(settings.driver)
    given = driver.parse_conninfo(settings.dsn) if settings.dsn else {}
    extra: dict[str, str] = {}
    if "application_name" not in given and "PGAPPNAME" not in environ:
        extra["application_name"] = f"wsgi_pgconn[{os.getpid()}]"
    if "connect_timeout" not in given and "PGCONNECT_TIMEOUT" not in environ:
        # libpq counts whole seconds: a fraction is rounded up, never down to 0 (no limit).
        extra["connect_timeout"] = str(math.ceil(settings.connect_timeout))
    for key, value in KEEPALIVE_DEFAULTS.items():
        if key not in given:
            extra[key] = value
    server = [f"-c {name}={value}" for name, value in _server_settings(settings)]
    if server and settings.pooler != "transaction":
        existing = given.get("options", environ.get("PGOPTIONS", ""))
        extra["options"] = " ".join([existing, *server]).strip()
    return driver.make_conninfo(settings.dsn, **extra)


def _server_settings(settings: Settings) -> list[tuple[str, str]]:
    """The server settings to send, as plain integer milliseconds (``10``, never ``010``)."""
    pairs = [
        ("statement_timeout", settings.statement_timeout),
        ("idle_in_transaction_session_timeout", settings.idle_in_transaction_timeout),
    ]
    return [(name, str(int(value))) for name, value in pairs if value is not None]


def transaction_prelude(settings: Settings) -> str | None:
    """Behind a transaction pooler, the server settings as one transaction-local statement.

    PgBouncer in transaction mode refuses them as startup ``options``; this
    statement travels with BEGIN at the start of each transaction that runs a query.
    """
    pairs = _server_settings(settings)
    if settings.pooler != "transaction" or not pairs:
        return None
    calls = ", ".join(f"set_config('{name}', '{value}', true)" for name, value in pairs)
    return f"SELECT {calls}"


def begin_statements(settings: Settings) -> tuple[str, ...]:
    """The statements that begin a request's transaction, in order."""
    begin = "BEGIN"
    if settings.isolation_level is not None:
        begin += " ISOLATION LEVEL " + settings.isolation_level.upper()
    prelude = transaction_prelude(settings)
    return (begin,) if prelude is None else (begin, prelude)
