"""Tests of the notes example, run by Django's test runner: ``python manage.py test``.

``ViewTests`` uses Django's test client, which calls Django directly (no
WSGI middleware): everything happens in the test case's transaction, as with
Django's own postgresql backend. ``WSGIStackTests`` sends requests through
``notesite.wsgi.application`` (wsgi_pgconn's middleware around Django), whose
transactions commit for real: hence a TransactionTestCase, which empties the
tables after each test. The middleware connects to the test database, and
Django's test runner can drop it at the end although the middleware keeps a
connection to it.
"""

from __future__ import annotations

import io
import json
from typing import Any
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

from django.test import TestCase, TransactionTestCase
from notesite.wsgi import application

from notes.models import AuditEntry, Note


def call(method: str, path: str, data: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One request through the WSGI application; (status, body)."""
    body = urlencode(data or {}, doseq=True).encode()
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    setup_testing_defaults(environ)
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    result = application(environ, start_response)
    try:
        content = b"".join(result)
    finally:
        result.close()  # where the middleware commits a streamed body
    return int(statuses[-1][:3]), content


def audit() -> list[tuple[str, str]]:
    return list(AuditEntry.objects.values_list("action", "title"))


class ViewTests(TestCase):
    def test_create(self) -> None:
        response = self.client.post("/notes/", {"title": "first", "body": "hello"})
        assert response.status_code == 201
        assert Note.objects.get().body == "hello"
        assert audit() == [("create", "first")]

    def test_batch_skips_duplicates(self) -> None:
        Note.objects.create(title="b")
        response = self.client.post("/notes/batch", {"title": ["a", "b", "c"]})
        assert response.json() == {"created": ["a", "c"], "skipped": ["b"]}


class WSGIStackTests(TransactionTestCase):
    def test_create_commits_note_and_audit_row_together(self) -> None:
        status, body = call("POST", "/notes/", {"title": "first"})
        assert status == 201, body
        assert list(Note.objects.values_list("title", flat=True)) == ["first"]
        assert audit() == [("create", "first")]

    def test_a_failing_view_commits_nothing(self) -> None:
        status, _ = call("POST", "/notes/failing", {"title": "doomed"})
        assert status == 500
        assert not Note.objects.exists()
        assert audit() == []

    def test_batch_uses_savepoints(self) -> None:
        call("POST", "/notes/", {"title": "b"})
        status, body = call("POST", "/notes/batch", {"title": ["a", "b", "c"]})
        assert status == 200
        assert json.loads(body) == {"created": ["a", "c"], "skipped": ["b"]}
        assert sorted(Note.objects.values_list("title", flat=True)) == ["a", "b", "c"]
        assert audit() == [("create", "b"), ("batch", "a,c")]

    def test_export_streams_and_commits_its_audit_row_at_close(self) -> None:
        for title in ("x", "y"):
            call("POST", "/notes/", {"title": title})
        status, body = call("GET", "/notes/export.csv")
        assert status == 200
        lines = body.decode().splitlines()
        assert lines[0] == "id,title,created"
        assert [line.split(",")[1] for line in lines[1:]] == ["x", "y"]
        assert audit()[-1] == ("export", "2 notes")
