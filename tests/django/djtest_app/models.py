from __future__ import annotations

from django.db import models


class Item(models.Model):
    """Written by the views; ``key`` is unique, checked at COMMIT (deferred)."""

    key = models.CharField(max_length=100)
    data = models.JSONField(default=dict)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = (
            models.UniqueConstraint(
                fields=["key"], name="item_key_unique", deferrable=models.Deferrable.DEFERRED
            ),
        )

    def __str__(self) -> str:
        return self.key


class LoginFailure(models.Model):
    """A failed-login counter: written by a request that answers 403."""

    username = models.CharField(max_length=100, unique=True)
    count = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.username}: {self.count}"
