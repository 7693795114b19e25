"""Configuration: every setting is a keyword argument with a 1:1 environment alias.

:func:`parse` is pure: it takes a mapping shaped like ``os.environ`` plus
keyword overrides and returns a frozen :class:`Settings`, or raises
:class:`~wsgi_pgconn.errors.ConfigurationError` naming the variable, the value
and what is accepted. :func:`config` is ``parse(os.environ, ...)``.

>>> parse({"WSGI_PGCONN_SCOPE": "pool", "WSGI_PGCONN_POOL_SIZE": "8"}).pool_size
8
>>> parse({}, max_age="10min").max_age
600.0
>>> parse({"WSGI_PGCONN_STATEMENT_TIMEOUT": "010"}).statement_timeout
10

All settings are read through the one table :data:`SETTINGS`; an empty
environment variable counts as unset.

Durations are parsed once, by one parser, for every time-valued setting: a
number in the setting's default unit (``300``), or a number with a unit
(``us``, ``ms``, ``s``, ``min``, ``h``, ``d``: ``1.5s``, ``250ms``,
``10min``, ``1h``), or a :class:`datetime.timedelta` as a keyword. The
settings used by Python (``pool_timeout``, ``max_age``, ``max_idle``,
``connect_timeout``) are kept in seconds (float); those sent to the server
(``statement_timeout``, ``idle_in_transaction_timeout``) in whole
milliseconds (int), which is what reaches the server: ``010`` is 10 ms.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from . import drivers
from .errors import ConfigurationError, DriverNotFound

__all__ = [
    "ENV_PREFIX",
    "NOT_SETTINGS",
    "SETTINGS",
    "Settings",
    "config",
    "exempt_matcher",
    "is_set",
    "parse",
    "settings_environ",
    "unknown_variables",
    "warn_unknown",
]

logger = logging.getLogger("wsgi_pgconn")

ENV_PREFIX = "WSGI_PGCONN_"

#: Variables with the WSGI_PGCONN_ prefix that are not settings: the tooling,
#: the test suite and the CI scripts read them (wsgi_pgconn.tooling's
#: TOOLING_ENVIRONMENT; a test keeps the two lists equal). They are never
#: reported as unknown settings.
NOT_SETTINGS: frozenset[str] = frozenset(
    {
        "WSGI_PGCONN_PORT_RANGE",
        "WSGI_PGCONN_PG_BINDIR",
        "WSGI_PGCONN_TEST_DSN",
        "WSGI_PGCONN_SERVER_VENV",
        "WSGI_PGCONN_SERVER_PYTHON",
        "WSGI_PGCONN_DJANGO_LINES",
        "WSGI_PGCONN_DJANGO_VENVS",
        "WSGI_PGCONN_BENCH_APP",
        "WSGI_PGCONN_BENCH_DJANGO",
        "WSGI_PGCONN_BENCH_DSN",
        "WSGI_PGCONN_BENCH_POOL_SIZE",
        "WSGI_PGCONN_BENCH_SCOPE",
        "WSGI_PGCONN_BENCH_FSA",
        "WSGI_PGCONN_BENCH_GREEN",
    }
)

SCOPES = ("thread", "process", "pool")
RESETS = ("rollback", "discard")
CHECKS = ("socket", "query")
POOLERS = ("none", "session", "transaction")
GREENLETS = ("auto", "off")
ISOLATION_LEVELS = ("read committed", "repeatable read", "serializable")
#: psycopg 3's own default for prepare_threshold.
PSYCOPG_PREPARE_THRESHOLD = 5

#: A duration: a number, then optionally a unit (PostgreSQL's units).
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[ \t]*([A-Za-z]*)", re.ASCII)
#: Milliseconds per unit.
_UNIT_MS = {
    "us": Decimal("0.001"),
    "ms": Decimal(1),
    "s": Decimal(1000),
    "min": Decimal(60_000),
    "h": Decimal(3_600_000),
    "d": Decimal(86_400_000),
}
_UNITS = ", ".join(_UNIT_MS)
_INT_MAX = 2**31 - 1

#: URL schemes accepted in DATABASE_URL; all of them name a PostgreSQL server
#: reached by libpq (dj-database-url's PostgreSQL schemes; libpq itself knows
#: only the first two).
URL_SCHEMES = ("postgresql", "postgres", "pgsql", "postgis")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
#: Query parameters other tools put in a DATABASE_URL, which libpq does not know.
_FOREIGN_PARAMETERS = {
    "conn_max_age": "dj-database-url's CONN_MAX_AGE; the middleware's connections follow "
    "WSGI_PGCONN_MAX_AGE",
    "conn_health_checks": "dj-database-url's CONN_HEALTH_CHECKS; the middleware checks "
    "connections as WSGI_PGCONN_CHECK says",
    "schema": "set the search path with options=-csearch_path%3Dmyschema",
    "search_path": "set it with options=-csearch_path%3Dmyschema",
    "currentschema": "set the search path with options=-csearch_path%3Dmyschema",
    "pool_size": "the middleware's pool is WSGI_PGCONN_POOL_SIZE",
    "max_connections": "the middleware's pool is WSGI_PGCONN_POOL_SIZE",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one middleware (see docs/configuration.md).

    Durations: ``pool_timeout``, ``max_age``, ``max_idle`` and
    ``connect_timeout`` in seconds (float); ``statement_timeout`` and
    ``idle_in_transaction_timeout`` in milliseconds (int, 0 = no timeout);
    None = no limit (``max_age``, ``max_idle``) or the server's own setting.
    ``exempt_paths`` holds path prefixes without a trailing slash (whole
    segments), or ending in ``*`` (a plain prefix).
    """

    dsn: str = dataclasses.field(default="", repr=False)
    scope: str = "thread"
    pool_size: int = 4
    pool_timeout: float = 5.0
    max_age: float | None = None
    max_idle: float | None = None
    isolation_level: str | None = None
    statement_timeout: int | None = None
    idle_in_transaction_timeout: int | None = None
    connect_timeout: float = 5.0
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
    #: Refuse unknown WSGI_PGCONN_* variables instead of warning about them.
    strict: bool = False

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


