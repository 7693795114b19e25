"""Django's test tools with the adapter: TestCase with the test client, TestCase and
TransactionTestCase driving the full WSGI stack.

These are Django's unittest classes, run by pytest; the test databases are
the ones conftest.py created with Django's test runner functions.
"""

from __future__ import annotations

from typing import Any, ClassVar

import psycopg2
from django.core.wsgi import get_wsgi_application
from django.db import connection, transaction
from django.test import TestCase, TransactionTestCase
from djtest_app import views
from djtest_app.models import Item
from djtest_helpers import TestApp, new_key

from wsgi_pgconn.django import DjangoPgConnMiddleware, database_dsn


def own_pid() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


class TestClientTestCase(TestCase):
    """Django's test client bypasses WSGI: the plain postgresql backend's behaviour."""

    databases: ClassVar[set[str]] = {"default"}

    @classmethod
    def setUpTestData(cls) -> None:
        Item.objects.create(key="fixture-row")

    def setUp(self) -> None:
        views.EVENTS.clear()

    def test_views_run_in_the_test_transaction(self) -> None:
        key = new_key()
        body = self.client.get(f"/nested/{key}").json()
        assert body["in_request"] is False
        assert body["in_atomic_block"] is True  # the test case's atomic blocks
        assert Item.objects.filter(key__startswith=key).count() == 3
        assert self.client.get("/count/fixture-row").json()["count"] == 1

    def test_on_commit_callbacks_are_captured_as_usual(self) -> None:
        key = new_key()
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            self.client.get(f"/hooks/{key}?mode=orm")
        assert len(callbacks) == 1
        assert Item.objects.filter(key=key + "-callback").exists()

    def test_durable_atomic_blocks_work_in_a_test_case(self) -> None:
        with transaction.atomic(durable=True):
            Item.objects.create(key=new_key())


class FullStackTestCase(TestCase):
    """TestCase driving PgConnMiddleware: requests run on the middleware's connection.

    The request's transaction is its own, on its own connection: it commits
    for real (the test case's rollback does not undo it, so the test deletes
    what requests committed) and does not see what the test case wrote and
    has not committed.
    """

    databases: ClassVar[set[str]] = {"default"}
    middleware: ClassVar[DjangoPgConnMiddleware]
    app: ClassVar[Any]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.middleware = DjangoPgConnMiddleware(get_wsgi_application())
        cls.app = TestApp(cls.middleware)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.middleware.close()
        super().tearDownClass()

    @classmethod
    def setUpTestData(cls) -> None:
        Item.objects.create(key="fixture-row")

    def setUp(self) -> None:
        self.key = new_key()
        views.EVENTS.clear()
        views.OBSERVER_DSN[:] = [self.dsn()]
        self.addCleanup(self.delete_committed)

    def dsn(self) -> str:
        return database_dsn(connection.alias)

    def delete_committed(self) -> None:
        conn = psycopg2.connect(self.dsn())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("DELETE FROM djtest_app_item WHERE key LIKE %s", [self.key + "%"])
        finally:
            conn.close()

    def test_a_request_commits_on_the_middlewares_connection(self) -> None:
        test_connection = connection.connection
        body = self.app.get(f"/write/{self.key}").json
        assert body["orm_pid"] == body["raw_pid"]
        assert body["orm_pid"] != own_pid()
        assert body["in_request"] is True
        # Committed: the test's transaction (read committed) sees it.
        assert Item.objects.filter(key=self.key).exists()
        # The test case's connection and atomic blocks are untouched.
        assert connection.connection is test_connection
        assert connection.in_atomic_block is True
        assert connection.atomic_blocks[0]._from_testcase

    def test_a_request_does_not_see_the_test_cases_uncommitted_rows(self) -> None:
        assert Item.objects.filter(key="fixture-row").count() == 1
        assert self.app.get("/count/fixture-row").json["count"] == 0

    def test_request_rules_hold_inside_a_test_case(self) -> None:
        errors = self.app.get(f"/refused/{self.key}").json["errors"]
        assert errors["durable"].startswith("builtins.RuntimeError")
        assert "TransactionManagementError" in errors["commit"]
        self.app.get(f"/write/{self.key}-x?then=raise", status=500)
        assert not Item.objects.filter(key__startswith=self.key + "-x").exists()

    def test_on_commit_runs_at_the_requests_commit(self) -> None:
        with self.captureOnCommitCallbacks() as captured:
            self.app.get(f"/hooks/{self.key}")
        assert captured == []  # not the test case's transaction
        seen = [event for event in views.EVENTS if "seen_by_other" in event]
        assert [(e["key"], e["seen_by_other"]) for e in seen] == [(self.key, 1)]


class FullStackTransactionTestCase(TransactionTestCase):
    """TransactionTestCase driving PgConnMiddleware: committed, then flushed after each test."""

    databases: ClassVar[set[str]] = {"default"}
    committed: ClassVar[list[str]] = []

    def setUp(self) -> None:
        middleware = DjangoPgConnMiddleware(get_wsgi_application())
        self.addCleanup(middleware.close)
        self.app = TestApp(middleware)

    def test_a_request_commits(self) -> None:
        key = new_key()
        body = self.app.get(f"/write/{key}").json
        assert body["orm_pid"] == body["raw_pid"]
        assert sorted(Item.objects.filter(key__startswith=key).values_list("key", flat=True)) == [
            key,
            key + "-raw",
        ]
        self.app.get(f"/write/{key}-failed?then=raise", status=500)
        assert not Item.objects.filter(key__startswith=key + "-failed").exists()
        self.committed.append(key)

    def test_b_the_flush_between_tests_removed_committed_rows(self) -> None:
        for key in self.committed:  # committed by test_a, flushed after it
            assert not Item.objects.filter(key__startswith=key).exists()
        key = new_key()
        self.app.get(f"/nested/{key}")
        assert Item.objects.filter(key__startswith=key).count() == 3
