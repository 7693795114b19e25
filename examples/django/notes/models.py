from django.db import models


class Note(models.Model):
    title = models.CharField(max_length=200, unique=True)
    body = models.TextField(blank=True)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ("id",)

    def __str__(self) -> str:
        return self.title


class AuditEntry(models.Model):
    """Written with raw SQL by the views, next to the ORM's writes."""

    action = models.CharField(max_length=20)
    title = models.CharField(max_length=200)
    at = models.DateTimeField()

    class Meta:
        db_table = "notes_audit"
        ordering = ("id",)

    def __str__(self) -> str:
        return f"{self.action} {self.title}"
