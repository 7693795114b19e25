"""Views of the adapter's tests.

Each writes through the ORM and/or the request's own psycopg2 connection
(``request.META["wsgi_pgconn.connection"]``) and answers JSON saying what it
saw; ``?then=...`` picks how the request ends.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from itertools import chain
from typing import Any

import psycopg2
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, connection, connections, transaction
from django.db.models import F
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from .models import Item, LoginFailure

#: What the on_commit callbacks saw, in order.
EVENTS: list[dict[str, Any]] = []
#: Tests put here: the connection string callbacks use to look from another connection.
OBSERVER_DSN: list[str] = []
#: Tests put here: a threading.Barrier that /wait/ requests meet at.
BARRIER: list[threading.Barrier] = []
#: Tests put here: a webtest app that /reenter/ requests call while they run.
INNER: list[Any] = []


class Boom(Exception):
    """Raised on purpose by a view, a middleware or a callback."""


def backend_pid(using: str = "default") -> int:
    with connections[using].cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def raw(request: HttpRequest) -> Any:
    return request.META["wsgi_pgconn.connection"]


def raw_pid(request: HttpRequest) -> int:
    with raw(request).cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid: int = cur.fetchone()[0]
    return pid


def raw_insert(request: HttpRequest, key: str) -> None:
    with raw(request).cursor() as cur:
        cur.execute(
            "INSERT INTO djtest_app_item (key, data, created) VALUES (%s, '{}', now())", [key]
        )


def finish(request: HttpRequest, payload: dict[str, Any]) -> HttpResponse:
    """End the request the way ``?then=`` says."""
    then = request.GET.get("then", "ok")
    if then == "raise":
        raise Boom("the view failed after writing")
    if then == "404":
        raise Http404("no such thing")
    if then == "403":
        raise PermissionDenied("not yours")
    if then == "500":
        return JsonResponse(payload, status=500)
    if then == "rollback":
        transaction.set_rollback(True)
    return JsonResponse(payload)


def state() -> dict[str, Any]:
    return {
        "in_atomic_block": connection.in_atomic_block,
        "autocommit": connection.get_autocommit(),
        "in_request": connection.in_request,
    }


# -- commit or roll back together ------------------------------------------------


def write(request: HttpRequest, key: str) -> HttpResponse:
    item = Item.objects.create(key=key, data={"list": [1, 2], "text": "é"})
    raw_insert(request, key + "-raw")
    payload = {
        "orm_pid": backend_pid(),
        "raw_pid": raw_pid(request),
        "data": Item.objects.get(pk=item.pk).data,
        **state(),
    }
    return finish(request, payload)


def login(request: HttpRequest) -> HttpResponse:
    """A wrong password: count the failure, answer 403."""
    username = request.POST["username"]
    LoginFailure.objects.get_or_create(username=username)
    LoginFailure.objects.filter(username=username).update(count=F("count") + 1)
    raise PermissionDenied("wrong password")


def nested(request: HttpRequest, key: str) -> HttpResponse:
    Item.objects.create(key=key + "-outer")
    savepoints: list[int] = []
    try:
        with transaction.atomic():
            savepoints.append(len(connection.savepoint_ids))
            Item.objects.create(key=key + "-inner")
            raise Boom("inner block fails")
    except Boom:
        pass
    LoginFailure.objects.create(username=key)
    integrity = ""
    try:
        with transaction.atomic():
            LoginFailure.objects.create(username=key)  # unique: fails at once
    except IntegrityError as exc:
        integrity = type(exc).__name__
    with transaction.atomic(), transaction.atomic():
        Item.objects.create(key=key + "-deep")
    Item.objects.create(key=key + "-after")
    return finish(request, {"savepoints": savepoints, "integrity": integrity, **state()})


def atomic_no_savepoint(request: HttpRequest, key: str) -> HttpResponse:
    """An atomic(savepoint=False) block that fails marks the whole request for rollback."""
    Item.objects.create(key=key)
    try:
        with transaction.atomic(savepoint=False):
            Item.objects.create(key=key + "-inner")
            raise Boom("no savepoint to roll back to")
    except Boom:
        pass
    return JsonResponse({"needs_rollback": connection.needs_rollback})


# -- on_commit ---------------------------------------------------------------------


def observe(key: str) -> None:
    """An on_commit callback: what another connection and Django see now."""
    other = psycopg2.connect(OBSERVER_DSN[0])
    # Autocommit: never "idle in transaction", not even while its backend exits
    # after close() (the tests' teardown looks for such sessions).
    other.autocommit = True
    try:
        with other.cursor() as cur:
            cur.execute("SELECT count(*) FROM djtest_app_item WHERE key = %s", [key])
            seen = cur.fetchone()[0]
    finally:
        other.close()
    EVENTS.append(
        {
            "key": key,
            "seen_by_other": seen,
            "in_request": connection.in_request,
            "autocommit": connection.get_autocommit(),
        }
    )


def fail() -> None:
    raise Boom("callback failed")


def write_in_callback(key: str) -> None:
    Item.objects.create(key=key)
    EVENTS.append({"key": key, "pid": backend_pid(), "in_request": connection.in_request})


def hooks(request: HttpRequest, key: str) -> HttpResponse:
    mode = request.GET.get("mode", "plain")
    Item.objects.create(key=key)
    if mode == "savepoint":
        try:
            with transaction.atomic():
                transaction.on_commit(lambda: observe(key + "-dropped"))
                raise Boom("inner block fails")
        except Boom:
            pass
        with transaction.atomic():
            transaction.on_commit(lambda: observe(key))
    elif mode == "failing":
        transaction.on_commit(fail, robust=True)
        transaction.on_commit(lambda: observe(key))
        transaction.on_commit(fail)
        transaction.on_commit(lambda: observe(key + "-skipped"))
    elif mode == "orm":
        transaction.on_commit(lambda: write_in_callback(key + "-callback"))
    else:
        transaction.on_commit(lambda: observe(key))
    EVENTS.append({"key": key, "registered": True, "request_pid": backend_pid()})
    return finish(request, {})


def hook_without_query(request: HttpRequest, key: str) -> HttpResponse:
    """on_commit in a request that never queries."""
    transaction.on_commit(lambda: EVENTS.append({"key": key, "ran": True}))
    return JsonResponse({})


def deferred(request: HttpRequest, key: str) -> HttpResponse:
    """Two rows with one key: the deferred unique constraint fails at COMMIT."""
    Item.objects.create(key=key)
    Item.objects.create(key=key)
    transaction.on_commit(lambda: observe(key))
    return JsonResponse({"written": 2})


# -- what a request may not do -------------------------------------------------------


def refused(request: HttpRequest, key: str) -> HttpResponse:
    Item.objects.create(key=key)
    conn = raw(request)
    attempts = {
        "durable": lambda: transaction.atomic(durable=True).__enter__(),
        "commit": transaction.commit,
        "rollback": transaction.rollback,
        "set_autocommit": lambda: transaction.set_autocommit(True),
        "raw_commit": conn.commit,
        "raw_rollback": conn.rollback,
        "raw_close": conn.close,
        "raw_autocommit": lambda: setattr(conn, "autocommit", True),
        "wrapper_connection_commit": connection.connection.commit,
    }
    errors: dict[str, str] = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except Exception as exc:
            errors[name] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        else:
            errors[name] = "allowed"
    connection.close()  # Django's close(): not the request's connection
    connections.close_all()
    Item.objects.create(key=key + "-after")
    return finish(request, {"errors": errors, "pid": backend_pid(), "raw_pid": raw_pid(request)})


# -- per-connection setup ------------------------------------------------------------


def session(request: HttpRequest, key: str) -> HttpResponse:
    Item.objects.create(key=key)  # the ORM first: a plain PgConnMiddleware prepares here
    created = Item.objects.get(key=key).created
    with raw(request).cursor() as cur:
        cur.execute(
            "SELECT current_setting('TimeZone'), current_user, pg_backend_pid(), "
            "current_setting('transaction_isolation')"
        )
        timezone, user, pid, isolation = cur.fetchone()
    return finish(
        request,
        {
            "timezone": timezone,
            "user": user,
            "pid": pid,
            "orm_pid": backend_pid(),
            "tzinfo": str(created.tzinfo),
            "isolation": isolation,
        },
    )


# -- threads and async -------------------------------------------------------------


def wait(request: HttpRequest, key: str) -> HttpResponse:
    """Write, then meet the other requests at the test's barrier."""
    Item.objects.create(key=key)
    BARRIER[0].wait(timeout=10)
    return JsonResponse(
        {"orm_pid": backend_pid(), "raw_pid": raw_pid(request), "thread": threading.get_ident()}
    )


