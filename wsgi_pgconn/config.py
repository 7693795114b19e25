"""Configuration: every setting is a keyword argument with a 1:1 environment alias.

:func:`parse` is pure: it takes a mapping shaped like ``os.environ`` plus
keyword overrides and returns a frozen :class:`Settings`, or raises
:class:`~wsgi_pgconn.errors.ConfigurationError` naming the variable, the value
and what is accepted. :func:`config` is ``parse(os.environ, ...)``.

>>> parse({"WSGI_PGCONN_SCOPE": "pool", "WSGI_PGCONN_POOL_SIZE": "8"}).pool_size
8
>>> parse({}, max_age=300).max_age
300.0

All settings are read through the one table :data:`SETTINGS`; an empty
environment variable counts as unset.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import drivers
from .errors import ConfigurationError, DriverNotFound

__all__ = ["ENV_PREFIX", "SETTINGS", "Settings", "config", "is_set", "parse", "settings_environ"]

ENV_PREFIX = "WSGI_PGCONN_"

SCOPES = ("thread", "process", "pool")
RESETS = ("rollback", "discard")
CHECKS = ("socket", "query")
POOLERS = ("none", "session", "transaction")
GREENLETS = ("auto", "off")
ISOLATION_LEVELS = ("read committed", "repeatable read", "serializable")
#: psycopg 3's own default for prepare_threshold.
PSYCOPG_PREPARE_THRESHOLD = 5

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?) *(us|ms|s|min|h|d)?", re.ASCII)
_DURATION_MS = {"us": 0.001, "ms": 1, "s": 1000, "min": 60_000, "h": 3_600_000, "d": 86_400_000}
_INT_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one middleware (see README, "Configuration")."""

    dsn: str = dataclasses.field(default="", repr=False)
    scope: str = "thread"
    pool_size: int = 4
    pool_timeout: float = 5.0
    max_age: float | None = None
    max_idle: float | None = None
    isolation_level: str | None = None
    statement_timeout: str | None = None
    idle_in_transaction_timeout: str | None = None
    connect_timeout: int = 5
    reset: str = "rollback"
    check: str = "socket"
    exempt_paths: tuple[str, ...] = ()
    pooler: str = "none"
    retries: int = 0
    retry_max_body: int = 1 << 20
    driver: str = "auto"
    pipeline_begin: bool = True
    #: psycopg 3 only; -1 (the default) means 5, or None behind a transaction pooler.
    prepare_threshold: int | None = -1
    #: "auto": recognise gevent/eventlet (see wsgi_pgconn.green); "off": treat greenlets as threads.
    greenlets: str = "auto"

    def __post_init__(self) -> None:
        if self.prepare_threshold == -1:
            # Server-side prepared statements do not survive a transaction pooler
            # (unless it tracks them: PgBouncer 1.21+ max_prepared_statements).
            default = None if self.pooler == "transaction" else PSYCOPG_PREPARE_THRESHOLD
            object.__setattr__(self, "prepare_threshold", default)
        if self.pooler == "transaction" and self.reset == "discard":
            raise ConfigurationError(
                "WSGI_PGCONN_RESET=discard cannot work behind a transaction pooler "
                "(WSGI_PGCONN_POOLER=transaction): the server connection changes between "
                "transactions, so DISCARD ALL would reset somebody else's session"
            )

    @property
    def masked_dsn(self) -> str:
        """The connection string with any password replaced by ``********``."""
        return mask_dsn(self.dsn)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr
        )
        return f"Settings(dsn={self.masked_dsn!r}, {fields})"


def mask_dsn(dsn: str) -> str:
    """``dsn`` as a key=value string with the password masked (never raises)."""
    if not dsn:
        return ""
    try:
        driver = drivers.load()
        params = driver.parse_conninfo(dsn)
    except Exception:
        return "<unparsable connection string>"
    return driver.make_conninfo(**drivers.mask_password(params))


# -- value parsers: (label, raw) -> value; label names the variable in errors --


