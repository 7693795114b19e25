"""Fixtures of the fault tests (tests/faults).

Every test here also runs :func:`no_secret_leaks`: after the test, no
password it knows of (the cluster's, and any a test registers in
``_faultkit.SECRETS``) may appear in a log record at any level (messages and
tracebacks), in a response received, or in ``repr(mw)``, ``str(mw.settings)``
and ``mw.stats()`` of any middleware the test built.

The ledger totals and the tables the tests produce are printed in the
terminal summary (and by each test, visible with ``-rA`` or ``-s``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import _faultkit as kit
import pytest

from wsgi_pgconn import PgConnMiddleware


@pytest.fixture
def admin_dsn(pg: Any, test_db: str) -> str:
    dsn: str = pg.dsn(dbname=test_db, application_name="faults-admin")
    return dsn


@pytest.fixture
def fadmin(admin_dsn: str) -> Iterator[kit.Admin]:
    """A superuser connection that survives server restarts (reconnects)."""
    admin = kit.Admin(admin_dsn)
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def ledger_table(admin_dsn: str) -> Iterator[str]:
    """A fresh table ``(id, k, pid, pos)`` with no unique constraint, so double writes show."""
    name = "ledger_" + uuid.uuid4().hex[:10]
    admin = kit.Admin(admin_dsn)
    try:
        admin.rows(
            f"CREATE TABLE {name} (id bigserial PRIMARY KEY, k text NOT NULL, "
            "pid int NOT NULL DEFAULT pg_backend_pid(), pos int NOT NULL DEFAULT 0)"
        )
        yield name
        admin.rows(f"DROP TABLE IF EXISTS {name}")
    finally:
        admin.close()


@pytest.fixture
def commit_waits_on_lock(fadmin: kit.Admin, ledger_table: str) -> Iterator[int]:
    """COMMIT of a transaction that wrote to ``ledger_table`` waits for this advisory lock.

    A deferred constraint trigger takes it (``pg_advisory_xact_lock``): a test
    that holds the lock holds every such COMMIT on the server; the fixture's
    value is the lock's key.
    """
    key = 4243
    fadmin.rows(
        f"CREATE FUNCTION {ledger_table}_wait() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_advisory_xact_lock({key}); RETURN NULL; END $$"
    )
    fadmin.rows(
        f"CREATE CONSTRAINT TRIGGER {ledger_table}_wait AFTER INSERT ON {ledger_table} "
        f"DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {ledger_table}_wait()"
    )
    yield key
    fadmin.rows(f"DROP FUNCTION {ledger_table}_wait() CASCADE")


@pytest.fixture
def make_mw(make_mw: Callable[..., PgConnMiddleware]) -> Callable[..., PgConnMiddleware]:
    """The suite's make_mw, remembering each middleware for the secret scan."""

    def make(app: Any, **kwargs: Any) -> PgConnMiddleware:
        mw = make_mw(app, **kwargs)
        kit.MIDDLEWARES.append(mw)
        return mw

    return make


def _record_text(record: logging.LogRecord) -> str:
    return logging.Formatter("%(levelname)s %(name)s %(message)s").format(record)


@pytest.fixture(autouse=True)
def no_secret_leaks(pg: Any, caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    kit.RESPONSES.clear()
    kit.MIDDLEWARES.clear()
    kit.SECRETS.clear()
    if getattr(pg, "password", ""):
        kit.SECRETS.add(pg.password)
    yield
    while kit.SERVERS:  # left open by a test that failed half-way
        kit.SERVERS[-1].close()
    texts: list[tuple[str, str]] = []
    for when in ("setup", "call", "teardown"):
        texts += [(f"log record ({when})", _record_text(r)) for r in caplog.get_records(when)]
    texts += [("response", r.decode("utf-8", "replace")) for r in kit.RESPONSES]
    for mw in kit.MIDDLEWARES:
        texts += [
            ("repr(mw)", repr(mw)),
            ("str(mw.settings)", str(mw.settings)),
            ("mw.stats()", repr(mw.stats())),
        ]
    secrets = {s for s in kit.SECRETS if s}
    leaks = [(where, text) for where, text in texts for s in secrets if s in text]
    kit.RESPONSES.clear()
    kit.MIDDLEWARES.clear()
    assert not leaks, f"a password appeared in {leaks[0][0]}: {leaks[0][1][:500]!r}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if kit.SUMMARY:
        terminalreporter.section("fault tests: ledgers and tables")
        for line in kit.SUMMARY:
            terminalreporter.write_line(line)