def spawn(request: HttpRequest, key: str) -> HttpResponse:
    """A thread started by the view keeps Django's own connection (autocommit)."""
    Item.objects.create(key=key)
    seen: dict[str, Any] = {}

    def work() -> None:
        try:
            Item.objects.create(key=key + "-thread")
            seen.update(pid=backend_pid(), in_request=connection.in_request)
        finally:
            connections.close_all()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return finish(request, {"thread": seen, "request_pid": raw_pid(request)})


def orm_async(request: HttpRequest, key: str) -> HttpResponse:
    """A sync view that runs async ORM calls (thread-sensitive sync_to_async)."""

    def elsewhere() -> dict[str, Any]:
        try:
            return {"pid": backend_pid(), "in_request": connection.in_request}
        finally:
            connections.close_all()

    async def work() -> dict[str, Any]:
        await Item.objects.acreate(key=key)
        count = await Item.objects.filter(key__startswith=key).acount()
        pid = await sync_to_async(backend_pid)()
        other = await sync_to_async(elsewhere, thread_sensitive=False)()
        return {"count": count, "pid": pid, "not_thread_sensitive": other}

    result = async_to_sync(work)()
    return finish(request, {**result, "raw_pid": raw_pid(request)})


async def async_view(request: HttpRequest, key: str) -> HttpResponse:
    """An async view under WSGI: Django runs it with async_to_sync."""
    await Item.objects.acreate(key=key)
    pid = await sync_to_async(backend_pid)()
    request_pid = await sync_to_async(raw_pid)(request)
    in_request = await sync_to_async(lambda: connection.in_request)()
    return await sync_to_async(finish)(
        request, {"pid": pid, "raw_pid": request_pid, "in_request": in_request}
    )