def _bad(label: str, raw: object, accepted: str) -> ConfigurationError:
    return ConfigurationError(f"{label}={raw!r} is not valid: {accepted}")


def _dsn(label: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigurationError(f"{label} must be a string, not {type(raw).__name__}")
    if raw.strip():
        try:
            drivers.parse_conninfo(raw)
            valid = True
        except DriverNotFound:
            raise
        except Exception:
            valid = False
        if not valid:
            # Raised outside the except block: libpq's message may quote part of the
            # string, password included, and must not ride along as __context__.
            raise ConfigurationError(
                f"{label} is not a valid postgresql:// URL or libpq key=value connection "
                "string (the value is not shown because it may contain a password)"
            )
    return raw.strip()


def _choice(options: tuple[str, ...]) -> Callable[[str, object], str]:
    def parse_choice(label: str, raw: object) -> str:
        value = " ".join(str(raw).lower().replace("_", " ").split())
        if value not in options:
            raise _bad(label, raw, "expected one of " + ", ".join(repr(o) for o in options))
        return value

    return parse_choice


def _optional_choice(options: tuple[str, ...]) -> Callable[[str, object], str | None]:
    parse_choice = _choice(options)

    def parse_optional(label: str, raw: object) -> str | None:
        if raw is None or str(raw).strip().lower() in ("default", "none"):
            return None
        return parse_choice(label, raw)

    return parse_optional


def _seconds(*, optional: bool, maximum: float = float("inf")) -> Callable[[str, object], Any]:
    accepted = "expected a number of seconds greater than 0"
    if maximum < float("inf"):
        accepted += f" and at most {maximum:g}"
    if optional:
        accepted += " (or 'none' for no limit)"

    def parse_seconds(label: str, raw: object) -> float | None:
        if optional and (raw is None or str(raw).strip().lower() in ("none", "off")):
            return None
        if isinstance(raw, bool):
            raise _bad(label, raw, accepted)
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise _bad(label, raw, accepted) from None
        if not (0 < value < float("inf")) or value > maximum:
            raise _bad(label, raw, accepted)
        return value

    return parse_seconds


def _integer(minimum: int, maximum: int | None = None) -> Callable[[str, object], int]:
    accepted = "expected a whole number greater than 0" if minimum == 1 else (
        f"expected a whole number, {minimum} or more"
    )
    if maximum is not None:
        accepted += f" and at most {maximum}"

    def parse_integer(label: str, raw: object) -> int:
        if isinstance(raw, bool):
            raise _bad(label, raw, accepted)
        try:
            value = raw if isinstance(raw, int) else int(str(raw).strip())
        except ValueError:
            raise _bad(label, raw, accepted) from None
        if value < minimum or (maximum is not None and value > maximum):
            raise _bad(label, raw, accepted)
        return value

    return parse_integer


def _duration(label: str, raw: object) -> str | None:
    """A PostgreSQL duration: plain milliseconds, or a number with us/ms/s/min/h/d."""
    if raw is None:
        return None
    value = str(raw).strip()
    if value.lower() in ("none", "off"):
        return None
    match = None if isinstance(raw, bool) else _DURATION.fullmatch(value)
    if match is None:
        raise _bad(
            label, raw, "expected milliseconds (e.g. 5000) or a duration such as '5s' or '2min'"
        )
    if float(match.group(1)) * _DURATION_MS[match.group(2) or "ms"] > _INT_MAX:
        raise _bad(label, raw, f"the server accepts at most {_INT_MAX} ms (about 24.8 days)")
    return value.replace(" ", "")


def _boolean(label: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise _bad(label, raw, "expected on or off (1/0, true/false, yes/no)")


def _optional_integer(label: str, raw: object) -> int | None:
    if raw is None or str(raw).strip().lower() in ("none", "off"):
        return None
    return _integer(0)(label, raw)


def _paths(label: str, raw: object) -> tuple[str, ...]:
    items: Iterable[object] = raw.split(",") if isinstance(raw, str) else raw  # type: ignore[assignment]
    try:
        paths = tuple(str(p).strip() for p in items)
    except TypeError:
        raise _bad(
            label, raw, "expected comma-separated path prefixes such as '/health,/static/'"
        ) from None
    paths = tuple(p for p in paths if p)
    for path in paths:
        if not path.startswith("/"):
            raise _bad(label, raw, "each path prefix must start with '/'")
    return paths


#: field name -> (environment variable, parser). The only place settings are listed.
SETTINGS: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "dsn": ("DATABASE_URL", _dsn),
    "scope": (ENV_PREFIX + "SCOPE", _choice(SCOPES)),
    "pool_size": (ENV_PREFIX + "POOL_SIZE", _integer(1)),
    "pool_timeout": (
        ENV_PREFIX + "POOL_TIMEOUT", _seconds(optional=False, maximum=threading.TIMEOUT_MAX)
    ),
    "max_age": (ENV_PREFIX + "MAX_AGE", _seconds(optional=True)),
    "max_idle": (ENV_PREFIX + "MAX_IDLE", _seconds(optional=True)),
    "isolation_level": (ENV_PREFIX + "ISOLATION_LEVEL", _optional_choice(ISOLATION_LEVELS)),
    "statement_timeout": (ENV_PREFIX + "STATEMENT_TIMEOUT", _duration),
    "idle_in_transaction_timeout": (ENV_PREFIX + "IDLE_IN_TRANSACTION_TIMEOUT", _duration),
    "connect_timeout": (ENV_PREFIX + "CONNECT_TIMEOUT", _integer(1, _INT_MAX)),
    "reset": (ENV_PREFIX + "RESET", _choice(RESETS)),
    "check": (ENV_PREFIX + "CHECK", _choice(CHECKS)),
    "exempt_paths": (ENV_PREFIX + "EXEMPT_PATHS", _paths),
    "pooler": (ENV_PREFIX + "POOLER", _choice(POOLERS)),
    "retries": (ENV_PREFIX + "RETRIES", _integer(0)),
    "retry_max_body": (ENV_PREFIX + "RETRY_MAX_BODY", _integer(0)),
    "driver": (ENV_PREFIX + "DRIVER", _choice(drivers.CHOICES)),
    "pipeline_begin": (ENV_PREFIX + "PIPELINE_BEGIN", _boolean),
    "prepare_threshold": (ENV_PREFIX + "PREPARE_THRESHOLD", _optional_integer),
    "greenlets": (ENV_PREFIX + "GREENLETS", _choice(GREENLETS)),
}


def settings_environ(environ: Mapping[str, object]) -> dict[str, str]:
    """The entries of ``environ`` that configure wsgi_pgconn (non-empty strings only)."""
    names = {var for var, _ in SETTINGS.values()}
    return {
        key: value
        for key, value in environ.items()
        if key in names and isinstance(value, str) and value.strip()
    }


def parse(environ: Mapping[str, object], **overrides: object) -> Settings:
    """Build :class:`Settings` from ``environ``; a non-None override wins over its variable."""
    unknown = set(overrides) - set(SETTINGS)
    if unknown:
        raise TypeError(f"unknown wsgi_pgconn setting(s): {', '.join(sorted(unknown))}")
    env = settings_environ(environ)
    values: dict[str, Any] = {}
    for name, (var, parser) in SETTINGS.items():
        override = overrides.get(name)
        if override is not None:
            values[name] = parser(f"{name} (keyword argument, alias of {var})", override)
        elif var in env:
            values[name] = parser(var, env[var])
    return Settings(**values)


def is_set(name: str, environ: Mapping[str, object], **overrides: object) -> bool:
    """Whether setting ``name`` was given (a non-None override, or its non-empty variable)."""
    if overrides.get(name) is not None:
        return True
    return SETTINGS[name][0] in settings_environ(environ)


def config(**overrides: object) -> Settings:
    """:func:`parse` applied to ``os.environ``."""
    return parse(os.environ, **overrides)