# -- DATABASE_URL --------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _libpq_knows(keyword: str) -> bool:
    """Whether libpq accepts ``keyword`` as a connection parameter (asked through the driver)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", keyword):
        return False
    try:
        drivers.parse_conninfo(f"{keyword}=x")
    except DriverNotFound:
        raise
    except Exception:
        return False
    return True


def _conninfo_keywords(text: str) -> list[str] | None:
    """The keywords of a libpq ``key=value`` string, or None where it is malformed.

    The same grammar as libpq's: a keyword, ``=``, then a value that is
    either single-quoted or runs to the next whitespace, backslash escaping
    the next character. Only keywords followed by ``=`` are returned: any
    other word may be a value (a password) that lost its keyword.
    """
    keywords: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return keywords
        start = i
        while i < n and not text[i].isspace() and text[i] != "=":
            i += 1
        keyword = text[start:i]
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            return None
        keywords.append(keyword)
        i += 1
        while i < n and text[i].isspace():
            i += 1
        if i < n and text[i] == "'":
            i += 1
            while i < n and text[i] != "'":
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return None
            i += 1
        else:
            while i < n and not text[i].isspace():
                i += 2 if text[i] == "\\" else 1


def _url_keywords(url: str) -> list[str] | None:
    """The query parameter names of a ``postgresql://`` URL, or None where one has no ``=``."""
    query = url.partition("?")[2]
    names = []
    for part in query.split("&"):
        if not part:
            continue
        if "=" not in part:
            return None  # may be a misplaced password: never named
        names.append(urllib.parse.unquote(part.partition("=")[0]))
    return names


def _explain_conninfo(label: str, value: str, is_url: bool) -> str:
    """Why libpq refused ``value``, naming keywords only (never values)."""
    keywords = _url_keywords(value) if is_url else _conninfo_keywords(value)
    for keyword in keywords or ():
        if not _libpq_knows(keyword):
            hint = _FOREIGN_PARAMETERS.get(keyword.lower())
            where = "query parameter" if is_url else "parameter"
            return (
                f"{label} has the {where} {keyword!r}, which libpq does not know"
                + (f" ({hint})" if hint else "")
                + ": remove it (libpq's parameters are listed in PostgreSQL's documentation, "
                "'Parameter Key Words')"
            )
    if is_url:
        what = "a valid postgresql:// URL"
    elif keywords is None and "=" not in value and ("/" in value or ":" in value):
        what = "a valid connection string (a URL must begin with postgresql://)"
    else:
        what = "a valid libpq key=value connection string"
    return f"{label} is not {what} (the value is not shown because it may contain a password)"