# -- streaming -------------------------------------------------------------------------


def stream(request: HttpRequest, key: str) -> HttpResponse:
    then = request.GET.get("then", "ok")

    def body() -> Iterator[bytes]:
        yield b"start\n"
        Item.objects.create(key=key)
        transaction.on_commit(lambda: observe(key))
        yield f"pid {backend_pid()}\n".encode()
        if then == "raise":
            raise Boom("failed while streaming")
        yield b"end\n"

    Item.objects.create(key=key + "-view")
    return StreamingHttpResponse(body(), content_type="text/plain")


def stream_items(request: HttpRequest, key: str) -> HttpResponse:
    """The items whose key starts with ``key``, streamed from a server-side cursor.

    The iterator's first chunk is read in the view; the rest while the body is
    sent, from the cursor the request's transaction must keep open.
    """
    Item.objects.create(key=key + "-view")
    it = Item.objects.filter(key__startswith=key).order_by("id").iterator(chunk_size=2)
    first = next(it)
    return StreamingHttpResponse(
        (f"{item.key}\n".encode() for item in chain([first], it)), content_type="text/plain"
    )


def count(request: HttpRequest, key: str) -> HttpResponse:
    return JsonResponse({"count": Item.objects.filter(key=key).count(), "pid": backend_pid()})


# -- other aliases ---------------------------------------------------------------------


def aliases(request: HttpRequest, key: str) -> HttpResponse:
    Item.objects.using("default").create(key=key)
    Item.objects.using("other").create(key=key)
    return finish(
        request,
        {
            "default": [backend_pid("default"), connections["default"].in_request],
            "other": [backend_pid("other"), connections["other"].in_request],
            "raw_pid": raw_pid(request),
        },
    )


# -- a request served inside another one, on the same thread ------------------------


def reenter(request: HttpRequest, key: str) -> HttpResponse:
    """Inside an atomic block, serve another request (another middleware) on this thread."""
    with transaction.atomic():
        Item.objects.create(key=key + "-before")
        inner = INNER[0].get(f"/write/{key}-inner").json
        Item.objects.create(key=key + "-after")
        depth = len(connection.savepoint_ids)
    return finish(request, {"depth": depth, "pid": backend_pid(), "inner": inner, **state()})


def tagged(request: HttpRequest, key: str) -> HttpResponse:
    """The ORM's first query reads what the middleware's on_begin hook set in the transaction."""
    with connection.cursor() as cur:
        cur.execute("SELECT current_setting('djtest.tag', true)")
        (tag,) = cur.fetchone()
    return JsonResponse({"tag": tag, "pid": backend_pid()})
