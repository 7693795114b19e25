"""The adapter's Django system checks (issue 12): stable ids, in-process and as ``manage.py check``.

In-process, the checks run against the test settings (two aliases with
ENGINE "wsgi_pgconn.django") with WSGI_APPLICATION and DATABASES changed
per test; as a subprocess, ``python -m django check`` runs with the adapter
in INSTALLED_APPS, which is what registers the checks before Django runs them.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core import checks

from wsgi_pgconn.django.checks import check_database_settings, check_wsgi_application

HERE = Path(__file__).resolve().parent


def ids(messages: list[checks.CheckMessage]) -> list[tuple[str, Any]]:
    return sorted((m.id, m.obj) for m in messages)


@pytest.fixture
def databases(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A copy of DATABASES that the checks read (the live connections keep theirs)."""
    copied = copy.deepcopy(settings.DATABASES)
    monkeypatch.setattr(settings, "DATABASES", copied)
    return copied


# -- WSGI_APPLICATION: wrapped or not (W001, W004) --------------------------------------------


@pytest.mark.parametrize(
    ("application", "unwrapped"),
    [
        ("stock", ["default", "other"]),
        ("wrapped", ["other"]),
        ("plain", ["other"]),
        ("both", []),
        ("outer", ["other"]),
        ("function", ["other"]),
        ("closure", ["default"]),
    ],
)
def test_unwrapped_application_is_w001_per_alias(
    monkeypatch: pytest.MonkeyPatch, application: str, unwrapped: list[str]
) -> None:
    path = f"djcheck_wsgi.{application}"
    monkeypatch.setattr(settings, "WSGI_APPLICATION", path)
    messages = check_wsgi_application()
    assert ids(messages) == [("wsgi_pgconn.W001", path)] * len(unwrapped)
    for message, alias in zip(messages, unwrapped, strict=True):
        assert isinstance(message, checks.Warning)
        assert message.msg.startswith(f"DATABASES[{alias!r}] uses ENGINE 'wsgi_pgconn.django'")
        assert "a view that writes and then fails keeps what it wrote" in message.msg
        assert "wsgi_pgconn.django import get_wsgi_application" in message.hint


def test_the_stock_application_says_how_to_wrap_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "WSGI_APPLICATION", "djcheck_wsgi.stock")
    default, other = check_wsgi_application()
    assert "application = get_wsgi_application()" in default.hint
    assert "get_wsgi_application(alias='other')" in other.hint


@pytest.mark.parametrize("path", [None, "djcheck_wsgi.missing", "no_such_module.application"])
def test_an_application_that_cannot_be_found_is_w004(
    monkeypatch: pytest.MonkeyPatch, path: str | None
) -> None:
    monkeypatch.setattr(settings, "WSGI_APPLICATION", path)
    (message,) = check_wsgi_application()
    assert message.id == "wsgi_pgconn.W004"
    assert ("not set" if path is None else "could not be imported") in message.msg


def test_no_wsgi_pgconn_alias_no_wsgi_check(
    monkeypatch: pytest.MonkeyPatch, databases: dict[str, Any]
) -> None:
    for entry in databases.values():
        entry["ENGINE"] = "django.db.backends.postgresql"
    monkeypatch.setattr(settings, "WSGI_APPLICATION", "djcheck_wsgi.stock")
    assert check_wsgi_application() == []
    assert check_database_settings() == []


# -- Django's own connection handling on a wsgi_pgconn alias (E001, W002, W003) ------------------


def test_the_test_settings_pass(databases: dict[str, Any]) -> None:
    assert check_database_settings() == []


def test_conn_max_age_and_health_checks_name_the_settings_that_govern(
    databases: dict[str, Any],
) -> None:
    databases["default"]["CONN_MAX_AGE"] = 600
    databases["other"]["CONN_MAX_AGE"] = None  # unlimited
    databases["other"]["CONN_HEALTH_CHECKS"] = True
    messages = check_database_settings()
    assert ids(messages) == [
        ("wsgi_pgconn.W002", "DATABASES['default']"),
        ("wsgi_pgconn.W002", "DATABASES['other']"),
        ("wsgi_pgconn.W003", "DATABASES['other']"),
    ]
    by_id = {(m.id, m.obj): m for m in messages}
    assert "WSGI_PGCONN_MAX_AGE" in by_id["wsgi_pgconn.W002", "DATABASES['default']"].msg
    assert "= 600 " in by_id["wsgi_pgconn.W002", "DATABASES['default']"].msg
    assert "WSGI_PGCONN_CHECK" in by_id["wsgi_pgconn.W003", "DATABASES['other']"].msg


def test_django_pool_is_an_error(databases: dict[str, Any]) -> None:
    databases["default"].setdefault("OPTIONS", {})["pool"] = {"max_size": 8}
    (message,) = check_database_settings()
    assert isinstance(message, checks.Error)
    assert (message.id, message.obj) == ("wsgi_pgconn.E001", "DATABASES['default']")
    assert "WSGI_PGCONN_SCOPE=pool" in message.hint
    assert "WSGI_PGCONN_POOL_SIZE for 'max_size'" in message.hint


# -- manage.py check, as a subprocess -------------------------------------------------------------


def manage_check(**env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJCHECK_", "PYTEST_")) and k != "DJANGO_SETTINGS_MODULE"
    }
    environ.update(
        PYTHONPATH=os.pathsep.join([str(HERE), environ.get("PYTHONPATH", "")]),
        DJANGO_SETTINGS_MODULE="djcheck_settings",
        **env,
    )
    return subprocess.run(
        [sys.executable, "-m", "django", "check"],
        env=environ,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_manage_py_check_reports_the_stock_application() -> None:
    """Django's stock get_wsgi_application with the adapter's ENGINE: W001, and it says why."""
    result = manage_check(DJCHECK_WSGI="djcheck_wsgi.stock", DJCHECK_CONN_MAX_AGE="60")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output  # warnings do not fail `check`
    assert output.count("(wsgi_pgconn.W001)") == 2
    assert "(wsgi_pgconn.W002)" in output
    assert "System check identified 3 issues" in output


def test_manage_py_check_is_quiet_when_all_is_well() -> None:
    result = manage_check(DJCHECK_WSGI="djcheck_wsgi.both")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_manage_py_check_fails_on_the_django_pool() -> None:
    result = manage_check(DJCHECK_WSGI="djcheck_wsgi.both", DJCHECK_POOL="1")
    assert result.returncode == 1
    assert "(wsgi_pgconn.E001)" in result.stderr
    assert "WSGI_PGCONN_SCOPE=pool" in result.stderr


def test_the_django_pool_is_refused_when_a_connection_is_to_be_opened() -> None:
    """Not when the wrapper is built: Django builds it while importing the models, before
    its checks run, and E001 must get to say it first."""
    from django.core.exceptions import ImproperlyConfigured

    from wsgi_pgconn.django import DatabaseWrapper

    entry = copy.deepcopy(settings.DATABASES["default"])
    entry["OPTIONS"] = {"pool": {"max_size": 4}}
    wrapper = DatabaseWrapper(entry, "default")
    with pytest.raises(ImproperlyConfigured, match=r"\['OPTIONS'\]\['pool'\] turns on Django's"):
        wrapper.connect()  # Django's own connection
    assert wrapper.connection is None
    with pytest.raises(ImproperlyConfigured, match="WSGI_PGCONN_SCOPE=pool"):
        wrapper.get_connection_params()  # what the middleware builds its DSN from
