"""A Django middleware that writes and then fails when the request asks it to (X-Fault)."""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

from .models import Item
from .views import Boom


class FaultMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        fault = request.headers.get("X-Fault")
        key = request.headers.get("X-Key", "")
        if fault == "before":
            Item.objects.create(key=key + "-mw")
            raise Boom("middleware failed before the view")
        response = self.get_response(request)
        if fault == "after":
            Item.objects.create(key=key + "-mw")
            raise Boom("middleware failed after the view")
        return response
