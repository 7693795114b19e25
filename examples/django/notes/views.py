"""Views of the notes example.

No commit() anywhere: each request is one transaction, committed by
wsgi_pgconn's middleware when the response is a success and rolled back when
the view raises or answers 5xx. The ORM and raw SQL on the request's psycopg2
connection are in that one transaction.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from wsgi_pgconn import CONNECTION_KEY

from .models import Note

logger = logging.getLogger("notes")


def raw_cursor(request: HttpRequest) -> Any:
    """A cursor on the request's own psycopg2 connection.

    Django's test client does not go through WSGI middleware; there the
    view falls back to Django's connection (the test's transaction).
    """
    conn = request.META.get(CONNECTION_KEY)
    return conn.cursor() if conn is not None else connection.cursor()


def audit(request: HttpRequest, action: str, title: str) -> int:
    """Record ``action`` with raw SQL; returns the server process that ran it."""
    with raw_cursor(request) as cur:
        cur.execute(
            "INSERT INTO notes_audit (action, title, at) VALUES (%s, %s, now()) "
            "RETURNING pg_backend_pid()",
            [action, title],
        )
        pid: int = cur.fetchone()[0]
    return pid


@require_http_methods(["GET", "POST"])
def notes(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return JsonResponse({"notes": list(Note.objects.values("id", "title", "body"))})
    title = request.POST["title"]
    note = Note.objects.create(title=title, body=request.POST.get("body", ""))
    pid = audit(request, "create", title)
    # Runs after the request's COMMIT, never if it rolls back.
    transaction.on_commit(lambda: logger.info("note %r committed", title))
    return JsonResponse({"id": note.id, "title": title, "pid": pid}, status=201)


@require_POST
def create_then_fail(request: HttpRequest) -> HttpResponse:
    """Writes, then fails: Django answers 500 and nothing is committed."""
    title = request.POST["title"]
    Note.objects.create(title=title)
    audit(request, "create", title)
    raise RuntimeError("something went wrong after the writes")


@require_POST
def batch(request: HttpRequest) -> HttpResponse:
    """Each title in a savepoint of the request's transaction: duplicates are skipped."""
    created, skipped = [], []
    for title in request.POST.getlist("title"):
        try:
            with transaction.atomic():
                Note.objects.create(title=title)
        except IntegrityError:
            skipped.append(title)
        else:
            created.append(title)
    audit(request, "batch", ",".join(created))
    return JsonResponse({"created": created, "skipped": skipped})


@require_GET
def export(request: HttpRequest) -> HttpResponse:
    """CSV, streamed: the rows are read while the body is sent, and the audit
    row written at its end is committed when the server closes the response."""

    def rows() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["id", "title", "created"])
        count = 0
        for note in Note.objects.iterator(chunk_size=100):
            writer.writerow([note.id, note.title, note.created.isoformat()])
            count += 1
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
        audit(request, "export", f"{count} notes")
        yield buffer.getvalue()

    return StreamingHttpResponse(rows(), content_type="text/csv")