def _dsn(label: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise ConfigurationError(f"{label} must be a string, not {type(raw).__name__}")
    value = raw.strip()
    if not value:
        return ""
    scheme = _SCHEME.match(value)
    if scheme is not None:
        name = scheme.group(1)
        if name.lower() not in URL_SCHEMES:
            hint = ""
            if "+" in name:
                hint = (
                    f" ({name}:// is SQLAlchemy's form: the driver part means nothing to libpq, "
                    "write postgresql://)"
                )
            raise ConfigurationError(
                f"{label} uses the URL scheme {name}://, which wsgi_pgconn does not accept: "
                "use postgresql:// (postgres://, pgsql:// and postgis:// are accepted too)" + hint
            )
        if name not in ("postgresql", "postgres"):
            value = "postgresql://" + value[scheme.end() :]
    try:
        drivers.parse_conninfo(value)
        valid = True
    except DriverNotFound:
        raise
    except Exception:
        valid = False
    if not valid:
        # Raised outside the except block: libpq's message may quote part of the
        # string, password included, and must not ride along as __context__.
        raise ConfigurationError(_explain_conninfo(label, value, scheme is not None))
    return value


# -- choices, numbers, switches ---------------------------------------------------------


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


# -- durations ---------------------------------------------------------------------------


def _milliseconds(raw: object, default_unit: str) -> Decimal | None:
    """``raw`` as an exact number of milliseconds, or None when it is not a duration."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, datetime.timedelta):
        return Decimal(raw // datetime.timedelta(microseconds=1)) / 1000
    if isinstance(raw, (int, float)):
        try:
            number = Decimal(repr(raw))
        except InvalidOperation:
            return None
        if not number.is_finite():
            return None
        return number * _UNIT_MS[default_unit]
    if not isinstance(raw, str):
        return None
    match = _DURATION.fullmatch(raw.strip())
    if match is None:
        return None
    unit = match.group(2).lower() or default_unit
    if unit not in _UNIT_MS:
        return None
    return Decimal(match.group(1)) * _UNIT_MS[unit]


def _seconds(
    *, optional: bool, maximum: float = float("inf")
) -> Callable[[str, object], Any]:
    """A duration kept in seconds (float), greater than 0; a plain number is seconds."""
    accepted = (
        "expected a duration: a number of seconds greater than 0, or a number with a unit "
        f"({_UNITS}: e.g. '1.5s', '250ms', '10min', '1h')"
    )
    if maximum < float("inf"):
        accepted += f", at most {maximum:g} seconds"
    if optional:
        accepted += "; or 'none' for no limit"

    def parse_seconds(label: str, raw: object) -> float | None:
        if optional and (raw is None or str(raw).strip().lower() in ("none", "off")):
            return None
        ms = _milliseconds(raw, "s")
        if ms is None or ms <= 0 or ms > Decimal(maximum) * 1000:
            raise _bad(label, raw, accepted)
        seconds = float(ms / 1000)
        if not 0 < seconds < float("inf"):
            raise _bad(label, raw, accepted)
        return seconds

    return parse_seconds


def _server_milliseconds(label: str, raw: object) -> int | None:
    """A server setting in whole milliseconds (rounded up; 0 = none), or None (the server's)."""
    if raw is None or str(raw).strip().lower() in ("none", "off", "default"):
        return None
    ms = _milliseconds(raw, "ms")
    if ms is None or ms < 0:
        raise _bad(
            label,
            raw,
            "expected a duration: milliseconds (e.g. 5000), or a number with a unit "
            f"({_UNITS}: e.g. '5s', '250ms', '2min'); 0 for no timeout, 'none' for "
            "the server's own setting",
        )
    whole = int(ms.to_integral_value(rounding=ROUND_CEILING))
    if whole > _INT_MAX:
        raise _bad(label, raw, f"the server accepts at most {_INT_MAX} ms (about 24.8 days)")
    return whole


# -- exempt paths --------------------------------------------------------------------------


def _paths(label: str, raw: object) -> tuple[str, ...]:
    items: Iterable[object] = raw.split(",") if isinstance(raw, str) else raw  # type: ignore[assignment]
    try:
        paths = tuple(str(p).strip() for p in items)
    except TypeError:
        raise _bad(
            label, raw, "expected comma-separated paths such as '/health,/static'"
        ) from None
    normalized: list[str] = []
    for path in paths:
        if not path:
            continue
        if not path.startswith("/"):
            raise _bad(label, raw, "each path must start with '/'")
        if "*" in path[:-1]:
            raise _bad(label, raw, "'*' may only end a path (a plain prefix: '/health*')")
        if not path.endswith("*") and len(path) > 1:
            path = path.rstrip("/") or "/"
        if path not in normalized:
            normalized.append(path)
    return tuple(normalized)


def exempt_matcher(paths: Iterable[str]) -> tuple[tuple[str, ...], frozenset[str], tuple[str, ...]]:
    """What the middleware tests a request's path against: ``(quick, exact, starts)``.

    A path is exempt when ``path.startswith(quick)`` (the cheap test, false
    for most requests) and then ``path in exact or path.startswith(starts)``.
    ``/health`` exempts ``/health`` and ``/health/...``; ``/health*`` every
    path that begins with ``/health``.
    """
    quick: list[str] = []
    exact: set[str] = set()
    starts: list[str] = []
    for path in paths:
        if path.endswith("*"):
            quick.append(path[:-1])
            starts.append(path[:-1])
        else:
            quick.append(path)
            exact.add(path)
            starts.append(path if path.endswith("/") else path + "/")
    return tuple(quick), frozenset(exact), tuple(starts)


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
    "statement_timeout": (ENV_PREFIX + "STATEMENT_TIMEOUT", _server_milliseconds),
    "idle_in_transaction_timeout": (
        ENV_PREFIX + "IDLE_IN_TRANSACTION_TIMEOUT", _server_milliseconds
    ),
    "connect_timeout": (
        ENV_PREFIX + "CONNECT_TIMEOUT", _seconds(optional=False, maximum=_INT_MAX)
    ),
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
    "strict": (ENV_PREFIX + "STRICT", _boolean),
}

#: The settings that are durations, and their unit once parsed.
DURATION_UNITS = {
    "pool_timeout": "s",
    "max_age": "s",
    "max_idle": "s",
    "connect_timeout": "s",
    "statement_timeout": "ms",
    "idle_in_transaction_timeout": "ms",
}


# -- names ---------------------------------------------------------------------------------


def _variables() -> frozenset[str]:
    return frozenset(var for var, _ in SETTINGS.values())


def settings_environ(environ: Mapping[str, object]) -> dict[str, str]:
    """The entries of ``environ`` that configure wsgi_pgconn (non-empty strings only)."""
    names = _variables()
    return {
        key: value
        for key, value in environ.items()
        if key in names and isinstance(value, str) and value.strip()
    }


def unknown_variables(environ: Mapping[str, object]) -> list[tuple[str, str | None]]:
    """``(name, closest setting or None)`` for each ``WSGI_PGCONN_*`` name that is no setting.

    The prefix is matched in any case (``wsgi_pgconn_scope`` is reported);
    :data:`NOT_SETTINGS` (the tooling's variables) are not reported.
    """
    known = _variables()
    found = []
    for key in environ:
        if (
            isinstance(key, str)
            and key.upper().startswith(ENV_PREFIX)
            and key not in known
            and key not in NOT_SETTINGS
        ):
            found.append((key, closest_setting(key)))
    return sorted(found)


def closest_setting(name: str) -> str | None:
    """The setting's variable ``name`` most likely meant, or None."""
    known = sorted(var for var in _variables() if var.startswith(ENV_PREFIX))
    upper = name.upper()
    if upper in known:
        return upper
    suffixes = [var[len(ENV_PREFIX) :] for var in known]
    match = difflib.get_close_matches(upper[len(ENV_PREFIX) :], suffixes, n=1, cutoff=0.6)
    return ENV_PREFIX + match[0] if match else None


def describe_unknown(unknown: Iterable[tuple[str, str | None]]) -> str:
    """``NAME (did you mean SETTING?), ...`` for a list from :func:`unknown_variables`."""
    return ", ".join(
        name + (f" (did you mean {hint}?)" if hint else "") for name, hint in unknown
    )


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unknown(environ: Mapping[str, object], where: str = "the environment") -> None:
    """Log one WARNING naming the unknown ``WSGI_PGCONN_*`` names of ``environ``.

    Each name is reported once per process, however many middlewares see it.
    """
    with _warned_lock:
        unknown = [(n, h) for n, h in unknown_variables(environ) if n not in _warned]
        _warned.update(n for n, _ in unknown)
    if unknown:
        logger.warning(
            "ignoring unknown wsgi_pgconn setting(s) in %s: %s; set %sSTRICT=on to refuse "
            "unknown names",
            where,
            describe_unknown(unknown),
            ENV_PREFIX,
        )


def parse(environ: Mapping[str, object], **overrides: object) -> Settings:
    """Build :class:`Settings` from ``environ``; a non-None override wins over its variable.

    With ``strict`` on, an unknown ``WSGI_PGCONN_*`` name in ``environ`` is a
    :class:`~wsgi_pgconn.errors.ConfigurationError`.
    """
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
    settings = Settings(**values)
    if settings.strict:
        names = unknown_variables(environ)
        if names:
            raise ConfigurationError(
                f"unknown wsgi_pgconn setting(s): {describe_unknown(names)} "
                f"({ENV_PREFIX}STRICT is on: remove them, or correct their names)"
            )
    return settings


def sources(environ: Mapping[str, object], **overrides: object) -> dict[str, str]:
    """Where each setting's value comes from: ``default``, ``environment (VAR)`` or ``argument``."""
    env = settings_environ(environ)
    result = {}
    for name, (var, _) in SETTINGS.items():
        if overrides.get(name) is not None:
            result[name] = "argument"
        elif var in env:
            result[name] = f"environment ({var})"
        else:
            result[name] = "default"
    return result


def is_set(name: str, environ: Mapping[str, object], **overrides: object) -> bool:
    """Whether setting ``name`` was given (a non-None override, or its non-empty variable)."""
    if overrides.get(name) is not None:
        return True
    return SETTINGS[name][0] in settings_environ(environ)


def config(**overrides: object) -> Settings:
    """:func:`parse` applied to ``os.environ``."""
    return parse(os.environ, **overrides)
