from django.apps import AppConfig


class DjtestAppConfig(AppConfig):
    name = "djtest_app"
    default_auto_field = "django.db.models.BigAutoField"
